using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Json.Serialization;
using Akka.Actor;
using CoordGen.Engine;
using CoordGen.Engine.Workloads;
using CoordGen.Messages;
using ScottPlot;
using Spectre.Console;

namespace CoordGen.Host.Commands;

/// <summary>One (workload, prefix cache on/off) row of <c>coordgen bench prefix</c>, summed over rounds.</summary>
internal sealed record PrefixRow
{
    [JsonPropertyName("workload")] public required string Workload { get; init; }
    [JsonPropertyName("prefix_cache")] public bool PrefixCache { get; init; }
    [JsonPropertyName("sessions")] public int Sessions { get; init; }
    [JsonPropertyName("requests")] public int Requests { get; init; }

    /// <summary>Median time to first token of first turns (chat) or of every request (rag-shared).</summary>
    [JsonPropertyName("median_ttft_ms_first")] public double MedianTtftMsFirst { get; init; }

    /// <summary>Median time to first token of turns after the first (chat; 0 for rag-shared).</summary>
    [JsonPropertyName("median_ttft_ms_later")] public double MedianTtftMsLater { get; init; }
    [JsonPropertyName("aggregate_tokens_per_s")] public double AggregateTokensPerS { get; init; }
    [JsonPropertyName("prompt_tokens")] public long PromptTokens { get; init; }
    [JsonPropertyName("cached_tokens")] public long CachedTokens { get; init; }
    [JsonPropertyName("prefill_device_ms")] public double PrefillDeviceMs { get; init; }
    [JsonPropertyName("evictions")] public long Evictions { get; init; }
    [JsonPropertyName("cache_mib")] public double CacheMiB { get; init; }
    [JsonPropertyName("rss_mib")] public double RssMiB { get; init; }
    [JsonPropertyName("identical")] public bool Identical { get; init; }

    /// <summary>Every round's value of the row's headline (later-turn TTFT for chat, aggregate tokens/s for rag-shared): the spread.</summary>
    [JsonPropertyName("per_round")] public required double[] PerRound { get; init; }
}

/// <summary>
/// <c>coordgen bench prefix</c>: the prefix cache on and off side by side in one run, on the workloads
/// whose prompts share prefixes: chat turns (time to first token of turns after the first) and several
/// questions per document from concurrent sessions (aggregate tokens/s), with prefill tokens avoided,
/// the cache's memory and the process's RSS; every output checked equal with the cache and without.
/// </summary>
internal static class BenchPrefix
{
    public static Command Create()
    {
        var model = CommonOptions.Model();
        var conversations = new Option<int>("--conversations") { Description = "Chat conversations (workloads/chat.jsonl, 3-6 turns each), run one after another, turns in order.", DefaultValueFactory = _ => 8 };
        var documents = new Option<int>("--documents") { Description = "Documents of workloads/rag-shared.jsonl (4-8 questions each), asked by --sessions concurrent sessions.", DefaultValueFactory = _ => 4 };
        var sessions = new Option<int>("--sessions") { Description = "Concurrent sessions on rag-shared.", DefaultValueFactory = _ => 8 };
        var method = new Option<string>("--method") { Description = "Decoding method of every request (the server's default).", DefaultValueFactory = _ => "sam+ours" };
        var rounds = new Option<int>("--rounds") { Description = "Times each workload runs each way, the two ways taking turns (this shared machine drifts in speed); the rows sum the rounds and list each round's headline.", DefaultValueFactory = _ => 2 };
        var warmupRounds = new Option<int>("--warmup-rounds") { Description = "Untimed rounds before the timed ones, the same passes both ways (outputs still checked): on this machine a process took about three passes to reach its steady speed (JIT tiers, caches), which otherwise favours whichever way runs later.", DefaultValueFactory = _ => 1 };
        var kvBudget = new Option<int>("--kv-budget-mb") { Description = "KV memory budget (sessions' caches and the prefix cache together); lower it to see the cache evict under pressure.", DefaultValueFactory = _ => 1024 };
        var weights = CommonOptions.Weights();
        var threads = new Option<int>("--threads") { Description = "ONNX Runtime intra-op threads of the device; 0 = one per core.", DefaultValueFactory = _ => 0 };
        var json = new Option<FileInfo?>("--json") { Description = "Write the rows as JSON here too.", HelpName = "OUT.json" };
        var outDir = new Option<DirectoryInfo?>("--out") { Description = "Report folder (default docs/bench/ of the checkout).", HelpName = "DIR" };
        var checkAll = new Option<bool>("--check-all") { Description = "Instead of timing: generate every prompt of the six workloads (chat, rag-shared, summary, rag, ui, reply) with the cache off, then on (--sessions at once, in workload order), greedy and seeded sampling, and report how many are identical (prefix-identity.md)." };
        var stores = new Option<bool>("--stores") { Description = "Instead: --documents documents of rag-shared as in-prompt context stores, prefilled once and pinned, against the same prompts with least-recently-used caching alone, while one-off questions about the other documents press a KV budget sized to one session and --documents + 1 documents (prefix-stores.md)." };
        var cmd = new Command("prefix", "The prefix cache on and off, side by side in one run: time to first token of chat turns after the first, aggregate tokens/s of concurrent questions about shared documents, prefill tokens avoided, memory; outputs checked equal both ways.")
        {
            model, conversations, documents, sessions, method, rounds, warmupRounds, kvBudget, weights, threads, json, outDir, checkAll, stores,
        };
        cmd.SetAction(async (parse, ct) =>
        {
            int nConv = parse.GetValue(conversations), nDocs = parse.GetValue(documents), nSessions = parse.GetValue(sessions), nRounds = parse.GetValue(rounds);
            int nWarm = parse.GetValue(warmupRounds);
            if (nConv < 1 || nDocs < 1 || nSessions < 1 || nRounds < 1)
            {
                throw new ArgumentException("--conversations, --documents, --sessions and --rounds must be at least 1.");
            }

            if (nWarm < 0)
            {
                throw new ArgumentException($"--warmup-rounds must be 0 or more (got {nWarm}).");
            }

            var stamp = BenchStamp.Capture();
            var bundle = ConsoleUi.LoadModel(ModelLocator.Resolve(parse.GetValue(model)));
            string root = ModelLocator.RepoRoot(), m = parse.GetValue(method)!;
            if (parse.GetValue(checkAll))
            {
                return await CheckAll(bundle, m, nSessions, parse.GetValue(kvBudget), stamp, parse.GetValue(outDir)?.FullName ?? Path.Combine(root, "docs", "bench"), ct);
            }

            if (parse.GetValue(stores))
            {
                return await BenchPrefixStores.Run(bundle, m, nDocs, nRounds, parse.GetValue(threads), parse.GetValue(weights),
                    stamp, parse.GetValue(outDir)?.FullName ?? Path.Combine(root, "docs", "bench"), parse.GetValue(json), ct);
            }

            int[] Encode(WorkloadItem w) => bundle.Tokenizer.Encode(PromptTemplate.Render(w.Context, w.Prompt, bundle.HasRoleTokens));
            var chat = WorkloadItem.Load(Path.Combine(root, "workloads", "chat.jsonl")).GroupBy(w => w.Conversation).Take(nConv)
                .Select(g => g.Select(w => (Tokens: Encode(w), w.MaxTokens)).ToList()).ToList();
            var shared = WorkloadItem.Load(Path.Combine(root, "workloads", "rag-shared.jsonl")).GroupBy(w => w.Document).Take(nDocs)
                .SelectMany(g => g).Select(w => (Tokens: Encode(w), w.MaxTokens)).ToList();

            await using var service = InferenceService.Start(bundle, new CoordGenOptions
            {
                MaxPending = Math.Max(16, nSessions * 2), Method = m, PrecompileAll = true, PrefixCache = true,
                KvBudgetMb = parse.GetValue(kvBudget), Threads = parse.GetValue(threads), Weights = parse.GetValue(weights),
            });
            var device = await service.SelectDevice();

            // Warm-up: every graph a prompt of these lengths meets, cache off (nothing timed).
            device.Tell(new DiagnosticsProtocol.SetPrefixCache(false));
            await ConsoleUi.Err.Status().StartAsync("warm-up (cache off)", async _ =>
            {
                foreach (var (tokens, max) in chat.Select(c => c[^1]).Concat(shared.Take(2)))
                {
                    await BenchStreams.RunAsync(service.Supervisor, tokens, Math.Min(max, 16), m, 8, ct, adaptive: true);
                }
            });

            var points = new Dictionary<(string, bool), Point>();
            var outputs = new Dictionary<(string, bool), List<int[]>>();
            await AnsiConsole.Progress().Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new ElapsedTimeColumn()).StartAsync(async progress =>
            {
                var bar = progress.AddTask("workload x cache x round (warm-up first)", maxValue: (nWarm + nRounds) * 4);
                for (int round = -nWarm; round < nRounds; round++)
                {
                    // The two ways take turns, starting with a different one each round; warm-up rounds
                    // (negative) are checked but not timed.
                    bool[] order = int.IsEvenInteger(round) ? [false, true] : [true, false];
                    Point Row(string workload, bool on) => round < 0 ? new Point() : Get(points, (workload, on));
                    foreach (bool on in order)
                    {
                        var pt = Row("chat", on);
                        var outs = new List<int[]>();
                        var run = await Measure(service, device, on, async () =>
                        {
                            foreach (var conversation in chat)
                            {
                                for (int t = 0; t < conversation.Count; t++)
                                {
                                    var r = await Timed(service.Supervisor, conversation[t].Tokens, conversation[t].MaxTokens, m, ct);
                                    (t == 0 ? pt.FirstTtfts : pt.LaterTtfts).Add(r.TtftMs);
                                    pt.Tokens += r.Tokens.Length;
                                    pt.PromptTokens += conversation[t].Tokens.Length;
                                    outs.Add(r.Tokens);
                                }
                            }
                        });
                        pt.Add(run);
                        pt.Headlines.Add(Median([.. pt.LaterTtfts.Skip(pt.LaterTtfts.Count - chat.Sum(c => c.Count - 1))]));
                        Check(outputs, ("chat", on), outs, Get(points, ("chat", on))); // a warm-up round's mismatch marks the row too
                        bar.Increment(1);
                    }

                    foreach (bool on in order)
                    {
                        var pt = Row("rag-shared", on);
                        var outs = new int[shared.Count][];
                        int next = -1;
                        long tokens0 = pt.Tokens;
                        var run = await Measure(service, device, on, () => Task.WhenAll(Enumerable.Range(0, nSessions).Select(async _ =>
                        {
                            // Sessions take the questions in order, so questions about one document run close together.
                            for (int i = Interlocked.Increment(ref next); i < shared.Count; i = Interlocked.Increment(ref next))
                            {
                                var r = await Timed(service.Supervisor, shared[i].Tokens, shared[i].MaxTokens, m, ct);
                                lock (pt)
                                {
                                    pt.FirstTtfts.Add(r.TtftMs);
                                    pt.Tokens += r.Tokens.Length;
                                    pt.PromptTokens += shared[i].Tokens.Length;
                                }

                                outs[i] = r.Tokens;
                            }
                        })));
                        pt.Add(run);
                        pt.Headlines.Add(Math.Round((pt.Tokens - tokens0) / run.Seconds, 1));
                        Check(outputs, ("rag-shared", on), [.. outs], Get(points, ("rag-shared", on)));
                        bar.Increment(1);
                    }
                }
            });

            var rows = points.Select(kv => new PrefixRow
            {
                Workload = kv.Key.Item1,
                PrefixCache = kv.Key.Item2,
                Sessions = kv.Key.Item1 == "chat" ? 1 : nSessions,
                Requests = kv.Key.Item1 == "chat" ? chat.Sum(c => c.Count) : shared.Count,
                MedianTtftMsFirst = Median(kv.Value.FirstTtfts),
                MedianTtftMsLater = Median(kv.Value.LaterTtfts),
                AggregateTokensPerS = Math.Round(kv.Value.Tokens / kv.Value.Seconds, 1),
                PromptTokens = kv.Value.PromptTokens,
                CachedTokens = kv.Value.CachedTokens,
                PrefillDeviceMs = Math.Round(kv.Value.PrefillMs, 0),
                Evictions = kv.Value.Evictions,
                CacheMiB = Math.Round(kv.Value.CacheBytes / 1048576.0, 1),
                RssMiB = Math.Round(kv.Value.RssBytes / 1048576.0, 0),
                Identical = kv.Value.Identical,
                PerRound = [.. kv.Value.Headlines],
            }).OrderBy(r => r.Workload).ThenBy(r => r.PrefixCache).ToList();
            string name = bundle.Name + (parse.GetValue(weights) == Engine.Model.WeightFormat.F32 ? "" : "-" + Engine.Model.WeightQuantizer.Name(parse.GetValue(weights)));
            Write(rows, stamp, m, nRounds, nWarm, parse.GetValue(kvBudget), parse.GetValue(outDir)?.FullName ?? Path.Combine(root, "docs", "bench"), parse.GetValue(json), name);
            return rows.All(r => r.Identical) ? 0 : 1;
        });
        return cmd;
    }

    private sealed record IdentityRow(
        [property: JsonPropertyName("workload")] string Workload,
        [property: JsonPropertyName("sampling")] string Sampling,
        [property: JsonPropertyName("prompts")] int Prompts,
        [property: JsonPropertyName("identical")] int Identical,
        [property: JsonPropertyName("prompt_tokens")] long PromptTokens,
        [property: JsonPropertyName("cached_tokens")] long CachedTokens);

    /// <summary>Every prompt of the six workloads with the cache off and on, greedy and seeded sampling: are the outputs identical?</summary>
    private static async Task<int> CheckAll(Engine.Model.ModelBundle bundle, string method, int sessions, int kvBudgetMb, BenchStamp stamp, string dir, CancellationToken ct)
    {
        string root = ModelLocator.RepoRoot();
        string[] names = ["chat", "rag-shared", "summary", "rag", "ui", "reply"];
        var rows = new List<IdentityRow>();
        await using var service = InferenceService.Start(bundle, new CoordGenOptions { MaxPending = Math.Max(16, sessions * 2), Method = method, PrefixCache = true, KvBudgetMb = kvBudgetMb });
        var device = await service.SelectDevice();
        await AnsiConsole.Progress().Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new ElapsedTimeColumn()).StartAsync(async progress =>
        {
            var bar = progress.AddTask("workload x sampling x cache", maxValue: names.Length * 4);
            foreach (string name in names)
            {
                var items = WorkloadItem.Load(Path.Combine(root, "workloads", name + ".jsonl"));
                var prompts = items.Select(w => (Tokens: bundle.Tokenizer.Encode(PromptTemplate.Render(w.Context, w.Prompt, bundle.HasRoleTokens)), w.MaxTokens)).ToList();
                foreach (bool sampled in new[] { false, true })
                {
                    var outcomes = new Dictionary<bool, InferenceOutcome[]>();
                    foreach (bool on in new[] { false, true })
                    {
                        device.Tell(new DiagnosticsProtocol.SetPrefixCache(on));
                        var got = new InferenceOutcome[prompts.Count];
                        int next = -1;
                        await Task.WhenAll(Enumerable.Range(0, on ? sessions : 1).Select(async _ =>
                        {
                            // Sessions take the prompts in workload order: a chat's turns, a document's questions, close together.
                            for (int i = Interlocked.Increment(ref next); i < prompts.Count; i = Interlocked.Increment(ref next))
                            {
                                var sampling = sampled ? new GenerationProtocol.Sampling(0.8f, 0, 0.95f, 1000 + i) : new GenerationProtocol.Sampling();
                                got[i] = await service.RunAsync(new InferenceRequest(prompts[i].Tokens, prompts[i].MaxTokens, sampling, [], Method: method), _ => Task.CompletedTask, ct);
                            }
                        }));
                        outcomes[on] = got;
                        bar.Increment(1);
                    }

                    int same = outcomes[false].Zip(outcomes[true]).Count(p => p.First.Text == p.Second.Text && p.First.CompletionTokens == p.Second.CompletionTokens);
                    rows.Add(new IdentityRow(name, sampled ? "seeded, T=0.8, top-p 0.95" : "greedy", prompts.Count, same,
                        prompts.Sum(p => (long)p.Tokens.Length), outcomes[true].Sum(o => (long)o.CachedTokens)));
                }
            }
        });

        Directory.CreateDirectory(dir);
        string stem = ReportStem.For("prefix-identity", bundle.Name);
        File.WriteAllText(Path.Combine(dir, stem + ".json"), JsonSerializer.Serialize(rows, new JsonSerializerOptions { WriteIndented = true }));
        var md = new StringBuilder();
        md.AppendLine("# Prefix cache: identical outputs (`coordgen bench prefix --check-all`)").AppendLine();
        md.AppendLine(stamp.ToMarkdown()).AppendLine();
        md.AppendLine(CultureInfo.InvariantCulture, $"Every prompt of the six workloads, generated with the prefix cache off (one at a time) and then on ({sessions} sessions at once, taking the prompts in workload order, so a chat's turns and a document's questions run close together and reuse each other's blocks), method `{method}` with adaptive width, greedy and seeded sampling (temperature 0.8, top-p 0.95, seed 1000 + the prompt's index). An output counts as identical when its text and its token count are. KV budget {kvBudgetMb} MiB.").AppendLine();
        md.AppendLine("| workload | sampling | prompts | identical | prompt tokens | from the cache |").AppendLine("|---|---|---|---|---|---|");
        foreach (var r in rows)
        {
            md.AppendLine(CultureInfo.InvariantCulture, $"| {r.Workload} | {r.Sampling} | {r.Prompts} | {r.Identical} | {r.PromptTokens} | {r.CachedTokens} |");
        }

        md.AppendLine().AppendLine(CultureInfo.InvariantCulture, $"**{rows.Sum(r => r.Identical)} of {rows.Sum(r => r.Prompts)} outputs identical.**");
        File.WriteAllText(Path.Combine(dir, stem + ".md"), md.ToString());
        ConsoleUi.Err.MarkupLineInterpolated($"[green]wrote {dir}/{stem}.md[/]");
        return rows.All(r => r.Identical == r.Prompts) ? 0 : 1;
    }

    private sealed record TimedStream(int[] Tokens, double TtftMs);

    private sealed record RunTotals(double Seconds, double PrefillMs, long Cached, long Evictions, long CacheBytes);

    private sealed class Point
    {
        public readonly List<double> FirstTtfts = [];
        public readonly List<double> LaterTtfts = [];
        public readonly List<double> Headlines = [];
        public double Seconds;
        public double PrefillMs;
        public long Tokens;
        public long PromptTokens;
        public long CachedTokens;
        public long Evictions;
        public long CacheBytes;
        public long RssBytes;
        public bool Identical = true;

        public void Add(RunTotals r)
        {
            Seconds += r.Seconds;
            PrefillMs += r.PrefillMs;
            CachedTokens += r.Cached;
            Evictions += r.Evictions;
            CacheBytes = Math.Max(CacheBytes, r.CacheBytes);
            RssBytes = Math.Max(RssBytes, Environment.WorkingSet);
        }
    }

    private static Point Get(Dictionary<(string, bool), Point> points, (string, bool) key) =>
        points.TryGetValue(key, out var p) ? p : points[key] = new Point();

    /// <summary>Outputs of each way must equal those of the other way (and of earlier rounds).</summary>
    private static void Check(Dictionary<(string, bool), List<int[]>> outputs, (string Workload, bool On) key, List<int[]> outs, Point pt)
    {
        foreach (var other in new[] { key, (key.Workload, !key.On) })
        {
            if (outputs.TryGetValue(other, out var seen) && !seen.Zip(outs).All(p => p.First.AsSpan().SequenceEqual(p.Second)))
            {
                pt.Identical = false;
            }
        }

        outputs.TryAdd(key, outs);
    }

    /// <summary>Runs one workload pass with the cache on or off (emptied first), and reads what the device did meanwhile.</summary>
    private static async Task<RunTotals> Measure(InferenceService service, IActorRef device, bool on, Func<Task> pass)
    {
        device.Tell(new DiagnosticsProtocol.SetPrefixCache(on));
        var cacheBefore = await device.Ask<DiagnosticsProtocol.PrefixCacheStats>(DiagnosticsProtocol.GetPrefixCache.Instance);
        var before = await device.Ask<DiagnosticsProtocol.Overlap>(DiagnosticsProtocol.GetOverlap.Instance);
        var sw = Stopwatch.StartNew();
        await pass();
        double seconds = sw.Elapsed.TotalSeconds;
        var after = await device.Ask<DiagnosticsProtocol.Overlap>(DiagnosticsProtocol.GetOverlap.Instance);
        var cache = await device.Ask<DiagnosticsProtocol.PrefixCacheStats>(DiagnosticsProtocol.GetPrefixCache.Instance);
        return new RunTotals(seconds, after.PrefillMs - before.PrefillMs, cache.TokensReused - cacheBefore.TokensReused, cache.Evictions - cacheBefore.Evictions, cache.Bytes);
    }

    private static async Task<TimedStream> Timed(IActorRef supervisor, int[] prompt, int maxTokens, string method, CancellationToken ct)
    {
        long start = Stopwatch.GetTimestamp();
        var (tokens, arrivals) = await BenchStreams.RunAsync(supervisor, prompt, maxTokens, method, 8, ct, adaptive: true);
        return new TimedStream(tokens, arrivals.Length == 0 ? 0 : Stopwatch.GetElapsedTime(start, arrivals[0]).TotalMilliseconds);
    }

    internal static double Median(List<double> xs)
    {
        if (xs.Count == 0)
        {
            return 0;
        }

        var s = xs.Order().ToList();
        return Math.Round(s.Count % 2 == 1 ? s[s.Count / 2] : (s[(s.Count / 2) - 1] + s[s.Count / 2]) / 2, 1);
    }

    private static void Write(List<PrefixRow> rows, BenchStamp stamp, string method, int rounds, int warmup, int kvBudgetMb, string dir, FileInfo? json, string model)
    {
        Directory.CreateDirectory(dir);
        // A budget other than the server's default names the report after it (prefix-kv20mb.md), beside the default's.
        string stem = ReportStem.For(kvBudgetMb == new CoordGenOptions().KvBudgetMb ? "prefix" : $"prefix-kv{kvBudgetMb}mb", model);
        string text = JsonSerializer.Serialize(rows, new JsonSerializerOptions { WriteIndented = true });
        File.WriteAllText(Path.Combine(dir, stem + ".json"), text);
        if (json is not null)
        {
            File.WriteAllText(json.FullName, text);
        }

        Plot(rows, Path.Combine(dir, stem + ".png"));
        var md = new StringBuilder();
        md.AppendLine("# Prefix cache (`coordgen bench prefix`)").AppendLine();
        md.AppendLine(stamp.ToMarkdown()).AppendLine();
        md.AppendLine(CultureInfo.InvariantCulture, $"The prefix cache on and off on one loaded model, side by side: each way runs each workload {rounds} time(s) after {warmup} untimed warm-up round(s) of the same passes, the two ways taking turns and starting with a different one each round, and the cache is emptied before every pass (a pass reuses only what it prefilled itself). Method `{method}` with adaptive width (the server's default), greedy. KV budget {kvBudgetMb} MiB, shared by the sessions' caches and the prefix cache (docs/decisions/0019-prefix-cache.md).").AppendLine();
        md.AppendLine("- **chat**: conversations of workloads/chat.jsonl one after another, turns in order; each turn's prompt carries the history as the server renders a chat, so it starts with the previous turn's context section. Time to first token (TTFT) is from the request to its first token.");
        md.AppendLine("- **rag-shared**: the questions of workloads/rag-shared.jsonl (4-8 per document), taken in order by concurrent sessions, so questions about one document run close together. Aggregate tokens/s counts generated tokens over wall time.").AppendLine();
        md.AppendLine("`cached` counts prompt tokens whose keys and values came from the cache; `prefill device ms` is the device's time in prefill chunks; `cache MiB` the most the cache held at the end of a pass; `RSS` the process's largest working set seen after a pass.").AppendLine();
        md.AppendLine("| workload | prefix cache | sessions | requests | median TTFT first ms | median TTFT later turns ms | aggregate tok/s | prompt tokens | cached | prefill device ms | evictions | cache MiB | RSS MiB | identical | per round |").AppendLine("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        foreach (var r in rows)
        {
            md.AppendLine(CultureInfo.InvariantCulture, $"| {r.Workload} | {(r.PrefixCache ? "on" : "off")} | {r.Sessions} | {r.Requests} | {r.MedianTtftMsFirst} | {(r.Workload == "chat" ? r.MedianTtftMsLater.ToString(CultureInfo.InvariantCulture) : "-")} | {r.AggregateTokensPerS} | {r.PromptTokens} | {r.CachedTokens} | {r.PrefillDeviceMs} | {r.Evictions} | {r.CacheMiB} | {r.RssMiB} | {(r.Identical ? "yes" : "NO")} | {string.Join(", ", r.PerRound.Select(v => v.ToString(CultureInfo.InvariantCulture)))} |");
        }

        md.AppendLine();
        foreach (string w in rows.Select(r => r.Workload).Distinct())
        {
            var off = rows.First(r => r.Workload == w && !r.PrefixCache);
            var on = rows.First(r => r.Workload == w && r.PrefixCache);
            md.AppendLine(w == "chat"
                ? string.Create(CultureInfo.InvariantCulture, $"- **chat: TTFT of turns after the first {off.MedianTtftMsLater / Math.Max(1e-9, on.MedianTtftMsLater):F2}x lower with the cache** (median {off.MedianTtftMsLater} -> {on.MedianTtftMsLater} ms; per round off {string.Join(", ", off.PerRound)}, on {string.Join(", ", on.PerRound)}); first turns {off.MedianTtftMsFirst} -> {on.MedianTtftMsFirst} ms; {on.CachedTokens} of {on.PromptTokens} prompt tokens from the cache; prefill device time {off.PrefillDeviceMs / Math.Max(1, on.PrefillDeviceMs):F2}x lower.")
                : string.Create(CultureInfo.InvariantCulture, $"- **rag-shared at {on.Sessions} sessions: aggregate tokens/s {on.AggregateTokensPerS / Math.Max(1e-9, off.AggregateTokensPerS):F2}x with the cache** ({off.AggregateTokensPerS} -> {on.AggregateTokensPerS}; per round off {string.Join(", ", off.PerRound)}, on {string.Join(", ", on.PerRound)}); median TTFT {off.MedianTtftMsFirst} -> {on.MedianTtftMsFirst} ms; {on.CachedTokens} of {on.PromptTokens} prompt tokens from the cache; prefill device time {off.PrefillDeviceMs / Math.Max(1, on.PrefillDeviceMs):F2}x lower."));
        }

        md.AppendLine().AppendLine(CultureInfo.InvariantCulture, $"![prefix cache]({stem}.png)");
        File.WriteAllText(Path.Combine(dir, stem + ".md"), md.ToString());
        ConsoleUi.Err.MarkupLineInterpolated($"[green]wrote {dir}/{stem}.md[/]");
    }

    private static void Plot(List<PrefixRow> rows, string path)
    {
        var plot = new Plot();
        var bars = new List<Bar>();
        string[] labels = ["chat: TTFT later turns (ms)", "rag-shared: TTFT (ms)"];
        for (int i = 0; i < 2; i++)
        {
            string w = i == 0 ? "chat" : "rag-shared";
            foreach (bool on in new[] { false, true })
            {
                var r = rows.FirstOrDefault(x => x.Workload == w && x.PrefixCache == on);
                if (r is not null)
                {
                    bars.Add(new Bar { Position = (i * 3) + (on ? 1 : 0), Value = i == 0 ? r.MedianTtftMsLater : r.MedianTtftMsFirst, FillColor = on ? Colors.SeaGreen : Colors.Gray, Label = on ? "cache on" : "cache off" });
                }
            }
        }

        plot.Add.Bars(bars);
        plot.Axes.Bottom.SetTicks([0.5, 3.5], labels);
        plot.Axes.Left.Label.Text = "median time to first token (ms)";
        plot.Title("prefix cache: time to first token, off (gray) and on (green)");
        plot.Axes.Margins(bottom: 0);
        plot.SavePng(path, 900, 500);
    }
}
