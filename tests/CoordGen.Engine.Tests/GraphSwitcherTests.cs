using CoordGen.Engine.Model;
using CoordGen.Engine.Runtime;

namespace CoordGen.Engine.Tests;

public class GraphSwitcherTests
{
    [Fact]
    public void Switching_back_during_prefill_should_keep_the_logits_and_end_with_one_variant_per_block()
    {
        var c = TestModels.Tiny(tied: false) with { NumLayers = 3 };
        var weights = ModelWeights.Random(c, seed: 5, scale: 0.4f);
        int[] ids = [.. Enumerable.Range(0, 40).Select(i => (i * 5 + 1) % c.VocabSize)];
        var expected = new Dictionary<int, float[]>();
        using (var rt = new OrtModelRuntime(weights, 64, [8]))
        {
            TestModels.RunChunked(rt, ids, 8, (pos, logits) => expected[pos] = logits);
        }

        const int wide = 8, narrow = 2;
        using var model = new BlockModel(weights, 64, 3);
        for (int b = 0; b < 3; b++)
        {
            model.Load(b, narrow);
        }

        // The previous request left every block on the narrow graph: ask for the wide one back, and
        // midway switch block 2 forward again (calling off its switch-back, done or not).
        using var switcher = new GraphSwitcher(model, [narrow, narrow, narrow]);
        for (int b = 0; b < 3; b++)
        {
            switcher.Request(b, wide);
        }

        using var cache = model.CreateCache();
        for (int start = 0, chunk = 0; start < ids.Length; start += wide, chunk++)
        {
            if (chunk == 3)
            {
                switcher.Request(2, narrow);
            }

            var logits = model.Run(cache, ids.AsSpan(start, wide), switcher.WidthOf, b => switcher.Apply(b, waitFor: narrow));
            TestModels.AssertClose(expected[start + wide - 1], logits, what: $"chunk {chunk}");
        }

        switcher.ApplyAll();
        Assert.True(switcher.Idle);
        Assert.Equal(narrow, switcher.WidthOf(2));
        for (int b = 0; b < 3; b++)
        {
            int other = switcher.WidthOf(b) == wide ? narrow : wide;
            Assert.True(model.IsLoaded(b, switcher.WidthOf(b)), $"block {b} lost its variant");
            Assert.False(model.IsLoaded(b, other), $"block {b} still holds width {other}");
        }
    }
}
