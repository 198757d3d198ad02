using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Json.Serialization;
using Akka.Actor;
using CoordGen.Engine;
using CoordGen.Engine.Model;
using CoordGen.Engine.Workloads;
using CoordGen.Messages;
using Spectre.Console;

namespace CoordGen.Host.Commands;

/// <summary>One way of <c>coordgen bench prefix --stores</c> (pinned in-prompt stores, or the same prompts with least-recently-used caching only), summed over rounds.</summary>
internal sealed record StoreRow
{
    [JsonPropertyName("way")] public required string Way { get; init; }
    [JsonPropertyName("pinned")] public bool Pinned { get; init; }
    [JsonPropertyName("stores")] public int Stores { get; init; }
    [JsonPropertyName("kv_budget_mb")] public int KvBudgetMb { get; init; }
    [JsonPropertyName("store_questions")] public int StoreQuestions { get; init; }
    [JsonPropertyName("median_ttft_ms_store")] public double MedianTtftMsStore { get; init; }
    [JsonPropertyName("median_ttft_ms_other")] public double MedianTtftMsOther { get; init; }
    [JsonPropertyName("store_prompt_tokens")] public long StorePromptTokens { get; init; }
    [JsonPropertyName("store_cached_tokens")] public long StoreCachedTokens { get; init; }
    [JsonPropertyName("prefill_once_ms")] public double PrefillOnceMs { get; init; }
    [JsonPropertyName("evictions")] public long Evictions { get; init; }
    [JsonPropertyName("identical")] public bool Identical { get; init; }
    [JsonPropertyName("per_round")] public required double[] PerRound { get; init; }
}

/// <summary>
/// <c>coordgen bench prefix --stores</c>: documents an app names as in-prompt context stores, prefilled once
/// and pinned in the prefix cache, against the same prompts with the cache's least-recently-used order alone,
/// while one-off questions about other documents press a KV budget that holds one session and a few documents.
/// </summary>
internal static class BenchPrefixStores
{
    private const int OneOffsPerQuestion = 2;

    public static async Task<int> Run(ModelBundle bundle, string method, int stores, int rounds, int threads, WeightFormat weights, BenchStamp stamp, string dir, FileInfo? json, CancellationToken ct)
    {
        string root = ModelLocator.RepoRoot();
        var docs = WorkloadItem.Load(Path.Combine(root, "workloads", "rag-shared.jsonl")).GroupBy(w => w.Document).ToList();
        if (stores < 1 || stores >= docs.Count)
        {
            throw new ArgumentException($"--documents must be 1 to {docs.Count - 1} with --stores: the other documents of rag-shared.jsonl are the one-off traffic.");
        }

        var storeDocs = docs.Take(stores).ToList();
        string Text(int s) => storeDocs[s].First().Context ?? throw new InvalidDataException($"document {storeDocs[s].Key} of rag-shared.jsonl has no context text.");
        var others = docs.Skip(stores).Select(g => g.First()).ToList();
        if (others.Count < OneOffsPerQuestion * stores)
        {
            throw new ArgumentException($"--documents {stores} leaves {others.Count} other documents in rag-shared.jsonl for one-off traffic; use at most {docs.Count / (OneOffsPerQuestion + 1)}.");
        }

        int[] Encode(WorkloadItem w) => bundle.Tokenizer.Encode(PromptTemplate.Render(w.Context, w.Prompt, bundle.HasRoleTokens));

        // Room for one session's cache and the stores' documents plus one more: every one-off prompt evicts
        // what the least recently used order would evict, and the stores fit only when pinned.
        var c = bundle.Config;
        var options = new CoordGenOptions { Method = method, PrecompileAll = true, PrefixCache = true, Threads = threads, Weights = weights, MaxPending = 16 };
        long session = Engine.Runtime.KvCache.BytesFor(c.NumLayers, c.NumKvHeads, c.HeadDim, options.Capacity);
        long perToken = Engine.Runtime.KvCache.BytesFor(c.NumLayers, c.NumKvHeads, c.HeadDim, 1);
        long longest = docs.Max(g => (long)Encode(g.First()).Length);
        int budgetMb = (int)Math.Ceiling((session + ((stores + 1) * longest * perToken)) / 1048576.0);
        options.KvBudgetMb = budgetMb;

        await using var service = InferenceService.Start(bundle, options);
        var device = await service.SelectDevice();
        var rows = new Dictionary<bool, Way> { [false] = new(), [true] = new() };

        // Warm-up: the graphs these prompt lengths meet (nothing timed).
        foreach (var w in storeDocs.Take(1).SelectMany(g => g.Take(1)).Concat(others.Take(1)))
        {
            await service.RunAsync(new InferenceRequest(Encode(w), 8, new GenerationProtocol.Sampling(), [], Method: method), _ => Task.CompletedTask, ct);
        }

        await AnsiConsole.Progress().Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new ElapsedTimeColumn()).StartAsync(async progress =>
        {
            var bar = progress.AddTask("way x round", maxValue: rounds * 2);
            for (int round = 0; round < rounds; round++)
            {
                foreach (bool pinned in round % 2 == 0 ? new[] { false, true } : [true, false])
                {
                    var r = rows[pinned];
                    device.Tell(new DiagnosticsProtocol.SetPrefixCache(true)); // emptied before every pass
                    var before = await device.Ask<DiagnosticsProtocol.PrefixCacheStats>(DiagnosticsProtocol.GetPrefixCache.Instance, ct);
                    for (int s = 0; s < stores; s++)
                    {
                        await service.AskAsync(new ContextStoreProtocol.CreateStore($"doc{s}", InPrompt: pinned));
                        await service.AskAsync(new ContextStoreProtocol.AddDocument($"doc{s}", TokenSequence.From(bundle.Tokenizer.Encode(Text(s)))));
                    }

                    // Prefill once: through the API when pinned; the same prompt, unpinned, otherwise.
                    var sw = System.Diagnostics.Stopwatch.StartNew();
                    for (int s = 0; s < stores; s++)
                    {
                        if (pinned)
                        {
                            await service.PrefillStoreAsync($"doc{s}", ct);
                        }
                        else
                        {
                            int[] prefix = bundle.Tokenizer.Encode(PromptTemplate.ContextPrefix(Text(s), bundle.HasRoleTokens));
                            await service.RunAsync(new InferenceRequest(prefix, 1, new GenerationProtocol.Sampling(), [], ContextStore: $"doc{s}"), _ => Task.CompletedTask, ct);
                        }
                    }

                    r.PrefillMs += sw.Elapsed.TotalMilliseconds;
                    var ttfts = new List<double>();
                    var texts = new List<string>();
                    int next = 0;
                    for (int q = 0; q < storeDocs.Max(g => g.Count()); q++)
                    {
                        for (int s = 0; s < stores; s++)
                        {
                            var question = storeDocs[s].ElementAtOrDefault(q);
                            if (question is null)
                            {
                                continue;
                            }

                            var store = await service.StoreContextAsync($"doc{s}");
                            string text = RequestParser.RenderChat([("system", Text(s)), ("user", question.Prompt)], bundle.HasRoleTokens);
                            int[] prompt = bundle.Tokenizer.Encode(text);
                            var o = await service.RunAsync(new InferenceRequest(prompt, question.MaxTokens, new GenerationProtocol.Sampling(), [], Method: method, ContextStore: $"doc{s}")
                            {
                                KeepPrefix = store is null ? null : service.PinFor(store, PromptTemplate.ContextPrefix(store.Text, bundle.HasRoleTokens), prompt),
                            }, _ => Task.CompletedTask, ct);
                            ttfts.Add(o.TimeToFirstTokenMs ?? 0);
                            texts.Add(o.Text);
                            r.Prompt += prompt.Length;
                            r.Cached += o.CachedTokens;

                            // One-off traffic about other documents: two after each question, so a cycle through
                            // the stores meets three times as many documents as the budget holds beside them.
                            for (int k = 0; k < OneOffsPerQuestion; k++)
                            {
                                var other = others[next++ % others.Count];
                                var oo = await service.RunAsync(new InferenceRequest(Encode(other), other.MaxTokens, new GenerationProtocol.Sampling(), [], Method: method), _ => Task.CompletedTask, ct);
                                r.Other.Add(oo.TimeToFirstTokenMs ?? 0);
                            }
                        }
                    }

                    var after = await device.Ask<DiagnosticsProtocol.PrefixCacheStats>(DiagnosticsProtocol.GetPrefixCache.Instance, ct);
                    r.Evictions += after.Evictions - before.Evictions;
                    for (int s = 0; s < stores; s++)
                    {
                        await service.AskAsync(new ContextStoreProtocol.DeleteStore($"doc{s}"));
                    }

                    r.Store.AddRange(ttfts);
                    r.Headlines.Add(BenchPrefix.Median(ttfts));
                    r.Identical &= rows.Values.Where(x => x.Texts.Count > 0).All(x => x.Texts.SequenceEqual(texts));
                    if (r.Texts.Count == 0)
                    {
                        r.Texts.AddRange(texts);
                    }
                    bar.Increment(1);
                }
            }
        });

        var table = rows.OrderBy(kv => kv.Key).Select(kv => new StoreRow
        {
            Way = kv.Key ? "in-prompt stores, pinned" : "same prompts, LRU only",
            Pinned = kv.Key,
            Stores = stores,
            KvBudgetMb = budgetMb,
            StoreQuestions = kv.Value.Store.Count,
            MedianTtftMsStore = BenchPrefix.Median(kv.Value.Store),
            MedianTtftMsOther = BenchPrefix.Median(kv.Value.Other),
            StorePromptTokens = kv.Value.Prompt,
            StoreCachedTokens = kv.Value.Cached,
            PrefillOnceMs = Math.Round(kv.Value.PrefillMs, 1),
            Evictions = kv.Value.Evictions,
            Identical = kv.Value.Identical,
            PerRound = [.. kv.Value.Headlines],
        }).ToList();
        Write(table, stamp, bundle.Name, method, rounds, dir, json);
        return table.All(t => t.Identical) ? 0 : 1;
    }

    private sealed class Way
    {
        public readonly List<double> Store = [];
        public readonly List<double> Other = [];
        public readonly List<double> Headlines = [];
        public readonly List<string> Texts = [];
        public long Prompt;
        public long Cached;
        public double PrefillMs;
        public long Evictions;
        public bool Identical = true;
    }

    private static void Write(List<StoreRow> rows, BenchStamp stamp, string model, string method, int rounds, string dir, FileInfo? json)
    {
        Directory.CreateDirectory(dir);
        string stem = ReportStem.For("prefix-stores", model);
        string text = JsonSerializer.Serialize(rows, new JsonSerializerOptions { WriteIndented = true });
        File.WriteAllText(Path.Combine(dir, stem + ".json"), text);
        if (json is not null)
        {
            File.WriteAllText(json.FullName, text);
        }

        var (lru, pin) = (rows.First(r => !r.Pinned), rows.First(r => r.Pinned));
        var md = new StringBuilder();
        md.AppendLine("# In-prompt context stores under a tight KV budget (`coordgen bench prefix --stores`)").AppendLine();
        md.AppendLine(stamp.ToMarkdown()).AppendLine();
        md.AppendLine(CultureInfo.InvariantCulture, $"{pin.Stores} documents of workloads/rag-shared.jsonl are named context stores; their questions are asked one at a time, each followed by {OneOffsPerQuestion} one-off questions about other documents of the file. The KV budget ({pin.KvBudgetMb} MiB) holds one session's cache and the rows of {pin.Stores + 1} documents as long as the longest. **Pinned**: the stores are created with `in_prompt`, prefilled once through the API (`POST /v1/context_stores/{{name}}/prefill`), and their rows are evicted only after every other cached prefix. **LRU only**: the same prompts (the document as the context section) after the same warm-up prefill, with the prefix cache's least-recently-used order alone. The two ways take turns each round, the cache emptied before every pass; method `{method}` with adaptive width, greedy; {rounds} round(s). TTFT is from the request to its first token; store questions' texts are checked equal both ways.").AppendLine();
        md.AppendLine("| way | stores | KV budget MiB | store questions | median TTFT store questions ms | median TTFT one-off ms | store prompt tokens | from the cache | prefill once ms | evictions | identical | per round |").AppendLine("|---|---|---|---|---|---|---|---|---|---|---|---|");
        foreach (var r in rows)
        {
            md.AppendLine(CultureInfo.InvariantCulture, $"| {r.Way} | {r.Stores} | {r.KvBudgetMb} | {r.StoreQuestions} | {r.MedianTtftMsStore} | {r.MedianTtftMsOther} | {r.StorePromptTokens} | {r.StoreCachedTokens} | {r.PrefillOnceMs} | {r.Evictions} | {(r.Identical ? "yes" : "NO")} | {string.Join(", ", r.PerRound.Select(v => v.ToString(CultureInfo.InvariantCulture)))} |");
        }

        md.AppendLine().AppendLine(CultureInfo.InvariantCulture, $"- **Store questions' median TTFT {lru.MedianTtftMsStore / Math.Max(1e-9, pin.MedianTtftMsStore):F2}x lower with the stores pinned** ({lru.MedianTtftMsStore} -> {pin.MedianTtftMsStore} ms; per round LRU {string.Join(", ", lru.PerRound)}, pinned {string.Join(", ", pin.PerRound)}); {pin.StoreCachedTokens} of {pin.StorePromptTokens} store prompt tokens from the cache pinned, {lru.StoreCachedTokens} with LRU only; one-off questions {lru.MedianTtftMsOther} -> {pin.MedianTtftMsOther} ms.");
        File.WriteAllText(Path.Combine(dir, stem + ".md"), md.ToString());
        ConsoleUi.Err.MarkupLineInterpolated($"[green]wrote {dir}/{stem}.md[/]");
    }
}
