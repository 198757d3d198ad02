using CoordGen.Engine.Generation;
using CoordGen.Engine.Model;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Speculative;
using CoordGen.Engine.Workloads;
using Xunit.Abstractions;

namespace CoordGen.Engine.Tests;

/// <summary>Log-probabilities: exact log-softmax of the row that chose each token, the same under speculation as in plain decoding.</summary>
public class LogprobsTests(ITestOutputHelper output)
{
    private static readonly string[] Methods = ["pld", "sam", "sam+ours"];

    [Fact]
    public void Logprobs_should_be_the_log_softmax_of_the_row_with_the_likeliest_tokens_first()
    {
        float[] logits = [1f, 3f, 3f, -2f, 0.5f];
        var lp = TokenLogprobs.Of(logits, 4, 3);
        double z = Math.Log(logits.Sum(l => Math.Exp(l)));
        Assert.Equal(0.5 - z, lp.Logprob, 5);
        Assert.Equal([1, 2, 0], lp.Top.Select(t => t.Token)); // the tie goes to the lower id, as greedy decoding's
        Assert.Equal(3 - z, lp.Top[0].Logprob, 5);
        Assert.Equal(1.0, logits.Select((_, i) => Math.Exp(TokenLogprobs.Of(logits, i, 0).Logprob)).Sum(), 5);
        Assert.Empty(TokenLogprobs.Of(logits, 0, 0).Top);
        Assert.Equal(5, TokenLogprobs.Of(logits, 0, 20).Top.Length);
        Assert.Throws<ArgumentOutOfRangeException>(() => TokenLogprobs.Of(logits, 5, 1));
        Assert.Throws<ArgumentException>(() => new SamplingOptions { Logprobs = 21 }.Validate());
    }

    [Theory]
    [InlineData(0f)]
    [InlineData(0.8f)]
    public void Speculative_logprobs_should_equal_plain_logprobs_on_the_demo_model(float temperature)
    {
        var demo = ModelBundle.Load(Paths.DemoModel);
        using var rt = new OrtModelRuntime(demo.Weights, capacity: 2048, widths: [1, 64, 8]);
        var plain = new Generator(rt);
        var spec = new SpeculativeDecoder(rt);
        var sampling = new SamplingOptions { Temperature = temperature, Seed = 7, Logprobs = 5 };
        double worst = 0;
        int compared = 0;
        foreach (var task in new[] { "summary", "rag", "ui", "reply" })
        {
            foreach (var item in WorkloadItem.Load(Path.Combine(Paths.RepoRoot, "workloads", task + ".jsonl")).Take(2))
            {
                int[] prompt = demo.Tokenizer.Encode(PromptTemplate.Render(item.Context, item.Prompt));
                var expected = plain.Generate(prompt, 40, sampling, demo.StopTokens);
                Assert.NotNull(expected.Logprobs);
                Assert.Equal(expected.Tokens.Count, expected.Logprobs.Count);
                Assert.Equal(expected.Tokens, expected.Logprobs.Select(l => l.Token));
                foreach (var m in Methods)
                {
                    var got = spec.Generate(prompt, 40, sampling, demo.StopTokens, SpeculationOptions.ForMethod(m, 8) with { AdaptiveWidth = m == "sam" });
                    Assert.Equal(expected.Tokens, got.Tokens);
                    Assert.NotNull(got.Logprobs);
                    for (int i = 0; i < expected.Tokens.Count; i++)
                    {
                        var (e, g) = (expected.Logprobs[i], got.Logprobs[i]);
                        Assert.Equal(e.Token, g.Token);
                        worst = Math.Max(worst, Math.Abs(e.Logprob - g.Logprob));
                        Assert.Equal(5, g.Top.Length);
                        for (int k = 0; k < e.Top.Length; k++)
                        {
                            // Alternatives within float rounding of each other may swap places between graph widths.
                            if (e.Top[k].Token == g.Top[k].Token)
                            {
                                worst = Math.Max(worst, Math.Abs(e.Top[k].Logprob - g.Top[k].Logprob));
                            }
                            else
                            {
                                Assert.True(Math.Abs(e.Top[k].Logprob - g.Top[k].Logprob) < 1e-4, $"top {k} at {i}: {e.Top[k]} vs {g.Top[k]}");
                            }
                        }

                        compared++;
                    }
                }
            }
        }

        output.WriteLine($"{compared} tokens compared; largest difference {worst:E2}");
        Assert.True(worst < 1e-4, $"speculative logprobs differ from plain ones by up to {worst:E2}");
    }

    [Fact]
    public void Without_logprobs_asked_for_none_are_kept()
    {
        var weights = ModelWeights.Random(TestModels.Tiny(), seed: 3, scale: 0.25f);
        using var rt = new OrtModelRuntime(weights, capacity: 64, widths: [1, 8]);
        Assert.Null(new Generator(rt).Generate([1, 2, 3], 4, new SamplingOptions(), new HashSet<int>()).Logprobs);
        Assert.Null(new SpeculativeDecoder(rt).Generate([1, 2, 3], 4, new SamplingOptions(), new HashSet<int>(), SpeculationOptions.ForMethod("sam", 8)).Logprobs);
    }
}
