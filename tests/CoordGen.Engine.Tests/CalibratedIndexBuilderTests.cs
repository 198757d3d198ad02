using CoordGen.Engine.Speculative;

namespace CoordGen.Engine.Tests;

/// <summary>The calibrated index built in slices (as the calibrator does beside busy device steps) equals the one built at once.</summary>
public class CalibratedIndexBuilderTests
{
    private const int Vocab = 24;

    private static (int[] Context, PrefillTopK TopK) Prefill(int length, int seed)
    {
        var rng = new Random(seed);
        int[] context = [.. Enumerable.Range(0, length).Select(_ => rng.Next(Vocab))];
        var logits = new float[length * Vocab];
        for (int p = 0; p < length; p++)
        {
            for (int v = 0; v < Vocab; v++)
            {
                logits[(p * Vocab) + v] = (float)rng.NextDouble();
            }

            // Mostly the verbatim next token, sometimes another, so paths both follow and leave the context.
            int next = p + 1 < length ? context[p + 1] : 0;
            logits[(p * Vocab) + ((next + (p % 4 == 0 ? 3 : 0)) % Vocab)] += 5;
        }

        var topK = new PrefillTopK(new CalibrationOptions().TopK);
        topK.AddRows(logits, Vocab);
        return (context, topK);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(7)]
    [InlineData(64)]
    public void Sliced_build_should_write_the_same_index_as_a_whole_build(int slice)
    {
        var (context, topK) = Prefill(300, 4);
        var options = new CalibrationOptions();
        var whole = CalibratedIndex.Build(context, topK, options);

        var builder = new CalibratedIndex.Builder(context, topK, options);
        int calls = 1;
        while (!builder.Advance(slice))
        {
            calls++;
        }

        var sliced = builder.Result();
        Assert.True(whole.Paths > 10, "the test's logits should make calibrated paths");
        Assert.Equal(whole.Paths, sliced.Paths);
        Assert.Equal(whole.Automaton.Text, sliced.Automaton.Text);
        Assert.Equal((300 + slice - 1) / slice, calls);
        Assert.Equal(300, builder.Done);
    }

    [Fact]
    public void An_unfinished_build_should_refuse_to_give_its_index()
    {
        var (context, topK) = Prefill(50, 6);
        var builder = new CalibratedIndex.Builder(context, topK, new CalibrationOptions());
        Assert.False(builder.Advance(10));
        var ex = Assert.Throws<InvalidOperationException>(builder.Result);
        Assert.Contains("10 of 50", ex.Message);
    }
}
