namespace CoordGen.Engine.Model;

/// <summary>One weight tensor in float32, in pinned memory so ONNX Runtime can use it in place.</summary>
public sealed record WeightTensor(string Name, long[] Shape, float[] Data);

/// <summary>
/// All weights of a Llama-family model, keyed by their Hugging Face names. The arrays are allocated
/// pinned once and shared by every compiled graph width (see <see cref="Runtime.OrtModelRuntime"/>).
/// </summary>
public sealed class ModelWeights
{
    private readonly Dictionary<string, WeightTensor> _tensors;

    public ModelWeights(ModelConfig config, IEnumerable<WeightTensor> tensors)
    {
        Config = config;
        _tensors = tensors.ToDictionary(t => t.Name, StringComparer.Ordinal);
    }

    public ModelConfig Config { get; }

    public IReadOnlyCollection<WeightTensor> Tensors => _tensors.Values;

    public WeightTensor this[string name] => _tensors.TryGetValue(name, out var t)
        ? t
        : throw new ModelLoadException($"weight '{name}' is missing from the checkpoint.");

    public bool Contains(string name) => _tensors.ContainsKey(name);

    public long TotalBytes => _tensors.Values.Sum(t => t.Data.LongLength * sizeof(float));

    /// <summary>Name of the output projection: the embedding when tied.</summary>
    public string LmHeadName => Config.TieWordEmbeddings || !_tensors.ContainsKey("lm_head.weight") ? "model.embed_tokens.weight" : "lm_head.weight";

    /// <summary>The tensors a checkpoint of this shape must have, with their shapes.</summary>
    public static IEnumerable<(string Name, long[] Shape)> ExpectedTensors(ModelConfig c)
    {
        yield return ("model.embed_tokens.weight", [c.VocabSize, c.HiddenSize]);
        if (!c.TieWordEmbeddings)
        {
            yield return ("lm_head.weight", [c.VocabSize, c.HiddenSize]);
        }

        yield return ("model.norm.weight", [c.HiddenSize]);
        for (int i = 0; i < c.NumLayers; i++)
        {
            string p = $"model.layers.{i}.";
            yield return (p + "input_layernorm.weight", [c.HiddenSize]);
            yield return (p + "post_attention_layernorm.weight", [c.HiddenSize]);
            yield return (p + "self_attn.q_proj.weight", [c.QDim, c.HiddenSize]);
            yield return (p + "self_attn.k_proj.weight", [c.KvDim, c.HiddenSize]);
            yield return (p + "self_attn.v_proj.weight", [c.KvDim, c.HiddenSize]);
            yield return (p + "self_attn.o_proj.weight", [c.HiddenSize, c.QDim]);
            if (c.AttentionBias)
            {
                yield return (p + "self_attn.q_proj.bias", [c.QDim]);
                yield return (p + "self_attn.k_proj.bias", [c.KvDim]);
                yield return (p + "self_attn.v_proj.bias", [c.KvDim]);
            }

            yield return (p + "mlp.gate_proj.weight", [c.IntermediateSize, c.HiddenSize]);
            yield return (p + "mlp.up_proj.weight", [c.IntermediateSize, c.HiddenSize]);
            yield return (p + "mlp.down_proj.weight", [c.HiddenSize, c.IntermediateSize]);
        }
    }

    /// <summary>Loads and checks every expected tensor of a model directory.</summary>
    public static ModelWeights Load(string dir, ModelConfig config, IProgress<double>? progress = null)
    {
        var headers = SafeTensors.ReadDirectory(dir);
        var expected = ExpectedTensors(config).ToList();
        // A checkpoint with tie_word_embeddings=false but no lm_head is treated as tied (some exports do this).
        if (!config.TieWordEmbeddings && !headers.ContainsKey("lm_head.weight"))
        {
            expected.RemoveAll(e => e.Name == "lm_head.weight");
        }

        var tensors = new List<WeightTensor>(expected.Count);
        long totalElems = expected.Sum(e => e.Shape.Aggregate(1L, (a, b) => a * b));
        long done = 0;
        foreach (var (name, shape) in expected)
        {
            if (!headers.TryGetValue(name, out var info))
            {
                throw new ModelLoadException($"'{dir}': weight '{name}' is missing. The config.json ({config.Architecture}, {config.NumLayers} layers) does not match the weights file.");
            }

            if (!info.Shape.SequenceEqual(shape))
            {
                throw new ModelLoadException($"'{dir}': weight '{name}' has shape [{string.Join(",", info.Shape)}] but config.json implies [{string.Join(",", shape)}]. The config and weights do not belong together.");
            }

            var data = GC.AllocateUninitializedArray<float>(checked((int)info.ElementCount), pinned: true);
            SafeTensors.ReadInto(info, data);
            tensors.Add(new WeightTensor(name, shape, data));
            done += info.ElementCount;
            progress?.Report((double)done / totalElems);
        }

        return new ModelWeights(config, tensors);
    }

    /// <summary>Random weights with the right shapes (for shape models and tests). Norm weights are near 1.</summary>
    public static ModelWeights Random(ModelConfig config, int seed, float scale = 0.02f)
    {
        var rng = new System.Random(seed);
        var tensors = new List<WeightTensor>();
        foreach (var (name, shape) in ExpectedTensors(config))
        {
            var data = GC.AllocateUninitializedArray<float>(checked((int)shape.Aggregate(1L, (a, b) => a * b)), pinned: true);
            bool norm = name.EndsWith("norm.weight", StringComparison.Ordinal);
            for (int i = 0; i < data.Length; i++)
            {
                // Sum of uniforms: cheap, roughly normal.
                float u = (float)(rng.NextDouble() + rng.NextDouble() + rng.NextDouble() - 1.5);
                data[i] = norm ? 1f + 0.1f * u : scale * 2f * u;
            }

            tensors.Add(new WeightTensor(name, shape, data));
        }

        return new ModelWeights(config, tensors);
    }
}
