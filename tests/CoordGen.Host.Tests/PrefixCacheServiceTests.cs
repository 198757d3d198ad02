using Akka.Actor;
using CoordGen.Engine;
using CoordGen.Engine.Model;
using CoordGen.Engine.Workloads;
using CoordGen.Messages;
using Microsoft.Extensions.AI;
using static CoordGen.Messages.GenerationProtocol;

namespace CoordGen.Host.Tests;

/// <summary>
/// The prefix cache through the whole runtime (real actors, the demo model): outputs with it equal outputs
/// without it, it reports what it reused, it stays within the KV budget, and bad input leaves it consistent.
/// </summary>
public class PrefixCacheServiceTests
{
    private static readonly Lazy<ModelBundle> Demo = new(() => ModelBundle.Load(Path.Combine(ServerProcess.RepoRoot, "models", "coordgen-demo")));

    // No warm-up: these tests count the cache's hits, evictions and reused tokens from an empty start.
    private static InferenceService Start(bool cache, int kvBudgetMb = 64, int capacity = 2048) =>
        InferenceService.Start(Demo.Value, new CoordGenOptions { Capacity = capacity, KvBudgetMb = kvBudgetMb, PrefixCache = cache, MaxPending = 32, WarmUp = false });

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

    [Fact]
    public async Task In_prompt_store_should_be_prefilled_once_stay_pinned_under_pressure_and_give_the_text_of_its_documents_in_a_system_message()
    {
        var items = Workload("rag-shared", 67);
        var byDoc = items.GroupBy(w => w.Context!).OrderByDescending(g => g.Count()).ToList();
        string doc = byDoc[0].Key;
        var questions = byDoc[0].Take(3).Select(w => w.Prompt).ToList();
        var others = byDoc.Skip(1).Select(g => g.First()).Take(5).Select(Encode).ToList();
        ChatOptions Options(string? store) => new() { MaxOutputTokens = 32, AdditionalProperties = store is null ? null : new() { ["context_store"] = store } };

        // Without the cache, the document sent as a system message: what the model says when it reads it.
        var expected = new List<string>();
        await using (var off = Start(cache: false))
        {
            IChatClient plain = new CoordGenChatClient(off);
            foreach (var q in questions)
            {
                expected.Add((await plain.GetResponseAsync([new(ChatRole.System, doc), new(ChatRole.User, q)], Options(null))).Text);
            }
        }

        // A budget that holds one session's cache and room for about two documents' rows beside it.
        await using var on = Start(cache: true, kvBudgetMb: 12);
        Assert.IsType<ContextStoreProtocol.StoreInfo>(await on.AskAsync(new ContextStoreProtocol.CreateStore("manual", InPrompt: true)));
        Assert.IsType<ContextStoreProtocol.StoreInfo>(await on.AskAsync(new ContextStoreProtocol.AddDocument("manual", TokenSequence.From(on.Encode(doc)))));
        Assert.Equal(doc, (await on.StoreContextAsync("manual"))!.Text); // the model reads exactly the document

        var prefill = await on.PrefillStoreAsync("manual", CancellationToken.None);
        Assert.Equal(0, prefill.CachedTokens);
        var stats = await Stats(on);
        Assert.Equal(prefill.PromptTokens / 32, stats.PinnedBlocks);
        Assert.True((await on.PrefillStoreAsync("manual", CancellationToken.None)).CachedTokens >= prefill.PromptTokens - 32); // prefilled once

        // Other documents' prompts fill the cache past its room: they evict each other, never the store's rows.
        foreach (var p in others)
        {
            await Run(on, p, new Sampling(), "sam+ours", 8);
        }

        stats = await Stats(on);
        Assert.True(stats.Evictions > 0, "the other documents did not press the budget");
        Assert.Equal(prefill.PromptTokens / 32, stats.PinnedBlocks);

        IChatClient client = new CoordGenChatClient(on);
        for (int i = 0; i < questions.Count; i++)
        {
            var got = await client.GetResponseAsync([new(ChatRole.User, questions[i])], Options("manual"));
            Assert.Equal(expected[i], got.Text);
        }

        stats = await Stats(on);
        Assert.True(stats.TokensReused >= (long)questions.Count * stats.PinnedBlocks * 32, $"the questions reused {stats.TokensReused} tokens");
    }

    [Fact]
    public async Task A_store_deleted_while_a_request_reads_it_should_change_nothing_for_that_request_and_leave_the_cache_consistent()
    {
        var byDoc = Workload("rag-shared", 67).GroupBy(w => w.Context!).ToList();
        var (a, b) = (byDoc[0], byDoc[1]);
        ChatOptions Options(string? store, int max = 48) => new() { MaxOutputTokens = max, AdditionalProperties = store is null ? null : new() { ["context_store"] = store } };
        string expectA, expectB;
        await using (var off = Start(cache: false))
        {
            IChatClient plain = new CoordGenChatClient(off);
            expectA = (await plain.GetResponseAsync([new(ChatRole.System, a.Key), new(ChatRole.User, a.First().Prompt)], Options(null))).Text;
            expectB = (await plain.GetResponseAsync([new(ChatRole.System, b.Key), new(ChatRole.User, b.First().Prompt)], Options(null))).Text;
        }

        await using var on = Start(cache: true);
        IChatClient client = new CoordGenChatClient(on);
        await on.AskAsync(new ContextStoreProtocol.CreateStore("docs", InPrompt: true));
        await on.AskAsync(new ContextStoreProtocol.AddDocument("docs", TokenSequence.From(on.Encode(a.Key))));

        // Delete the store once the answer has begun: the request keeps what it started with.
        var text = new System.Text.StringBuilder();
        object? deleted = null;
        await foreach (var update in client.GetStreamingResponseAsync([new(ChatRole.User, a.First().Prompt)], Options("docs")))
        {
            text.Append(update.Text);
            deleted ??= await on.AskAsync(new ContextStoreProtocol.DeleteStore("docs"));
        }

        Assert.IsType<ContextStoreProtocol.StoreDeleted>(deleted);
        Assert.Equal(expectA, text.ToString());
        Assert.Equal(0, (await Stats(on)).PinnedBlocks);

        // Later requests that name it get a clear error; deleting it again too.
        var missing = await Assert.ThrowsAsync<ApiException>(() => client.GetResponseAsync([new(ChatRole.User, a.First().Prompt)], Options("docs")));
        Assert.Equal(404, missing.Status);
        Assert.Contains("create it with POST /v1/context_stores", missing.Message);
        Assert.IsType<ContextStoreProtocol.StoreMissing>(await on.AskAsync(new ContextStoreProtocol.DeleteStore("docs")));

        // The same name with another document: its answer, not the old document's rows.
        await on.AskAsync(new ContextStoreProtocol.CreateStore("docs", InPrompt: true));
        await on.AskAsync(new ContextStoreProtocol.AddDocument("docs", TokenSequence.From(on.Encode(b.Key))));
        Assert.Equal(expectB, (await client.GetResponseAsync([new(ChatRole.User, b.First().Prompt)], Options("docs"))).Text);
        Assert.True((await Stats(on)).PinnedBlocks > 0);

        // A drafting-only store of that name cannot replace an in-prompt one silently.
        var conflict = Assert.IsType<ContextStoreProtocol.StoreRefused>(await on.AskAsync(new ContextStoreProtocol.CreateStore("docs")));
        Assert.Contains("delete it first", conflict.Reason);
    }

    private static async Task<DiagnosticsProtocol.PrefixCacheStats> Stats(InferenceService s) =>
        await (await s.SelectDevice()).Ask<DiagnosticsProtocol.PrefixCacheStats>(DiagnosticsProtocol.GetPrefixCache.Instance, TimeSpan.FromSeconds(10));
}
