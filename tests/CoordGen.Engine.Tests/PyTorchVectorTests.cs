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
            int caseIndex = checkedCases;
            TestModels.RunChunked(rt, ids, 4, (pos, logits) => TestModels.AssertClose(expected[pos], logits, what: $"case {caseIndex} position {pos}"));
            checkedCases++;
        }

        Assert.Equal(3, checkedCases);
    }
}
