using CoordGen.Engine.Model;
using CoordGen.Engine.Runtime;

namespace CoordGen.Engine.Tests;

public class BlockModelTests
{
    private static ModelConfig ThreeLayers() => TestModels.Tiny(tied: false) with { NumLayers = 3 };

    [Theory]
    [InlineData(1, 16, 16)]
    [InlineData(3, 16, 16)]
    [InlineData(3, 16, 4)]
    [InlineData(2, 8, 2)]
    public void Split_model_should_give_the_whole_graphs_logits_whatever_width_each_block_runs(int blocks, int wide, int narrow)
    {
        var c = ThreeLayers();
        var weights = ModelWeights.Random(c, seed: 9, scale: 0.4f);
        int[] ids = [.. Enumerable.Range(0, 37).Select(i => (i * 7 + 3) % c.VocabSize)];
        var expected = new Dictionary<int, float[]>();
        using (var rt = new OrtModelRuntime(weights, 64, [8]))
        {
            TestModels.RunChunked(rt, ids, 8, (pos, logits) => expected[pos] = logits);
        }

        using var model = new BlockModel(weights, 64, blocks);
        for (int b = 0; b < blocks; b++)
        {
            model.Load(b, wide);
            model.Load(b, narrow);
        }

        using var cache = model.CreateCache();
        for (int start = 0, chunk = 0; start < ids.Length; start += wide, chunk++)
        {
            int n = Math.Min(wide, ids.Length - start);
            // Chunk k switches its last k blocks to the narrow variant, as progressive scheduling does.
            int switched = chunk;
            var logits = model.Run(cache, ids.AsSpan(start, n), b => b >= blocks - switched ? narrow : wide);
            TestModels.AssertClose(expected[start + n - 1], logits, what: $"chunk {chunk}");
        }

        Assert.Equal(ids.Length, cache.Length);
    }

    [Fact]
    public void Run_should_refuse_a_block_whose_variant_is_not_loaded()
    {
        var c = ThreeLayers();
        using var model = new BlockModel(ModelWeights.Random(c, seed: 1, scale: 0.4f), 32, 3);
        model.Load(0, 4);
        using var cache = model.CreateCache();
        var ex = Assert.Throws<InvalidOperationException>(() => model.Run(cache, [1, 2, 3], _ => 4));
        Assert.Contains("block 1 has no loaded width-4 variant", ex.Message);
        model.Unload(0, 4);
        Assert.False(model.IsLoaded(0, 4));
    }
}
