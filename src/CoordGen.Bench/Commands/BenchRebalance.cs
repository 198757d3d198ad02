using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Json.Serialization;
using System.Threading.Channels;
using static CoordGen.Messages.GenerationProtocol;
using Spectre.Console;

namespace CoordGen.Host.Commands;

internal sealed record RebalanceSession
{
    [JsonPropertyName("session")] public int Session { get; init; }
    [JsonPropertyName("median_gap_ms")] public double MedianGapMs { get; init; }
    [JsonPropertyName("worst_gap_during_prefill_ms")] public double WorstGapDuringPrefillMs { get; init; }
    [JsonPropertyName("median_gap_during_prefill_ms")] public double MedianGapDuringPrefillMs { get; init; }
    [JsonPropertyName("ratio")] public double Ratio { get; init; }
    [JsonPropertyName("tokens_during_prefill")] public int TokensDuringPrefill { get; init; }

    /// <summary>The control runs' own worst gap over the same tokens (their mean) over the control median: what the worst-gap statistic reads with no newcomer at all.</summary>
    [JsonPropertyName("control_worst_ratio")] public double ControlWorstRatio { get; init; }

    /// <summary>Worst gap from the newcomer's first token to its last (it decodes, and its calibrated index is built, beside the streams).</summary>
    [JsonPropertyName("worst_gap_while_newcomer_decodes_ms")] public double WorstGapWhileNewcomerDecodesMs { get; init; }

    /// <summary>That worst gap over the control median of the same tokens.</summary>
    [JsonPropertyName("ratio_while_newcomer_decodes")] public double RatioWhileNewcomerDecodes { get; init; }
    [JsonPropertyName("tokens")] public int Tokens { get; init; }
}

internal sealed record RebalanceReport
{
    [JsonPropertyName("running_sessions")] public int RunningSessions { get; init; }
    [JsonPropertyName("method")] public required string Method { get; init; }
    [JsonPropertyName("newcomer_prompt_tokens")] public int NewcomerPromptTokens { get; init; }
    [JsonPropertyName("newcomer_ttft_ms")] public double NewcomerTtftMs { get; init; }

    /// <summary>The accelerator profile device steps were paced to (what-if); null: real CPU timings.</summary>
    [JsonPropertyName("device_profile")] public string? DeviceProfile { get; init; }
    [JsonPropertyName("chunk_width")] public int ChunkWidth { get; init; }
    [JsonPropertyName("stream_tokens")] public int StreamTokens { get; init; }
    [JsonPropertyName("settle_ms")] public int SettleMs { get; init; }
    [JsonPropertyName("worst_ratio")] public double WorstRatio { get; init; }

    /// <summary>The same statistic over the control runs (no newcomer), the largest over the streams: the floor host noise puts under <see cref="WorstRatio"/>.</summary>
    [JsonPropertyName("control_worst_ratio")] public double ControlWorstRatio { get; init; }

    /// <summary>The same after the prefill: from the newcomer's first token to its last.</summary>
    [JsonPropertyName("worst_ratio_while_newcomer_decodes")] public double WorstRatioWhileNewcomerDecodes { get; init; }
    [JsonPropertyName("sessions")] public required IReadOnlyList<RebalanceSession> Sessions { get; init; }

    /// <summary>Every run's worst ratio and TTFT; the top-level values and the sessions are the median run's.</summary>
    [JsonPropertyName("runs")] public IReadOnlyList<RebalanceRun> Runs { get; init; } = [];

    /// <summary>The gap behind <see cref="WorstRatio"/> (the worst gap over its stream's control median): its length, its stream, and every span that overlapped it (what the time went to).</summary>
    /// <summary>The newcomer's prefill chunks in this run (their spans, alone or with riders): how many, their median and longest.</summary>
    [JsonPropertyName("newcomer_chunks")] public int NewcomerChunks { get; init; }
    [JsonPropertyName("newcomer_chunk_median_ms")] public double NewcomerChunkMedianMs { get; init; }
    [JsonPropertyName("newcomer_chunk_max_ms")] public double NewcomerChunkMaxMs { get; init; }

    /// <summary>Whether ended sessions' KV caches were kept for the next ones (CoordGenOptions.KvPool, decision 0030).</summary>
    [JsonPropertyName("kv_pool")] public bool KvPool { get; init; }

    /// <summary>Whether the speculative streams chose each step's width (adaptive width, the server's default) or verified at the fixed width.</summary>
    [JsonPropertyName("adaptive_width")] public bool AdaptiveWidth { get; init; }

    [JsonPropertyName("worst_gap_ms")] public double WorstGapMs { get; init; }
    [JsonPropertyName("worst_gap_stream")] public int WorstGapStream { get; init; }
    [JsonPropertyName("worst_gap_spans")] public IReadOnlyList<GapSpan> WorstGapSpans { get; init; } = [];
}

/// <summary>One span (device step, draft, verification, calibration) that ran inside the worst gap, in ms from the gap's start.</summary>
internal sealed record GapSpan
{
    [JsonPropertyName("name")] public required string Name { get; init; }
    [JsonPropertyName("start_ms")] public double StartMs { get; init; }
    [JsonPropertyName("ms")] public double Ms { get; init; }
    [JsonPropertyName("detail")] public string Detail { get; init; } = "";
}

internal sealed record RebalanceRun
{
    [JsonPropertyName("worst_ratio")] public double WorstRatio { get; init; }
    [JsonPropertyName("worst_ratio_while_newcomer_decodes")] public double WorstRatioWhileNewcomerDecodes { get; init; }
    [JsonPropertyName("control_worst_ratio")] public double ControlWorstRatio { get; init; }
    [JsonPropertyName("newcomer_ttft_ms")] public double NewcomerTtftMs { get; init; }
    [JsonPropertyName("newcomer_chunk_median_ms")] public double NewcomerChunkMedianMs { get; init; }
    [JsonPropertyName("newcomer_chunk_max_ms")] public double NewcomerChunkMaxMs { get; init; }
}

/// <summary>
/// <c>coordgen bench rebalance</c>: sessions stream while a long prompt arrives; the device actor
/// interleaves its prefill chunks with their decode steps. Reports each running session's worst
/// inter-token gap while the newcomer prefills against its median gap over the same tokens in control runs without it (one before, one after), and the
/// newcomer's time to first token. Token times are taken when the device hands a token to its stream
/// (a timestamping channel writer), not when a reader gets to it, so a busy machine's thread pool
/// does not blur them.
/// </summary>
internal static class BenchRebalance
{
    public static Command Create()
    {
        var model = CommonOptions.Model();
        var sessions = new Option<int>("--sessions") { Description = "Sessions streaming when the long prompt arrives.", DefaultValueFactory = _ => 4 };
        var promptTokens = new Option<int>("--prompt-tokens") { Description = "Length of the newcomer's prompt.", DefaultValueFactory = _ => 1500 };
        var method = new Option<string>("--method") { Description = "Decoding method of every request (ar or a speculative method).", DefaultValueFactory = _ => "sam+ours" };
        var width = new Option<int>("--width") { Description = "Verification width of speculative methods.", DefaultValueFactory = _ => 8 };
        var streamTokens = new Option<int>("--stream-tokens") { Description = "Most tokens each running stream generates: enough that every stream still runs while the newcomer prefills.", DefaultValueFactory = _ => 1024 };
        var settleMs = new Option<int>("--settle-ms") { Description = "Once every stream has 8 tokens, how long they stream before the long prompt arrives.", DefaultValueFactory = _ => 200 };
        var chunkWidth = new Option<int>("--chunk-width") { Description = "Tokens per prefill chunk while the streams decode (the server's InterleavedChunkWidth); 64 = the full prefill width, no narrowing.", DefaultValueFactory = _ => new CoordGenOptions().InterleavedChunkWidth };
        var threads = new Option<int>("--threads") { Description = "ONNX Runtime intra-op threads of the device (the server's Threads); 0 = one per core.", DefaultValueFactory = _ => 0 };
        var runs = new Option<int>("--runs") { Description = "Times the whole test runs (controls, newcomer); the report shows the run with the median worst ratio and lists all (this shared machine is noisy).", DefaultValueFactory = _ => 3 };
        var deviceProfile = CommonOptions.DeviceProfile("What-if: pace every device step to this accelerator profile (the real step runs, the device waits out the rest), so the policy meets an NPU's step times instead of this CPU's noise; the report is then rebalance-PROFILE.md and says so. Lower --stream-tokens with it (steps last tens of ms).");
        var packedTrees = new Option<bool?>("--packed-trees") { Description = "Speculative streams' trees share packed runs (CoordGenOptions.PackedTrees; default: the server's default).", HelpName = "true|false" };
        var mixedSteps = new Option<bool?>("--mixed-steps") { Description = "Plain (ar) streams ride in the newcomer's prefill chunks' runs (CoordGenOptions.MixedSteps; default: the server's default); speculative streams' trees too with --mixed-trees.", HelpName = "true|false" };
        var mixedTrees = new Option<bool?>("--mixed-trees") { Description = "With --mixed-steps: speculative streams' trees ride in the chunks' runs too (CoordGenOptions.MixedTrees, decision 0029; default: the server's default, off).", HelpName = "true|false" };
        var kvPool = new Option<bool?>("--kv-pool") { Description = "Keep ended sessions' KV caches for the next ones (CoordGenOptions.KvPool, decision 0030; default: the server's default, on).", HelpName = "true|false" };
        var adaptiveWidth = new Option<bool?>("--adaptive-width") { Description = "Speculative streams choose each step's width up to --width (adaptive width, decision 0006; while the newcomer's prompt waits their roots then ride in its chunks' runs, decision 0033), or verify at --width always (false). Default: the server's default (adaptive, CoordGenOptions.AdaptiveWidth); the reports before decision 0033 ran the fixed width.", HelpName = "true|false" };
        var json = new Option<FileInfo?>("--json") { Description = "Write the report as JSON here too.", HelpName = "OUT.json" };
        var outDir = new Option<DirectoryInfo?>("--out") { Description = "Report folder (default docs/bench/ of the checkout).", HelpName = "DIR" };
        var cmd = new Command("rebalance", "Prefill against decode: N sessions stream while a long prompt arrives; the device interleaves its prefill chunks with their decode steps. Reports their worst inter-token gap during the newcomer's prefill against their median gap (goal: at most 2x) and the newcomer's time to first token. Writes a report and a plot of the gaps.")
        {
            model, sessions, promptTokens, method, width, streamTokens, settleMs, chunkWidth, threads, runs, deviceProfile, packedTrees, mixedSteps, mixedTrees, kvPool, adaptiveWidth, json, outDir,
        };
        cmd.SetAction(async (parse, ct) =>
        {
            int n = parse.GetValue(sessions), p = parse.GetValue(promptTokens), w = parse.GetValue(width);
            string m = parse.GetValue(method)!;
            bool adaptive = parse.GetValue(adaptiveWidth) ?? new CoordGenOptions().AdaptiveWidth;
            if (n < 1 || p < 1 || parse.GetValue(runs) < 1)
            {
                throw new ArgumentException("--sessions, --prompt-tokens and --runs must be at least 1.");
            }

            var stamp = BenchStamp.Capture();
            var bundle = ConsoleUi.LoadModel(ModelLocator.Resolve(parse.GetValue(model)));
            // No prefix cache: the warm-up below runs the newcomer's prompt once, and a cached prompt would skip the very
            // prefill this measures (with it on, ar's newcomer took 96 ms to its first token for 1,500 tokens).
            var settings = new CoordGenOptions { MaxPending = (2 * n) + 2, Width = w, Method = m == "ar" ? "sam+ours" : m, PrecompileAll = true, PackedTrees = parse.GetValue(packedTrees) ?? new CoordGenOptions().PackedTrees, MixedSteps = parse.GetValue(mixedSteps) ?? new CoordGenOptions().MixedSteps, MixedTrees = parse.GetValue(mixedTrees) ?? new CoordGenOptions().MixedTrees, PrefixCache = false, InterleavedChunkWidth = parse.GetValue(chunkWidth), Threads = parse.GetValue(threads), DeviceProfile = parse.GetValue(deviceProfile), KvPool = parse.GetValue(kvPool) ?? new CoordGenOptions().KvPool };
            var profile = string.IsNullOrEmpty(settings.DeviceProfile) ? null : Engine.Scheduling.DeviceProfile.Load(settings.DeviceProfile);
            if (settings.Problems() is { Count: > 0 } problems)
            {
                throw new ArgumentException(string.Join(" ", problems));
            }

            if (p + 16 > settings.Capacity)
            {
                throw new ArgumentException($"--prompt-tokens {p} plus 16 output tokens must fit the capacity {settings.Capacity}.");
            }

            var text = new StringBuilder();
            foreach (var f in new[] { "rag", "summary", "reply" })
            {
                foreach (var item in Engine.Workloads.WorkloadItem.Load(Path.Combine(ModelLocator.RepoRoot(), "workloads", f + ".jsonl")))
                {
                    text.Append(item.Context).Append('\n');
                }
            }

            int[] newcomer = [.. bundle.Tokenizer.Encode(text.ToString()).Take(p)];
            await using var service = InferenceService.Start(bundle, settings);

            // The streams: of the summary and reply prompts (the longest answers), those whose answers run longest
            // alone, so they are still streaming while the newcomer prefills. This also warms the graphs.
            int cap = parse.GetValue(streamTokens);
            if (cap < 16)
            {
                throw new ArgumentException("--stream-tokens must be at least 16.");
            }

            var candidates = BenchStreams.Prompts(bundle, 12, new[] { "summary", "reply" }.Select(t => Path.Combine(ModelLocator.RepoRoot(), "workloads", t + ".jsonl")))
                .Where(c => c.Tokens.Length + cap <= settings.Capacity).Select(c => (c.Tokens, MaxTokens: cap)).ToList();
            if (candidates.Count < n)
            {
                throw new ArgumentException($"only {candidates.Count} summary and reply prompts leave room for --stream-tokens {cap} in the capacity {settings.Capacity}; lower --stream-tokens.");
            }

            var lengths = new List<(int Index, int Tokens)>();
            await ConsoleUi.Err.Status().StartAsync("choosing long-running streams", async _ =>
            {
                for (int i = 0; i < candidates.Count; i++)
                {
                    lengths.Add((i, (await BenchStreams.RunAsync(service.Supervisor, candidates[i].Tokens, candidates[i].MaxTokens, m, w, ct, adaptive)).Tokens.Length));
                }

                await BenchStreams.RunAsync(service.Supervisor, newcomer, 2, m, w, ct, adaptive);
            });
            var running = lengths.OrderByDescending(x => x.Tokens).Take(n).Select(x => candidates[x.Index]).ToList();

            // Control runs: the same streams with no newcomer, one before and one after the run with it, so a
            // drift in the machine's speed lands on both sides. Each stream's baseline is its median gap over
            // the same stretch of its tokens in both (same KV fill, same drafts): only the newcomer differs.
            async Task<TimestampingWriter[]> Control(string when)
            {
                var c = running.Select(_ => new TimestampingWriter()).ToArray();
                await ConsoleUi.Err.Status().StartAsync($"{n} streams alone (control, {when})", async _ =>
                    await Task.WhenAll(running.Select((r, s) => BenchStreams.SendAsync(service.Supervisor, r.Tokens, r.MaxTokens, m, w, c[s], ct, adaptive, session: $"stream-{s}"))));
                return c;
            }

            using var spans = new SpanLog();
            async Task<(RebalanceReport Report, TimestampingWriter[] Writers, long Sent, long First, long Last)> RunOnce(int index)
            {
                var controlBefore = await Control($"run {index + 1}, before");
                var writers = running.Select(_ => new TimestampingWriter()).ToArray();
                long newcomerSent = 0;
                var newcomerWriter = new TimestampingWriter();
                await ConsoleUi.Err.Status().StartAsync($"run {index + 1}: {n} streams, then a {newcomer.Length}-token prompt", async _ =>
                {
                    var streams = running.Select((r, s) => BenchStreams.SendAsync(service.Supervisor, r.Tokens, r.MaxTokens, m, w, writers[s], ct, adaptive, session: $"stream-{s}")).ToList();
                    while (writers.Any(x => x.Count < 8) && !streams.All(t => t.IsCompleted))
                    {
                        await Task.Delay(1, ct);
                    }

                    // A moment of steady streaming before the arrival.
                    await Task.Delay(Math.Max(0, parse.GetValue(settleMs)), ct);
                    newcomerSent = Stopwatch.GetTimestamp();
                    await BenchStreams.SendAsync(service.Supervisor, newcomer, 16, m, w, newcomerWriter, ct, adaptive, session: "newcomer");
                    await Task.WhenAll(streams);
                });

                var controlAfter = await Control($"run {index + 1}, after");

                long newcomerFirst = newcomerWriter.Times.Count > 0 ? newcomerWriter.Times[0] : Stopwatch.GetTimestamp();
                long newcomerLast = newcomerWriter.Times.Count > 0 ? newcomerWriter.Times[^1] : newcomerFirst;
                var rows = new List<RebalanceSession>();
                (long At, double Ms) worstGap = (0, 0);
                int worstStream = 0;
                double worstRatio = 0;
                for (int s = 0; s < n; s++)
                {
                    var times = writers[s].Times;
                    var gaps = BenchStreams.DeliveryGaps([.. times]);
                    var during = gaps.Where(g => g.At > newcomerSent && g.At <= newcomerFirst).ToList();
                    var joining = gaps.Where(g => g.At > newcomerFirst && g.At <= newcomerLast).ToList();

                    // Each control run's gaps over the token indices [from, to) this stream delivered in a window.
                    List<double>[] ControlGaps(long start, long end)
                    {
                        int from = Math.Max(1, times.Count(t => t <= start)), to = times.Count(t => t <= end);
                        return [.. new[] { controlBefore[s].Times, controlAfter[s].Times }
                            .Select(ctl => Enumerable.Range(from, Math.Max(0, Math.Min(to, ctl.Count) - from)).Select(i => Stopwatch.GetElapsedTime(ctl[i - 1], ctl[i]).TotalMilliseconds).ToList())];
                    }

                    // Both controls' gaps, sorted: the baseline a window's gaps are measured against.
                    List<double> Baseline(long start, long end) => [.. ControlGaps(start, end).SelectMany(g => g).Where(g => g >= 0.05).Order()];

                    // Each control run's own worst gap (their mean): the noise floor of the worst-gap statistic.
                    double ControlWorst(long start, long end) => ControlGaps(start, end).Average(g => g.DefaultIfEmpty(0).Max());

                    var baseline = Baseline(newcomerSent, newcomerFirst);
                    var joinBaseline = Baseline(newcomerFirst, newcomerLast);
                    double median = baseline.Count == 0 ? 0 : baseline[baseline.Count / 2];
                    double joinMedian = joinBaseline.Count == 0 ? 0 : joinBaseline[joinBaseline.Count / 2];
                    double worst = during.Count == 0 ? 0 : during.Max(g => g.Ms);
                    double joinWorst = joining.Count == 0 ? 0 : joining.Max(g => g.Ms);
                    // The gap behind the worst ratio (its stream's worst over its control median), whose spans the report lists.
                    if (during.Count > 0 && median > 0 && worst / median > worstRatio)
                    {
                        (worstGap, worstStream, worstRatio) = (during.First(g => g.Ms == worst), s, worst / median);
                    }

                    rows.Add(new RebalanceSession
                    {
                        Session = s,
                        MedianGapMs = Math.Round(median, 2),
                        MedianGapDuringPrefillMs = during.Count == 0 ? 0 : Math.Round(during.Select(g => g.Ms).Order().ElementAt(during.Count / 2), 2),
                        WorstGapDuringPrefillMs = Math.Round(worst, 2),
                        Ratio = Math.Round(median > 0 ? worst / median : 0, 2),
                        ControlWorstRatio = Math.Round(median > 0 ? ControlWorst(newcomerSent, newcomerFirst) / median : 0, 2),
                        TokensDuringPrefill = during.Count,
                        WorstGapWhileNewcomerDecodesMs = Math.Round(joinWorst, 2),
                        RatioWhileNewcomerDecodes = Math.Round(joinMedian > 0 ? joinWorst / joinMedian : 0, 2),
                        Tokens = writers[s].Times.Count,
                    });
                }

                var chunks = spans.Durations(["prefill_chunk", "prefill_mixed"], "session=newcomer", newcomerSent, newcomerFirst);
                var report = new RebalanceReport
                {
                    RunningSessions = n,
                    Method = m,
                    NewcomerPromptTokens = newcomer.Length,
                    ChunkWidth = settings.EffectiveChunkWidth,
                    StreamTokens = cap,
                    SettleMs = parse.GetValue(settleMs),
                    NewcomerTtftMs = Math.Round(Stopwatch.GetElapsedTime(newcomerSent, newcomerFirst).TotalMilliseconds, 1),
                    WorstRatio = rows.Where(r => r.TokensDuringPrefill > 0).Select(r => r.Ratio).DefaultIfEmpty(0).Max(),
                    ControlWorstRatio = rows.Where(r => r.TokensDuringPrefill > 0).Select(r => r.ControlWorstRatio).DefaultIfEmpty(0).Max(),
                    WorstRatioWhileNewcomerDecodes = rows.Select(r => r.RatioWhileNewcomerDecodes).DefaultIfEmpty(0).Max(),
                    Sessions = rows,
                    NewcomerChunks = chunks.Count,
                    NewcomerChunkMedianMs = chunks.Count == 0 ? 0 : Math.Round(chunks[chunks.Count / 2], 2),
                    NewcomerChunkMaxMs = chunks.Count == 0 ? 0 : Math.Round(chunks[^1], 2),
                    KvPool = settings.KvPool,
                    AdaptiveWidth = adaptive,
                    WorstGapMs = Math.Round(worstGap.Ms, 2),
                    WorstGapStream = worstStream,
                    WorstGapSpans = spans.Within(worstGap.At - (long)(worstGap.Ms * Stopwatch.Frequency / 1000), worstGap.At),
                };
                spans.Clear();
                return (report, writers, newcomerSent, newcomerFirst, newcomerLast);
            }

            var results = new List<(RebalanceReport Report, TimestampingWriter[] Writers, long Sent, long First, long Last)>();
            for (int r = 0; r < parse.GetValue(runs); r++)
            {
                results.Add(await RunOnce(r));
            }

            var (median, writers, newcomerSent, newcomerFirst, newcomerLast) = results.OrderBy(x => x.Report.WorstRatio).ElementAt(results.Count / 2);
            var report = median with { Runs = [.. results.Select(x => new RebalanceRun { WorstRatio = x.Report.WorstRatio, WorstRatioWhileNewcomerDecodes = x.Report.WorstRatioWhileNewcomerDecodes, ControlWorstRatio = x.Report.ControlWorstRatio, NewcomerTtftMs = x.Report.NewcomerTtftMs, NewcomerChunkMedianMs = x.Report.NewcomerChunkMedianMs, NewcomerChunkMaxMs = x.Report.NewcomerChunkMaxMs })] };
            Write(report, writers, newcomerSent, newcomerFirst, newcomerLast, settings.PrefillWidth, settings.EffectiveChunkWidth, w, stamp, parse.GetValue(outDir)?.FullName ?? Path.Combine(ModelLocator.RepoRoot(), "docs", "bench"), parse.GetValue(json), profile, bundle.Name);
            return 0;
        });
        return cmd;
    }

    private static void Write(RebalanceReport report, TimestampingWriter[] writers, long sent, long first, long last, int prefillWidth, int chunk, int width, BenchStamp stamp, string dir, FileInfo? json, Engine.Scheduling.DeviceProfile? profile, string model)
    {
        Directory.CreateDirectory(dir);
        string stem = ReportStem.For(profile is null ? "rebalance" : $"rebalance-{profile.Name}", model);
        string jsonText = JsonSerializer.Serialize(report with { DeviceProfile = profile?.Name }, new JsonSerializerOptions { WriteIndented = true });
        File.WriteAllText(Path.Combine(dir, stem + ".json"), jsonText);
        if (json is not null)
        {
            File.WriteAllText(json.FullName, jsonText);
        }

        double Ms(long t) => Stopwatch.GetElapsedTime(sent, t).TotalMilliseconds;
        Plots.Rebalance([.. writers.Select(x => BenchStreams.DeliveryGaps([.. x.Times]).Select(g => (Ms(g.At), g.Ms)).ToList())], Ms(first), Ms(last), Path.Combine(dir, stem + ".png"));
        var md = new StringBuilder();
        md.AppendLine(profile is null ? "# Prefill against decode (`coordgen bench rebalance`)" : $"# Prefill against decode, what-if on `{profile.Name}` (`coordgen bench rebalance --device-profile {profile.Name}`)").AppendLine();
        md.AppendLine(stamp.ToMarkdown()).AppendLine();
        if (profile is not null)
        {
            md.AppendLine(CultureInfo.InvariantCulture, $"**{profile.Label}.** Every device step ran for real on the CPU and was then held until the profile's time for its graph width had passed (verification W = {width}: {profile.StepMs(width):F1} ms; a {chunk}-token chunk: {profile.StepMs(chunk):F1} ms), so gaps and time to first token are the policy at the profile's step times (not measured on an NPU). Drafting and the actors' own work are real.").AppendLine();
        }

        md.AppendLine(CultureInfo.InvariantCulture, $"{report.RunningSessions} sessions stream (`{report.Method}`, {(report.AdaptiveWidth ? $"adaptive width up to W = {width} (`--adaptive-width true`)" : $"W = {width}")}; the summary and reply prompts whose answers run longest, up to {report.StreamTokens} tokens each); once each has 8 tokens, a {report.NewcomerPromptTokens}-token prompt arrives. The device actor prefills it in chunks of {chunk} tokens between the streams' decode steps ({prefillWidth} when no one decodes; `StepPolicy`: a chunk after every max(1, decoding / prefilling) decode steps, `StepPolicy.ChunkWidth` for its width; `--chunk-width`). Token times are taken when the device hands a token to its stream; a gap is the time between two deliveries of a stream (the tokens one verification commits arrive together: one delivery). The long prompt arrives {report.SettleMs} ms after every stream has 8 tokens. Each stream's baseline is its median gap over the same tokens in two control runs of the same streams without the newcomer, one before and one after (same KV fill, same drafts; only the newcomer differs).").AppendLine();
        md.AppendLine("| session | median gap, control (ms) | median gap while the newcomer prefills (ms) | worst gap while it prefills (ms) | worst / control median | the controls' own worst / median | tokens during the prefill | worst gap while the newcomer decodes (ms) | that / control median | tokens in all |").AppendLine("|---|---|---|---|---|---|---|---|---|---|");
        foreach (var r in report.Sessions)
        {
            md.AppendLine(CultureInfo.InvariantCulture, $"| {r.Session} | {r.MedianGapMs} | {r.MedianGapDuringPrefillMs} | {r.WorstGapDuringPrefillMs} | {r.Ratio}x | {r.ControlWorstRatio}x | {r.TokensDuringPrefill} | {r.WorstGapWhileNewcomerDecodesMs} | {r.RatioWhileNewcomerDecodes}x | {r.Tokens} |");
        }

        md.AppendLine().AppendLine(CultureInfo.InvariantCulture, $"Worst gap / control median over the streams that produced tokens during the prefill: **{report.WorstRatio}x** (goal: at most 2x). The same statistic over the control runs, with no newcomer at all: {report.ControlWorstRatio}x (host noise alone). Newcomer's time to first token: **{report.NewcomerTtftMs} ms** for {report.NewcomerPromptTokens} tokens.").AppendLine();
        md.AppendLine(CultureInfo.InvariantCulture, $"The newcomer's prefill ran as {report.NewcomerChunks} chunks: median {report.NewcomerChunkMedianMs} ms, longest {report.NewcomerChunkMaxMs} ms. Ended sessions' KV caches kept for the next ones (`--kv-pool`, decision 0030): {(report.KvPool ? "yes" : "no")}.").AppendLine();
        md.AppendLine(CultureInfo.InvariantCulture, $"After the prefill the newcomer decodes its 16 tokens beside the streams, and its calibrated paths are walked (on the calibrator) and indexed (on the drafter), beside the device's threads. Worst gap / control median from its first token to its last: **{report.WorstRatioWhileNewcomerDecodes}x**.").AppendLine();
        if (report.Runs.Count > 1)
        {
            md.AppendLine(CultureInfo.InvariantCulture, $"The table and the plot are the run with the median worst ratio of {report.Runs.Count} (`--runs`); all runs, worst ratio during the prefill / while the newcomer decodes (the controls' own worst ratio; TTFT): {string.Join(", ", report.Runs.Select(r => string.Create(CultureInfo.InvariantCulture, $"{r.WorstRatio}x / {r.WorstRatioWhileNewcomerDecodes}x (controls {r.ControlWorstRatio}x; TTFT {r.NewcomerTtftMs:F0} ms)")))}; within 2x during the prefill in {report.Runs.Count(r => r.WorstRatio <= 2)} of {report.Runs.Count}, after it in {report.Runs.Count(r => r.WorstRatioWhileNewcomerDecodes <= 2)} of {report.Runs.Count}.").AppendLine();
        }

        if (report.WorstGapSpans.Count > 0)
        {
            md.AppendLine(CultureInfo.InvariantCulture, $"What ran during that run's worst gap (stream-{report.WorstGapStream}, {report.WorstGapMs} ms), from the runtime's spans (ms from the gap's start; a span that began before it has a negative start):").AppendLine();
            md.AppendLine("| span | start (ms) | ms | detail |").AppendLine("|---|---|---|---|");
            foreach (var g in report.WorstGapSpans)
            {
                md.AppendLine(CultureInfo.InvariantCulture, $"| {g.Name} | {g.StartMs} | {g.Ms} | {g.Detail} |");
            }

            md.AppendLine();
        }

        md.AppendLine(CultureInfo.InvariantCulture, $"![gaps]({stem}.png)");
        File.WriteAllText(Path.Combine(dir, stem + ".md"), md.ToString());
        ConsoleUi.Err.MarkupLineInterpolated($"[green]worst/median gap {report.WorstRatio}x during the prefill, {report.WorstRatioWhileNewcomerDecodes}x while the newcomer decodes, newcomer TTFT {report.NewcomerTtftMs} ms[/] -> {dir}/{stem}.md");
    }

    /// <summary>
    /// The runtime's spans (<see cref="Actors.Telemetry.Source"/>) with Stopwatch times, so the worst gap can be
    /// read as what ran inside it: device steps with their sessions, drafts, verifications, calibrations.
    /// </summary>
    private sealed class SpanLog : IDisposable
    {
        private readonly List<(string Name, long Start, long End, string Detail)> _spans = [];
        private readonly ActivityListener _listener;

        public SpanLog()
        {
            _listener = new ActivityListener
            {
                ShouldListenTo = source => source.Name == Actors.Telemetry.Name,
                Sample = (ref ActivityCreationOptions<ActivityContext> _) => ActivitySamplingResult.AllData,
                ActivityStopped = a =>
                {
                    long end = Stopwatch.GetTimestamp();
                    string detail = string.Join(' ', a.TagObjects.Where(t => t.Key is "coordgen.session" or "coordgen.session_ids" or "coordgen.width" or "coordgen.riders" or "coordgen.rider_width" or "coordgen.tokens")
                        .Select(t => $"{t.Key["coordgen.".Length..]}={t.Value}"));
                    lock (_spans)
                    {
                        _spans.Add((a.DisplayName.Replace("coordgen.", "", StringComparison.Ordinal), end - (long)(a.Duration.TotalSeconds * Stopwatch.Frequency), end, detail));
                    }
                },
            };
            ActivitySource.AddActivityListener(_listener);
        }

        /// <summary>Spans that overlap [from, to], in order of their start.</summary>
        public IReadOnlyList<GapSpan> Within(long from, long to)
        {
            double Ms(long t) => Math.Round((t - from) * 1000.0 / Stopwatch.Frequency, 2);
            lock (_spans)
            {
                return [.. _spans.Where(x => x.End > from && x.Start < to).OrderBy(x => x.Start)
                    .Select(x => new GapSpan { Name = x.Name, StartMs = Ms(x.Start), Ms = Math.Round((x.End - x.Start) * 1000.0 / Stopwatch.Frequency, 2), Detail = x.Detail })];
            }
        }

        /// <summary>Lengths (ms, ascending) of the spans named one of <paramref name="names"/> whose detail holds <paramref name="detail"/>, inside [from, to].</summary>
        public List<double> Durations(string[] names, string detail, long from, long to)
        {
            lock (_spans)
            {
                return [.. _spans.Where(x => names.Contains(x.Name) && x.Detail.Split(' ').Contains(detail) && x.Start >= from && x.End <= to)
                    .Select(x => (x.End - x.Start) * 1000.0 / Stopwatch.Frequency).Order()];
            }
        }

        public void Clear()
        {
            lock (_spans)
            {
                _spans.Clear();
            }
        }

        public void Dispose() => _listener.Dispose();
    }

    /// <summary>A stream that records when each token was handed to it (the device's hand-off time) and keeps nothing else.</summary>
    private sealed class TimestampingWriter : ChannelWriter<GeneratedToken>
    {
        private readonly List<long> _times = [];

        public int Count
        {
            get
            {
                lock (_times)
                {
                    return _times.Count;
                }
            }
        }

        public IReadOnlyList<long> Times
        {
            get
            {
                lock (_times)
                {
                    return [.. _times];
                }
            }
        }

        public override bool TryWrite(GeneratedToken item)
        {
            lock (_times)
            {
                _times.Add(Stopwatch.GetTimestamp());
            }

            return true;
        }

        public override ValueTask<bool> WaitToWriteAsync(CancellationToken cancellationToken = default) => ValueTask.FromResult(true);

        public override bool TryComplete(Exception? error = null) => true;
    }
}
