using CoordGen.Engine.Model;
using CoordGen.Engine.Runtime;

namespace CoordGen.Engine.Tests;

/// <summary>Small random-weight models for graph tests.</summary>
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
