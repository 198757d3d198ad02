using CoordGen.Engine.Generation;

namespace CoordGen.Engine.Tests;

public class SamplerTests
{
    private static readonly float[] Logits = [0.1f, 2.0f, 1.5f, -1f, 1.9f];

    [Fact]
    public void Greedy_should_pick_the_argmax_when_temperature_is_zero()
    {
        Assert.Equal(1, new Sampler(new SamplingOptions()).Next(Logits));
    }

    [Fact]
    public void Sampling_should_repeat_when_the_seed_repeats()
    {
        var a = new Sampler(new SamplingOptions { Temperature = 1f, Seed = 42 });
        var b = new Sampler(new SamplingOptions { Temperature = 1f, Seed = 42 });
        var sa = Enumerable.Range(0, 50).Select(_ => a.Next(Logits)).ToArray();
        var sb = Enumerable.Range(0, 50).Select(_ => b.Next(Logits)).ToArray();
        Assert.Equal(sa, sb);
        Assert.True(sa.Distinct().Count() > 1);
    }

    [Fact]
    public void Top_k_should_only_return_the_k_most_likely_tokens()
    {
        var s = new Sampler(new SamplingOptions { Temperature = 2f, TopK = 2, Seed = 1 });
        var seen = Enumerable.Range(0, 300).Select(_ => s.Next(Logits)).ToHashSet();
        Assert.Subset(new HashSet<int> { 1, 4 }, seen);
    }

    [Fact]
    public void Top_p_should_keep_the_smallest_set_reaching_p()
    {
        var s = new Sampler(new SamplingOptions { Temperature = 1f, TopP = 0.5f, Seed = 1 });
        var d = s.Distribution(Logits);
        Assert.Equal(1f, d.Sum(), 3);
        Assert.Equal(0f, d[0]);
        Assert.Equal(0f, d[3]);
        Assert.True(d[1] > 0);
    }

    [Fact]
    public void Sampling_should_follow_the_softmax_when_no_filter_is_set()
    {
        var s = new Sampler(new SamplingOptions { Temperature = 1f, Seed = 7 });
        var counts = new int[Logits.Length];
        const int n = 20000;
        for (int i = 0; i < n; i++)
        {
            counts[s.Next(Logits)]++;
        }

        var p = s.Distribution(Logits);
        for (int i = 0; i < p.Length; i++)
        {
            Assert.InRange(counts[i] / (double)n, p[i] - 0.015, p[i] + 0.015);
        }
    }

    [Theory]
    [InlineData(-1f, 0, 1f)]
    [InlineData(0.5f, -3, 1f)]
    [InlineData(0.5f, 0, 0f)]
    [InlineData(0.5f, 0, 1.5f)]
    public void Options_should_reject_out_of_range_values(float t, int k, float p)
    {
        Assert.Throws<ArgumentException>(() => new Sampler(new SamplingOptions { Temperature = t, TopK = k, TopP = p }));
    }
}
