using System.Text.Json;
using CoordGen.Engine.Model;

namespace CoordGen.Engine.Tests;

public sealed class CheckpointErrorTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("coordgen-ckpt-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string CopyTiny()
    {
        string src = Path.Combine(Paths.Vectors, "tiny-llama");
        foreach (var f in Directory.GetFiles(src))
        {
            File.Copy(f, Path.Combine(_dir, Path.GetFileName(f)), overwrite: true);
        }

        return _dir;
    }

    [Fact]
    public void Loader_should_name_the_missing_file_when_config_is_absent()
    {
        var ex = Assert.Throws<ModelLoadException>(() => ModelBundle.Load(_dir));
        Assert.Contains("config.json", ex.Message);
    }

    [Fact]
    public void Loader_should_name_the_directory_when_it_does_not_exist()
    {
        var ex = Assert.Throws<ModelLoadException>(() => ModelBundle.Load(Path.Combine(_dir, "nope")));
        Assert.Contains("does not exist", ex.Message);
    }

    [Theory]
    [InlineData("GPT2LMHeadModel")]
    [InlineData("MixtralForCausalLM")]
    public void Config_should_reject_unsupported_architectures_with_the_supported_list(string arch)
    {
        using var doc = JsonDocument.Parse($$"""{"architectures":["{{arch}}"],"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"vocab_size":10}""");
        var ex = Assert.Throws<ModelLoadException>(() => ModelConfig.Parse(doc.RootElement));
        Assert.Contains(arch, ex.Message);
        Assert.Contains("LlamaForCausalLM", ex.Message);
    }

    [Fact]
    public void Config_should_reject_heads_that_do_not_group_when_kv_heads_do_not_divide()
    {
        using var doc = JsonDocument.Parse("""{"model_type":"llama","hidden_size":12,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":3,"num_key_value_heads":2,"vocab_size":10}""");
        var ex = Assert.Throws<ModelLoadException>(() => ModelConfig.Parse(doc.RootElement));
        Assert.Contains("multiple", ex.Message);
    }

    [Fact]
    public void Weights_should_report_a_truncated_file_when_bytes_are_missing()
    {
        string dir = CopyTiny();
        string path = Path.Combine(dir, "model.safetensors");
        var bytes = File.ReadAllBytes(path);
        File.WriteAllBytes(path, bytes[..(bytes.Length - 100)]);
        var ex = Assert.Throws<ModelLoadException>(() => ModelWeights.Load(dir, ModelConfig.Load(Path.Combine(dir, "config.json"))));
        Assert.Contains("truncated", ex.Message);
    }

    [Fact]
    public void Weights_should_report_a_corrupt_header_when_the_json_is_garbage()
    {
        string dir = CopyTiny();
        string path = Path.Combine(dir, "model.safetensors");
        var bytes = File.ReadAllBytes(path);
        for (int i = 8; i < 40; i++)
        {
            bytes[i] = (byte)'#';
        }

        File.WriteAllBytes(path, bytes);
        var ex = Assert.Throws<ModelLoadException>(() => ModelWeights.Load(dir, ModelConfig.Load(Path.Combine(dir, "config.json"))));
        Assert.Contains("corrupt", ex.Message);
    }

    [Fact]
    public void Weights_should_report_a_shape_mismatch_when_config_disagrees_with_weights()
    {
        string dir = CopyTiny();
        var config = ModelConfig.Load(Path.Combine(dir, "config.json")) with { IntermediateSize = 64 };
        var ex = Assert.Throws<ModelLoadException>(() => ModelWeights.Load(dir, config));
        Assert.Contains("do not belong together", ex.Message);
    }

    [Fact]
    public void Weights_should_report_a_missing_tensor_when_config_has_more_layers()
    {
        string dir = CopyTiny();
        var config = ModelConfig.Load(Path.Combine(dir, "config.json")) with { NumLayers = 3 };
        var ex = Assert.Throws<ModelLoadException>(() => ModelWeights.Load(dir, config));
        Assert.Contains("model.layers.2", ex.Message);
    }

    [Fact]
    public void Weights_should_reject_quantized_dtypes_with_advice()
    {
        string path = Path.Combine(_dir, "model.safetensors");
        var header = """{"model.norm.weight":{"dtype":"I8","shape":[4],"data_offsets":[0,4]}}""";
        using (var fs = File.Create(path))
        {
            fs.Write(BitConverter.GetBytes((long)header.Length));
            fs.Write(System.Text.Encoding.UTF8.GetBytes(header));
            fs.Write(new byte[4]);
        }

        var ex = Assert.Throws<ModelLoadException>(() => SafeTensors.ReadHeader(path));
        Assert.Contains("I8", ex.Message);
        Assert.Contains("F16", ex.Message);
    }

    [Theory]
    [InlineData(SafeTensorDType.F32, 0.0)]
    [InlineData(SafeTensorDType.F16, 1e-3)]
    [InlineData(SafeTensorDType.BF16, 1e-2)]
    public void SafeTensors_should_round_trip_each_dtype_within_its_precision(SafeTensorDType dtype, double tol)
    {
        var data = Enumerable.Range(0, 100).Select(i => (float)Math.Sin(i) * 3).ToArray();
        string path = Path.Combine(_dir, $"x-{dtype}.safetensors");
        SafeTensors.Write(path, [("t", new long[] { 10, 10 }, data)], dtype);
        var info = SafeTensors.ReadHeader(path)["t"];
        Assert.Equal(dtype, info.DType);
        var back = new float[100];
        SafeTensors.ReadInto(info, back);
        for (int i = 0; i < 100; i++)
        {
            Assert.True(Math.Abs(back[i] - data[i]) <= tol * Math.Max(1, Math.Abs(data[i])), $"{i}: {data[i]} vs {back[i]}");
        }
    }

    [Fact]
    public void Sharded_checkpoint_should_load_when_an_index_lists_the_shards()
    {
        string src = Path.Combine(Paths.Vectors, "tiny-llama");
        var config = ModelConfig.Load(Path.Combine(src, "config.json"));
        var whole = ModelWeights.Load(src, config);
        var tensors = whole.Tensors.OrderBy(t => t.Name, StringComparer.Ordinal).ToList();
        var map = new Dictionary<string, string>();
        for (int s = 0; s < 2; s++)
        {
            string file = $"model-0000{s + 1}-of-00002.safetensors";
            var part = tensors.Where((_, i) => i % 2 == s).ToList();
            SafeTensors.Write(Path.Combine(_dir, file), part.Select(t => (t.Name, t.Shape, t.Data)), SafeTensorDType.F32);
            foreach (var t in part)
            {
                map[t.Name] = file;
            }
        }

        File.WriteAllText(Path.Combine(_dir, "model.safetensors.index.json"), JsonSerializer.Serialize(new { metadata = new { }, weight_map = map }));
        var sharded = ModelWeights.Load(_dir, config);
        foreach (var t in tensors)
        {
            Assert.Equal(t.Data, sharded[t.Name].Data);
        }
    }
}
