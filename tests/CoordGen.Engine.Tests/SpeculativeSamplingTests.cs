using CoordGen.Engine.Generation;
using CoordGen.Engine.Model;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Speculative;

namespace CoordGen.Engine.Tests;

/// <summary>Speculative sampling keeps the model's distribution (and, per seed, its exact draws).</summary>
public class SpeculativeSamplingTests
{
    private static readonly int[] Prompt = [3, 4, 5, 6, 3, 4, 5, 6, 3, 4];

    private static (Generator Plain, SpeculativeDecoder Spec, OrtModelRuntime Rt) Setup()
    {
        var weights = ModelWeights.Random(TestModels.Tiny(), seed: 42, scale: 0.25f);
        var rt = new OrtModelRuntime(weights, capacity: 48, widths: [1, 8]);
        return (new Generator(rt), new SpeculativeDecoder(rt), rt);
    }

    [Fact]
    public void Speculative_sampling_should_reproduce_plain_sampling_when_the_seed_is_the_same()
    {
        var (plain, spec, rt) = Setup();
        using (rt)
        {
            for (int seed = 0; seed < 20; seed++)
            {
                var s = new SamplingOptions { Temperature = 0.8f, TopP = 0.95f, Seed = seed };
                var a = plain.Generate(Prompt, 16, s, new HashSet<int>()).Tokens;
                var b = spec.Generate(Prompt, 16, s, new HashSet<int>(), SpeculationOptions.ForMethod("sam+ours", 8)).Tokens;
                Assert.Equal(a, b);
            }
        }
    }

    [Fact]
    public void Speculative_sampling_should_match_the_plain_token_distribution_under_a_chi_square_test()
    {
        var (plain, spec, rt) = Setup();
        using (rt)
        {
            const int n = 600;
            const int position = 3; // the 4th generated token depends on three sampled ones before it
            var plainCounts = new Dictionary<int, int>();
            var specCounts = new Dictionary<int, int>();
            for (int i = 0; i < n; i++)
            {
                var a = plain.Generate(Prompt, position + 1, new SamplingOptions { Temperature = 1f, Seed = i }, new HashSet<int>()).Tokens;
                var b = spec.Generate(Prompt, position + 1, new SamplingOptions { Temperature = 1f, Seed = 1_000_000 + i }, new HashSet<int>(), SpeculationOptions.ForMethod("sam+ours", 8)).Tokens;
                plainCounts[a[position]] = plainCounts.GetValueOrDefault(a[position]) + 1;
                specCounts[b[position]] = specCounts.GetValueOrDefault(b[position]) + 1;
            }

            // Two-sample chi-square homogeneity test; categories with few counts are pooled.
            var cats = plainCounts.Keys.Union(specCounts.Keys).ToList();
            var big = cats.Where(c => plainCounts.GetValueOrDefault(c) + specCounts.GetValueOrDefault(c) >= 20).ToList();
            var rows = big.Select(c => (plainCounts.GetValueOrDefault(c), specCounts.GetValueOrDefault(c))).ToList();
            rows.Add((cats.Except(big).Sum(c => plainCounts.GetValueOrDefault(c)), cats.Except(big).Sum(c => specCounts.GetValueOrDefault(c))));
            rows.RemoveAll(r => r.Item1 + r.Item2 == 0);
            double chi = 0;
            foreach (var (p, s) in rows)
            {
                double e = (p + s) / 2.0;
                chi += ((p - e) * (p - e) / e) + ((s - e) * (s - e) / e);
            }

            int dof = rows.Count - 1;
            Assert.True(dof >= 2, $"too few categories ({rows.Count}) for a meaningful test");
            // Critical value at p = 0.001 (Wilson-Hilferty approximation).
            double z = 3.09, k = dof;
            double critical = k * Math.Pow(1 - (2 / (9 * k)) + (z * Math.Sqrt(2 / (9 * k))), 3);
            Assert.True(chi < critical, $"chi-square {chi:F1} over {dof} dof exceeds {critical:F1}");
        }
    }
}
