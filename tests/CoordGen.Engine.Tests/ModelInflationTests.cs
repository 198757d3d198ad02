using System.Text.Json;
using CoordGen.Engine.Generation;
using CoordGen.Engine.Model;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Workloads;
using Xunit.Abstractions;

namespace CoordGen.Engine.Tests;

/// <summary>Function-preserving twins (ModelInflation, docs/decisions/0011): same logits, larger shape.</summary>
public class ModelInflationTests(ITestOutputHelper output)
{
    private static readonly Lazy<ModelBundle> Demo = new(() => ModelBundle.Load(Paths.DemoModel));

    /// <summary>Largest |twin - source| over a row, relative to the row's largest |logit|, allowed here; measured at most 1.5e-6 over the four catalog shapes and 1e-4 against PyTorch, as for the source.</summary>
    private const double Tolerance = 2e-5;

    [Theory]
    [InlineData("LlamaForCausalLM", 64, 96, 4, 9, 3, 16)]
    [InlineData("LlamaForCausalLM", 32, 40, 2, 4, 2, 8)]
    [InlineData("Qwen2ForCausalLM", 48, 40, 3, 8, 2, 24)]
    public void Twin_should_match_pytorch_logits_when_inflating_the_tiny_random_checkpoint(string arch, int hidden, int inter, int layers, int heads, int kv, int headDim)
    {
        string dir = Path.Combine(Paths.Vectors, "tiny-llama");
        var config = ModelConfig.Load(Path.Combine(dir, "config.json"));
        var twin = ModelInflation.Inflate(ModelWeights.Load(dir, config), new InflationTarget(arch, hidden, inter, layers, heads, kv, headDim), seed: 7);
        Assert.Equal(config.TieWordEmbeddings, twin.Config.TieWordEmbeddings);
        using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "vectors.json")));
        using var rt = new OrtModelRuntime(twin, capacity: 16, widths: [4]);
        foreach (var c in doc.RootElement.GetProperty("cases").EnumerateArray())
        {
            int[] ids = c.GetProperty("input_ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();
            var expected = c.GetProperty("logits").EnumerateArray().Select(r => r.EnumerateArray().Select(e => e.GetSingle()).ToArray()).ToArray();
            TestModels.RunChunked(rt, ids, 4, (pos, logits) => TestModels.AssertClose(expected[pos], logits, rel: 1e-4, what: $"{arch} twin, position {pos}"));
        }
    }

    public static TheoryData<string> CatalogShapes() => [.. ShapeCatalog.Shapes.Keys];

    [Theory]
    [MemberData(nameof(CatalogShapes))]
    public void Twin_should_compute_the_demo_models_logits_when_inflated_to_every_catalog_shape(string shape)
    {
        var demo = Demo.Value;
        var twin = ModelInflation.Inflate(demo.Weights, InflationTarget.FromShape(ShapeCatalog.Get(shape)));
        var target = ShapeCatalog.Shapes[shape];
        Assert.Equal((target.HiddenSize, target.NumLayers, target.NumHeads, target.HeadDim), (twin.Config.HiddenSize, twin.Config.NumLayers, twin.Config.NumHeads, twin.Config.HeadDim));
        Assert.Equal(demo.Config.VocabSize, twin.Config.VocabSize);
        Assert.Equal(target.ParameterCount - ((long)(target.VocabSize - demo.Config.VocabSize) * target.HiddenSize), twin.Config.ParameterCount);

        int[] ids = demo.Tokenizer.Encode(PromptTemplate.Render("The keeper lit the lamp every evening so that ships could find the harbour.", "Summarize the document.", demo.HasRoleTokens))[..24];
        var expected = new List<float[]>();
        using (var src = new OrtModelRuntime(demo.Weights, capacity: 32, widths: [8]))
        {
            TestModels.RunChunked(src, ids, 8, (_, row) => expected.Add(row));
        }

        using var rt = new OrtModelRuntime(twin, capacity: 32, widths: [8]);
        double worst = 0;
        TestModels.RunChunked(rt, ids, 8, (pos, row) =>
        {
            TestModels.AssertClose(expected[pos], row, rel: Tolerance, what: $"{shape} twin, position {pos}");
            Assert.Equal(Sampler.Argmax(expected[pos]), Sampler.Argmax(row));
            double scale = expected[pos].Max(Math.Abs);
            worst = Math.Max(worst, expected[pos].Zip(row.ToArray()).Max(p => Math.Abs(p.First - p.Second)) / scale);
        });
        output.WriteLine($"{shape}: largest relative logit difference {worst:E2}");
    }

    [Fact]
    public void Twin_greedy_output_should_equal_the_demo_models_when_generating_for_workload_prompts()
    {
        var demo = Demo.Value;
        var twin = ModelInflation.Inflate(demo.Weights, InflationTarget.FromShape(ShapeCatalog.Get("smollm2-135m")));
        using var srcRt = new OrtModelRuntime(demo.Weights, capacity: 1024, widths: [1, 64]);
        using var twinRt = new OrtModelRuntime(twin, capacity: 1024, widths: [1, 64]);
        int compared = 0;
        foreach (string task in new[] { "summary", "rag", "ui", "reply" })
        {
            // The two shortest prompts of each family keep the 108M-parameter prefill short; coordgen model
            // compare checks all 240 (docs/bench/twin-fidelity-*.md).
            var prompts = WorkloadItem.Load(Path.Combine(Paths.RepoRoot, "workloads", task + ".jsonl"))
                .Select(item => demo.Tokenizer.Encode(PromptTemplate.Render(item.Context, item.Prompt, demo.HasRoleTokens)))
                .OrderBy(p => p.Length).Take(2);
            foreach (int[] prompt in prompts)
            {
                var a = new Generator(srcRt).Generate(prompt, 24, new SamplingOptions(), demo.StopTokens);
                var b = new Generator(twinRt).Generate(prompt, 24, new SamplingOptions(), demo.StopTokens);
                Assert.Equal(a.Tokens, b.Tokens);
                compared++;
            }
        }

        Assert.Equal(8, compared);
    }

    [Fact]
    public void Twin_config_should_keep_the_sources_vocabulary_and_rope_and_scale_eps_by_h_over_H()
    {
        var source = Demo.Value.Config with { RopeScaling = new RopeScaling("llama3", 8, 1, 4, 1024) };
        var twin = ModelInflation.TwinConfig(source, InflationTarget.FromShape(ShapeCatalog.Get("qwen2.5-0.5b")));
        Assert.Equal(source.VocabSize, twin.VocabSize);
        Assert.Equal(source.RopeTheta, twin.RopeTheta);
        Assert.Equal(source.RopeScaling, twin.RopeScaling);
        Assert.Equal(source.RmsNormEps * 192.0 / 896.0, twin.RmsNormEps, 1e-12);
        Assert.True(twin.AttentionBias);

        // The inverse frequencies of twin pair r*j are the source's of pair j, bit for bit.
        var s = source.RopeInverseFrequencies();
        var t = twin.RopeInverseFrequencies();
        int r = twin.HeadDim / source.HeadDim;
        Assert.All(Enumerable.Range(0, s.Length), j => Assert.Equal(s[j], t[r * j]));
        var reloaded = ModelConfig.Parse(JsonDocument.Parse(twin.ToJson()).RootElement);
        Assert.Equal(twin.RopeScaling, reloaded.RopeScaling);
        Assert.Equal(twin.RmsNormEps, reloaded.RmsNormEps);
    }

    [Theory]
    [InlineData(96, 512, 6, 6, 2, 32, "hidden size 96 is smaller")]
    [InlineData(192, 256, 6, 6, 2, 32, "intermediate size 256 is smaller")]
    [InlineData(192, 512, 4, 6, 2, 32, "4 layers are fewer")]
    [InlineData(192, 512, 6, 6, 2, 48, "head dim 48 is not a multiple")]
    [InlineData(192, 512, 6, 6, 2, 16, "head dim 16 is not a multiple")]
    [InlineData(192, 512, 6, 3, 1, 32, "1 kv heads are fewer")]
    [InlineData(192, 512, 6, 6, 3, 32, "groups hold 2 heads per kv head, fewer than the source's 3")]
    [InlineData(192, 512, 6, 7, 2, 32, "7 query heads are not a multiple of 2")]
    public void Inflation_should_refuse_with_the_reason_when_the_target_cannot_hold_the_source(int hidden, int inter, int layers, int heads, int kv, int headDim, string reason)
    {
        var ex = Assert.Throws<InflationException>(() => ModelInflation.TwinConfig(Demo.Value.Config, new InflationTarget("LlamaForCausalLM", hidden, inter, layers, heads, kv, headDim)));
        Assert.Contains(reason, ex.Message, StringComparison.Ordinal);
        Assert.Contains("cannot inflate", ex.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Inflation_should_make_the_same_twin_when_given_the_same_seed()
    {
        var demo = Demo.Value;
        var target = new InflationTarget("LlamaForCausalLM", 256, 640, 7, 8, 2, 64);
        var a = ModelInflation.Inflate(demo.Weights, target, seed: 3);
        var b = ModelInflation.Inflate(demo.Weights, target, seed: 3);
        var c = ModelInflation.Inflate(demo.Weights, target, seed: 4);
        Assert.All(a.Tensors, t => Assert.Equal(t.Data, b[t.Name].Data));
        Assert.Contains(a.Tensors, t => !t.Data.AsSpan().SequenceEqual(c[t.Name].Data));
    }
}
