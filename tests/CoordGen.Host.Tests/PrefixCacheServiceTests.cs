using Akka.Actor;
using CoordGen.Engine;
using CoordGen.Engine.Model;
using CoordGen.Engine.Workloads;
using static CoordGen.Messages.GenerationProtocol;

namespace CoordGen.Host.Tests;

/// <summary>
/// The prefix cache through the whole runtime (real actors, the demo model): outputs with it equal outputs
/// without it, it reports what it reused, it stays within the KV budget, and bad input leaves it consistent.
/// </summary>
public class PrefixCacheServiceTests
{
    private static readonly Lazy<ModelBundle> Demo = new(() => ModelBundle.Load(Path.Combine(ServerProcess.RepoRoot, "models", "coordgen-demo")));

    private static InferenceService Start(bool cache, int kvBudgetMb = 64, int capacity = 2048) =>
        InferenceService.Start(Demo.Value, new CoordGenOptions { Capacity = capacity, KvBudgetMb = kvBudgetMb, PrefixCache = cache, MaxPending = 32 });

    private static int[] Encode(WorkloadItem w) => Demo.Value.Tokenizer.Encode(PromptTemplate.Render(w.Context, w.Prompt, Demo.Value.HasRoleTokens));

    private static IReadOnlyList<WorkloadItem> Workload(string name, int take) =>
        [.. WorkloadItem.Load(Path.Combine(ServerProcess.RepoRoot, "workloads", name + ".jsonl")).Take(take)];

    private static Task<InferenceOutcome> Run(InferenceService s, int[] prompt, Sampling sampling, string method, int maxTokens = 48) =>
        s.RunAsync(new InferenceRequest(prompt, maxTokens, sampling, [], Method: method), _ => Task.CompletedTask, CancellationToken.None);

    [Theory]
    [InlineData("sam+ours", false)]
    [InlineData("sam+ours", true)]
    [InlineData("ar", false)]
    public async Task Outputs_should_equal_outputs_without_the_cache_on_shared_and_unshared_workloads(string method, bool sampled)
    {
        // Chat turns in order (each carries the history), several questions per document, and the four old
        // workloads: every prompt's text must be the same with the cache as without it.
        var prompts = Workload("chat", 13).Concat(Workload("rag-shared", 12))
            .Concat(new[] { "summary", "rag", "ui", "reply" }.SelectMany(t => Workload(t, 2))).Select(Encode).ToList();
        var sampling = sampled ? new Sampling(0.8f, 0, 0.95f, 11) : new Sampling();
        var off = new List<string>();
        await using (var s = Start(cache: false))
        {
            foreach (var p in prompts)
            {
                var o = await Run(s, p, sampling, method);
                Assert.Equal(0, o.CachedTokens);
                off.Add(o.Text);
            }
        }

        await using var on = Start(cache: true);
        int cached = 0;
        for (int i = 0; i < prompts.Count; i++)
        {
            var o = await Run(on, prompts[i], sampling, method);
            Assert.True(off[i] == o.Text, $"prompt {i} ({method}, sampled {sampled}) differs with the cache:\n{off[i]}\n---\n{o.Text}");
            Assert.True(o.CachedTokens < prompts[i].Length);
            cached += o.CachedTokens;
        }

        // Chat turns after the first and the repeated documents reuse most of their prompts.
        Assert.True(cached > prompts.Take(25).Sum(p => p.Length) / 2, $"only {cached} prompt tokens came from the cache");
    }

    [Fact]
    public async Task Concurrent_sessions_under_a_tight_budget_should_lose_nothing_and_change_nothing()
    {
        // 7 MiB holds one 6.3 MiB session cache at capacity 2048 and about 230 tokens of cached prefix: sessions
        // wait for each other, the cache is trimmed as they start, and every output is what it is without it.
        var prompts = Workload("rag-shared", 10).Select(Encode).ToList();
        string[] expected;
        await using (var s = Start(cache: false))
        {
            expected = await Task.WhenAll(prompts.Select(async p => (await Run(s, p, new Sampling(), "sam+ours", 24)).Text));
        }

        await using var tight = Start(cache: true, kvBudgetMb: 7);
        var outcomes = await Task.WhenAll(prompts.Select(p => Run(tight, p, new Sampling(), "sam+ours", 24)));
        Assert.Equal(expected, outcomes.Select(o => o.Text));

        // Every insert ran beside at least its own session's cache: the prefix cache holds at most the rest.
        var device = await tight.SelectDevice();
        var stats = await device.Ask<Messages.DiagnosticsProtocol.PrefixCacheStats>(Messages.DiagnosticsProtocol.GetPrefixCache.Instance, TimeSpan.FromSeconds(10));
        long sessionBytes = Engine.Runtime.KvCache.BytesFor(6, 2, 32, 2048);
        Assert.True(stats.Bytes <= (7L << 20) - sessionBytes, $"the prefix cache holds {stats.Bytes} bytes; the room beside one session is {(7L << 20) - sessionBytes}");
        Assert.True(stats.Evictions > 0 && stats.Hits > 0, $"the budget was not tight enough to evict ({stats.Evictions}) or nothing was reused ({stats.Hits})");

        // And again, now that the cache is warm: the same text, some of it reused.
        var again = await Task.WhenAll(prompts.Select(p => Run(tight, p, new Sampling(), "sam+ours", 24)));
        Assert.Equal(expected, again.Select(o => o.Text));
    }

    [Fact]
    public async Task Bad_input_should_get_clear_errors_or_correct_output_and_leave_the_cache_consistent()
    {
        var rag = Workload("rag-shared", 1)[0];
        int[] prompt = Encode(rag);
        await using var off = Start(cache: false);
        await using var on = Start(cache: true);
        var first = await Run(on, prompt, new Sampling(), "sam+ours");
        Assert.Equal((await Run(off, prompt, new Sampling(), "sam+ours")).Text, first.Text);

        // The same prompt but its last token: the cache serves all but the last block, the rest is prefilled.
        int[] lastDiffers = [.. prompt[..^1], prompt[^1] == 5 ? 6 : 5];
        var o = await Run(on, lastDiffers, new Sampling(), "sam+ours");
        Assert.True(o.CachedTokens > 0 && o.CachedTokens < prompt.Length);
        Assert.Equal((await Run(off, lastDiffers, new Sampling(), "sam+ours")).Text, o.Text);

        // A prompt that is exactly a cached prefix: one token is still prefilled, for its logits.
        int[] exact = prompt[..(prompt.Length / 32 * 32)];
        o = await Run(on, exact, new Sampling(), "ar");
        Assert.Equal(exact.Length - 32, o.CachedTokens);
        Assert.Equal((await Run(off, exact, new Sampling(), "ar")).Text, o.Text);

        // An empty prompt and one longer than the context: clear errors that say what to do.
        var empty = await Assert.ThrowsAnyAsync<Exception>(() => Run(on, [], new Sampling(), "sam+ours"));
        Assert.Contains("empty", empty.Message);
        int[] tooLong = [.. prompt, .. prompt];
        var longEx = await Assert.ThrowsAsync<ApiException>(() => Run(on, tooLong, new Sampling(), "sam+ours"));
        Assert.Contains("shorten the prompt", longEx.Message, StringComparison.OrdinalIgnoreCase);

        // The cache is consistent afterwards: the first prompt still gives its text, reusing its blocks.
        var after = await Run(on, prompt, new Sampling(), "sam+ours");
        Assert.Equal(first.Text, after.Text);
        Assert.Equal(prompt.Length - 1 - ((prompt.Length - 1) % 32), after.CachedTokens);
    }
}
