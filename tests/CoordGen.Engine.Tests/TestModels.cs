using CoordGen.Engine.Generation;
using CoordGen.Engine.Model;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Speculative;
using CoordGen.Engine.Workloads;

namespace CoordGen.Engine.Tests;

/// <summary>Small random-weight models for graph tests, and checks the engine tests share.</summary>
internal static class TestModels
{
    public static ModelConfig Tiny(bool bias = false, bool tied = true, int kvHeads = 2) => new()
    {
        Architecture = bias ? "Qwen2ForCausalLM" : "LlamaForCausalLM",
        HiddenSize = 32,
        IntermediateSize = 48,
        NumLayers = 2,
        NumHeads = 4,
        NumKvHeads = kvHeads,
        HeadDim = 8,
        RmsNormEps = 1e-5f,
        RopeTheta = 5000f,
        VocabSize = 50,
        MaxPositionEmbeddings = 128,
        TieWordEmbeddings = tied,
        AttentionBias = bias,
        EosTokenIds = [1],
    };

    /// <summary>Feeds <paramref name="ids"/> through the width-W graph in causal chunks, calling <paramref name="check"/> with each position's logits.</summary>
    public static void RunChunked(OrtModelRuntime rt, int[] ids, int width, Action<int, float[]> check)
    {
        using var cache = rt.CreateCache();
        for (int start = 0; start < ids.Length; start += width)
        {
            int n = Math.Min(width, ids.Length - start);
            var buf = rt.Buffers(width, cache);
            buf.SetLinear(ids.AsSpan(start, n), start, cache.Length);
            rt.Run(width, cache);
            for (int i = 0; i < n; i++)
            {
                check(start + i, buf.LogitsRow(i).ToArray());
            }

            cache.Commit(buf.NewKeys, buf.NewValues, width, Enumerable.Range(0, n).ToArray());
        }
    }

    /// <summary>
    /// Speculative greedy output (sam+ours, width 8, fixed and/or adaptive width) equals plain greedy output on
    /// <paramref name="rt"/>, for the first two prompts of each of the four workload families.
    /// </summary>
    public static void AssertSpeculationLossless(ModelBundle demo, OrtModelRuntime rt, params bool[] adaptive)
    {
        var plain = new Generator(rt);
        var spec = new SpeculativeDecoder(rt);
        foreach (string task in new[] { "summary", "rag", "ui", "reply" })
        {
            foreach (var item in WorkloadItem.Load(Path.Combine(Paths.RepoRoot, "workloads", task + ".jsonl")).Take(2))
            {
                int[] prompt = demo.Tokenizer.Encode(PromptTemplate.Render(item.Context, item.Prompt, demo.HasRoleTokens));
                var a = plain.Generate(prompt, 48, new SamplingOptions(), demo.StopTokens);
                foreach (bool adapt in adaptive)
                {
                    using var pre = spec.Prefill(prompt, new CalibrationOptions());
                    var b = spec.Generate(pre, 48, new SamplingOptions(), demo.StopTokens, SpeculationOptions.ForMethod("sam+ours", 8) with { AdaptiveWidth = adapt });
                    Assert.Equal(a.Tokens, b.Tokens);
                }
            }
        }
    }

    public static void AssertClose(float[] expected, ReadOnlySpan<float> actual, double rel = 1e-4, string what = "")
    {
        Assert.Equal(expected.Length, actual.Length);
        double scale = expected.Max(v => Math.Abs(v)) + 1e-6;
        for (int i = 0; i < expected.Length; i++)
        {
            double err = Math.Abs(expected[i] - actual[i]) / scale;
            Assert.True(err <= rel, $"{what} element {i}: expected {expected[i]}, got {actual[i]} (relative error {err:E2} > {rel:E0})");
        }
    }
}
