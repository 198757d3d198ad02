using System.Text.Json;
using CoordGen.Engine.Model;
using CoordGen.Engine.Runtime;

namespace CoordGen.Engine.Tests;

/// <summary>The compiled graphs against logits PyTorch computed (tools/train/refvectors.py).</summary>
public class PyTorchVectorTests
{
    [Fact]
    public void Compiled_graph_should_match_pytorch_logits_when_loading_the_tiny_random_checkpoint()
    {
        string dir = Path.Combine(Paths.Vectors, "tiny-llama");
        var config = ModelConfig.Load(Path.Combine(dir, "config.json"));
        Assert.False(config.TieWordEmbeddings);
        var weights = ModelWeights.Load(dir, config);
        using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "vectors.json")));
        using var rt = new OrtModelRuntime(weights, capacity: 16, widths: [4]);
        int checkedCases = 0;
        foreach (var c in doc.RootElement.GetProperty("cases").EnumerateArray())
        {
            int[] ids = c.GetProperty("input_ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();
            var expected = c.GetProperty("logits").EnumerateArray().Select(r => r.EnumerateArray().Select(e => e.GetSingle()).ToArray()).ToArray();
            using var cache = rt.CreateCache();
            var buf = rt.Buffers(4, cache);
            for (int start = 0; start < ids.Length; start += 4)
            {
                int n = Math.Min(4, ids.Length - start);
                buf.SetLinear(ids.AsSpan(start, n), start, cache.Length);
                rt.Run(4, cache);
                for (int i = 0; i < n; i++)
                {
                    TestModels.AssertClose(expected[start + i], buf.LogitsRow(i), what: $"case {checkedCases} position {start + i}");
                }

                cache.Commit(buf.NewKeys, buf.NewValues, 4, Enumerable.Range(0, n).ToArray());
            }

            checkedCases++;
        }

        Assert.Equal(3, checkedCases);
    }
}
