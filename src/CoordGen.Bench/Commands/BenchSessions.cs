using System.Collections.Immutable;
using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Json.Serialization;
using System.Threading.Channels;
using Akka.Actor;
using CoordGen.Actors.Device;
using CoordGen.Engine;
using CoordGen.Engine.Workloads;
using CoordGen.Messages;
using Spectre.Console;
using static CoordGen.Messages.GenerationProtocol;

namespace CoordGen.Host.Commands;

/// <summary>One (sessions, mode) point of <c>coordgen bench sessions</c>.</summary>
internal sealed record SessionsRow
{
    [JsonPropertyName("sessions")] public int Sessions { get; init; }
    [JsonPropertyName("mode")] public required string Mode { get; init; }

    /// <summary>Plain sessions ready together shared one device run (packed steps) instead of one run each.</summary>
    [JsonPropertyName("packed")] public bool Packed { get; init; }

    /// <summary>With packing: one-token steps (and trees, with --mixed-trees) rode in prefill chunks' runs (mixed steps, decisions 0026, 0029); false when not packed.</summary>
    [JsonPropertyName("mixed_steps")] public bool MixedSteps { get; init; }

    /// <summary>
    /// With packed trees: the width budget chose each pack's width and members by expected tokens per millisecond
    /// (decision 0028, the server's default); false: the widest pack that pays, as before it. True for rows it does not touch.
    /// </summary>
    [JsonPropertyName("width_budget")] public bool WidthBudget { get; init; } = true;

    /// <summary>The prefix cache was on (emptied before each point's pass: requests reuse only what the pass prefilled).</summary>
    [JsonPropertyName("prefix_cache")] public bool PrefixCache { get; init; }

    /// <summary>Sessions per decode run, on average: above 1 only when plain sessions were packed.</summary>
    [JsonPropertyName("sessions_per_decode_run")] public double SessionsPerDecodeRun { get; init; }
    [JsonPropertyName("aggregate_tokens_per_s")] public double AggregateTokensPerS { get; init; }
    [JsonPropertyName("per_session_tokens_per_s")] public double PerSessionTokensPerS { get; init; }
    [JsonPropertyName("p50_intertoken_ms")] public double P50IntertokenMs { get; init; }
    [JsonPropertyName("p99_intertoken_ms")] public double P99IntertokenMs { get; init; }
    [JsonPropertyName("tokens")] public long Tokens { get; init; }
    [JsonPropertyName("identical_to_alone")] public bool IdenticalToAlone { get; init; }

    /// <summary>Share of the device's busy time spent in prefill chunks (the same prompts in every mode).</summary>
    [JsonPropertyName("prefill_share")] public double PrefillShare { get; init; }

    /// <summary>Generated tokens per second of device time in decode steps: the decode phase's throughput alone.</summary>
    [JsonPropertyName("decode_tokens_per_device_s")] public double DecodeTokensPerDeviceS { get; init; }

    /// <summary>The accelerator profile device steps were paced to (what-if); null: real CPU timings.</summary>
    [JsonPropertyName("device_profile")]
    [JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)]
    public string? DeviceProfile { get; init; }
}

/// <summary>
/// <c>coordgen bench sessions</c>: N concurrent sessions on one loaded model through the actor runtime
/// (the device interleaves their steps), plain (ar) and speculative (spec) side by side in one run;
/// aggregate and per-session tokens/s, inter-token latency, and a check that every stream equals the
/// same prompt generated alone.
/// </summary>
internal static class BenchSessions
{
    public static Command Create()
    {
        var model = CommonOptions.Model();
        var workload = new Option<FileInfo[]>("--workload", "-w") { Description = "Workload JSONL file(s). Default: workloads/{summary,rag,ui,reply}.jsonl, taking turns. One file: the report is named after it (sessions-summary.md).", AllowMultipleArgumentsPerToken = true };
        var sessions = new Option<string>("--sessions") { Description = "Comma-separated concurrent session counts.", DefaultValueFactory = _ => "1,2,4,8" };
        var requests = new Option<int>("--requests") { Description = "Requests per session at each point.", DefaultValueFactory = _ => 2 };
        var method = new Option<string>("--method") { Description = "Speculative method of the spec mode.", DefaultValueFactory = _ => "sam+ours" };
        var width = new Option<int>("--width") { Description = "Verification width of the spec mode.", DefaultValueFactory = _ => 8 };
        var modesOpt = new Option<string>("--modes") { Description = "Comma-separated modes: ar (plain), spec (the method at the fixed --width), spec-adaptive (the method, width chosen per step: the server's default).", DefaultValueFactory = _ => "ar,spec,spec-adaptive" };
        var weights = CommonOptions.Weights();
        var kv = CommonOptions.Kv();
        var packedOpt = new Option<string>("--packed") { Description = "true: plain sessions ready together share one device run when it pays (packed steps, the server's default); false: one session per device run; both: each mode both ways, side by side.", DefaultValueFactory = _ => "true", HelpName = "true|false|both" };
        var packedTrees = new Option<bool?>("--packed-trees") { Description = "With packing on: speculative sessions' trees share packed runs too (CoordGenOptions.PackedTrees; default: the server's default).", HelpName = "true|false" };
        var mixedSteps = new Option<string>("--mixed-steps") { Description = "With packing on: true: sessions whose next step is one token (and trees, with --mixed-trees) ride in prefill chunks' runs (CoordGenOptions.MixedSteps, the server's default); false: chunks run alone; both: each packed mode both ways, side by side.", DefaultValueFactory = _ => "true", HelpName = "true|false|both" };
        var mixedTrees = new Option<bool?>("--mixed-trees") { Description = "With mixed steps: speculative sessions' trees ride in prefill chunks' runs too (CoordGenOptions.MixedTrees, decision 0029; default: the server's default, off). With --mixed-steps both, the mixed rows are then trees riding against chunks alone.", HelpName = "true|false" };
        var budgetOpt = new Option<string>("--width-budget") { Description = "With packed trees: true: the width budget chooses each pack's width and members by expected tokens per millisecond (decision 0028, the server's default); false: the widest pack that pays; both: each speculative mode both ways, side by side (rows `(widest)`).", DefaultValueFactory = _ => "true", HelpName = "true|false|both" };
        var prefixOpt = new Option<string>("--prefix-cache") { Description = "true: the prefix cache is on (the server's default), emptied before every pass; false: every prompt is prefilled whole; both: each mode both ways, side by side.", DefaultValueFactory = _ => "true", HelpName = "true|false|both" };
        var threads = new Option<int>("--threads") { Description = "ONNX Runtime intra-op threads of the device (the server's Threads); 0 = one per core.", DefaultValueFactory = _ => 0 };
        var rounds = new Option<int>("--rounds") { Description = "Times each (sessions, mode) point runs, the modes taking turns; the report sums the rounds (this shared machine drifts in speed).", DefaultValueFactory = _ => 1 };
        var json = new Option<FileInfo?>("--json") { Description = "Write the rows as JSON here too.", HelpName = "OUT.json" };
        var outDir = new Option<DirectoryInfo?>("--out") { Description = "Report folder (default docs/bench/ of the checkout).", HelpName = "DIR" };
        var deviceProfile = CommonOptions.DeviceProfile("What-if: pace every device step to this accelerator profile (the real step runs, the device waits out the rest; adaptive width costs widths by the profile), so the modes meet an NPU's step times; the report is then sessions-PROFILE.md and says so. Steps last tens of ms: use few points, e.g. --sessions 8 --requests 2.");
        var cmd = new Command("sessions", "Concurrent sessions on one model: aggregate and per-session tokens/s and inter-token latency, plain vs speculative, measured in one run; every stream checked against the same prompt alone.")
        {
            model, workload, sessions, requests, method, width, modesOpt, packedOpt, packedTrees, mixedSteps, mixedTrees, budgetOpt, prefixOpt, threads, rounds, json, outDir, deviceProfile, weights, kv,
        };
        cmd.SetAction(async (parse, ct) =>
        {
            var counts = parse.GetValue(sessions)!.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Select(int.Parse).ToList();
            int perSession = parse.GetValue(requests), w = parse.GetValue(width);
            string m = parse.GetValue(method)!;
            var modes = parse.GetValue(modesOpt)!.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).ToList();
            if (modes.Count == 0 || modes.Any(x => x is not ("ar" or "spec" or "spec-adaptive")) || !modes.Contains("ar"))
            {
                throw new ArgumentException("--modes takes ar, spec and spec-adaptive, and needs ar (every ratio is over it).");
            }
            bool[] packings = Ways(parse.GetValue(packedOpt), "--packed");
            bool[] mixes = Ways(parse.GetValue(mixedSteps), "--mixed-steps");
            bool[] budgets = Ways(parse.GetValue(budgetOpt), "--width-budget");
            bool[] caches = Ways(parse.GetValue(prefixOpt), "--prefix-cache");
            if (counts.Any(c => c < 1 || c > 256) || perSession < 1 || parse.GetValue(rounds) < 1)
            {
                throw new ArgumentException("--sessions values must be between 1 and 256, --requests and --rounds at least 1.");
            }

            var stamp = BenchStamp.Capture();
            var bundle = ConsoleUi.LoadModel(ModelLocator.Resolve(parse.GetValue(model)));
            string root = ModelLocator.RepoRoot();
            var files = parse.GetValue(workload) is { Length: > 0 } given ? given.Select(f => f.FullName).ToList()
                : new[] { "summary", "rag", "ui", "reply" }.Select(t => Path.Combine(root, "workloads", t + ".jsonl")).ToList();
            var prompts = BenchStreams.Prompts(bundle, 4, files);
            int maxSessions = counts.Max();
            var profile = parse.GetValue(deviceProfile) is { Length: > 0 } pn ? Engine.Scheduling.DeviceProfile.Load(pn) : null;
            await using var service = InferenceService.Start(bundle, new CoordGenOptions { MaxPending = maxSessions * 2, Width = w, Method = m, PrecompileAll = true, PackedSteps = packings.Contains(true), PackedTrees = parse.GetValue(packedTrees) ?? new CoordGenOptions().PackedTrees, MixedSteps = mixes.Contains(true), MixedTrees = parse.GetValue(mixedTrees) ?? new CoordGenOptions().MixedTrees, PrefixCache = caches.Contains(true), Threads = parse.GetValue(threads), Weights = parse.GetValue(weights), Kv = parse.GetValue(kv), DeviceProfile = profile is null ? null : parse.GetValue(deviceProfile) });

            // Each prompt alone first, without the prefix cache: the reference every concurrent stream must equal.
            var device = await service.SelectDevice();
            device.Tell(new DiagnosticsProtocol.SetPrefixCache(false));
            var alone = new Dictionary<int, int[]>();
            await ConsoleUi.Err.Status().StartAsync("reference outputs (each prompt alone)", async _ =>
            {
                for (int i = 0; i < Math.Min(prompts.Count, maxSessions * perSession); i++)
                {
                    alone[i] = (await Stream(service.Supervisor, prompts[i].Tokens, prompts[i].MaxTokens, "ar", w, ct)).Tokens;

                    // The speculative run alone too: it compiles its graphs before anything is timed.
                    if (!(await Stream(service.Supervisor, prompts[i].Tokens, prompts[i].MaxTokens, m, w, ct)).Tokens.AsSpan().SequenceEqual(alone[i]))
                    {
                        throw new InvalidOperationException($"prompt {i}: {m} differs from plain greedy decoding; please report this.");
                    }
                }
            });

            var rows = new List<SessionsRow>();
            int[] gcBefore = [GC.CollectionCount(0), GC.CollectionCount(1), GC.CollectionCount(2)];
            var gcPauseBefore = GC.GetTotalPauseDuration();
            int roundCount = parse.GetValue(rounds);
            await AnsiConsole.Progress().Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new ElapsedTimeColumn()).StartAsync(async progress =>
            {
                var variants = caches.SelectMany(pc => packings.SelectMany(pk => (pk ? mixes : [false]).SelectMany(mx => modes.SelectMany(mode => (pk && mode != "ar" ? budgets : [true]).Select(b => (Mode: mode, Packed: pk, Mixed: mx, Prefix: pc, Budget: b)))))).ToList();
                var bar = progress.AddTask("sessions x mode x round", maxValue: counts.Count * variants.Count * roundCount);
                foreach (int n in counts)
                {
                    var points = variants.ToDictionary(x => x, _ => new Point());
                    for (int round = 0; round < roundCount; round++)
                    {
                        // Modes take turns, starting with a different one each round: a drift in the machine's
                        // speed lands on every mode alike.
                        foreach (var variant in variants.Skip(round % variants.Count).Concat(variants.Take(round % variants.Count)))
                        {
                            string mode = variant.Mode;
                            device.Tell(new DiagnosticsProtocol.SetPackedSteps(variant.Packed));
                            device.Tell(new DiagnosticsProtocol.SetMixedSteps(variant.Mixed));
                            device.Tell(new DiagnosticsProtocol.SetWidthBudget(variant.Budget));
                            device.Tell(new DiagnosticsProtocol.SetPrefixCache(variant.Prefix));
                            var before = await device.Ask<DiagnosticsProtocol.Overlap>(DiagnosticsProtocol.GetOverlap.Instance);
                            var sw = Stopwatch.StartNew();
                            var results = await Task.WhenAll(Enumerable.Range(0, n).Select(async s =>
                            {
                                var list = new List<(int Index, StreamResult R)>();
                                for (int k = 0; k < perSession; k++)
                                {
                                    int idx = ((s * perSession) + k) % prompts.Count;
                                    list.Add((idx, await Stream(service.Supervisor, prompts[idx].Tokens, prompts[idx].MaxTokens, mode == "ar" ? "ar" : m, w, ct, adaptive: mode == "spec-adaptive")));
                                }

                                return list;
                            }));
                            var pt = points[variant];
                            pt.Seconds += sw.Elapsed.TotalSeconds;
                            var after = await device.Ask<DiagnosticsProtocol.Overlap>(DiagnosticsProtocol.GetOverlap.Instance);
                            pt.PrefillMs += after.PrefillMs - before.PrefillMs;
                            pt.DecodeMs += after.DecodeMs - before.DecodeMs;
                            pt.DecodeRuns += after.DecodeRuns - before.DecodeRuns;
                            pt.DecodeSessionSteps += after.DecodeSessionSteps - before.DecodeSessionSteps;
                            foreach (var (index, r) in results.SelectMany(x => x))
                            {
                                pt.Gaps.AddRange(r.GapsMs);
                                pt.Tokens += r.Tokens.Length;
                                pt.Identical &= r.Tokens.AsSpan().SequenceEqual(alone[index]);
                            }

                            bar.Increment(1);
                        }
                    }

                    foreach (var variant in variants)
                    {
                        var pt = points[variant];
                        pt.Gaps.Sort();
                        var gaps = pt.Gaps;
                        rows.Add(new SessionsRow
                        {
                            Sessions = n,
                            Mode = variant.Mode,
                            Packed = variant.Packed,
                            MixedSteps = variant.Mixed,
                            WidthBudget = variant.Budget,
                            PrefixCache = variant.Prefix,
                            AggregateTokensPerS = Math.Round(pt.Tokens / pt.Seconds, 1),
                            PerSessionTokensPerS = Math.Round(pt.Tokens / pt.Seconds / n, 1),
                            P50IntertokenMs = gaps.Count == 0 ? 0 : Math.Round(gaps[gaps.Count / 2], 2),
                            P99IntertokenMs = gaps.Count == 0 ? 0 : Math.Round(gaps[Math.Min(gaps.Count - 1, (int)(gaps.Count * 0.99))], 2),
                            Tokens = pt.Tokens,
                            IdenticalToAlone = pt.Identical,
                            PrefillShare = Math.Round(pt.PrefillMs / Math.Max(1e-9, pt.PrefillMs + pt.DecodeMs), 3),
                            DecodeTokensPerDeviceS = Math.Round(pt.Tokens / Math.Max(1e-9, pt.DecodeMs / 1000), 1),
                            SessionsPerDecodeRun = Math.Round(pt.DecodeSessionSteps / (double)Math.Max(1, pt.DecodeRuns), 2),
                        });
                    }
                }
            });
            var paced = await device.Ask<DiagnosticsProtocol.Overlap>(DiagnosticsProtocol.GetOverlap.Instance);
            var widths = (await device.Ask<DiagnosticsProtocol.WidthDecisions>(DiagnosticsProtocol.GetWidthDecisions.Instance)).Decisions;
            var gc = new GcCounts(GC.CollectionCount(0) - gcBefore[0], GC.CollectionCount(1) - gcBefore[1], GC.CollectionCount(2) - gcBefore[2], (GC.GetTotalPauseDuration() - gcPauseBefore).TotalMilliseconds);
            // One workload file of its own: the report is named after it (sessions-summary.md), so per-family runs sit beside the mixed one.
            string? family = parse.GetValue(workload) is { Length: 1 } one ? Path.GetFileNameWithoutExtension(one[0].Name) : null;
            Write(rows, stamp, m, w, perSession, parse.GetValue(rounds), parse.GetValue(outDir)?.FullName ?? Path.Combine(root, "docs", "bench"), parse.GetValue(json), profile, paced, widths, family, files, gc, bundle.Name + (parse.GetValue(weights) == Engine.Model.WeightFormat.F32 ? "" : "-" + Engine.Model.WeightQuantizer.Name(parse.GetValue(weights))) + (parse.GetValue(kv) == Engine.Runtime.KvFormat.F32 ? "" : "-kv-f16"));
            return rows.All(r => r.IdenticalToAlone) ? 0 : 1;
        });
        return cmd;
    }

    // A true|false|both option's values: both ways are run side by side.
    private static bool[] Ways(string? value, string option) => value switch
    {
        "true" => [true],
        "false" => [false],
        "both" => [false, true],
        _ => throw new ArgumentException($"{option} takes true, false or both (got '{value}')."),
    };

    /// <summary>A row's mode, marked `(widest)` when the width budget was off for it.</summary>
    internal static string Label(SessionsRow r) => r.WidthBudget ? r.Mode : r.Mode + " (widest)";

    private sealed record GcCounts(int Gen0, int Gen1, int Gen2, double PauseMs);

    private sealed record StreamResult(int[] Tokens, List<double> GapsMs);

    /// <summary>One (sessions, mode) point summed over its rounds.</summary>
    private sealed class Point
    {
        public double Seconds;
        public double PrefillMs;
        public double DecodeMs;
        public int DecodeRuns;
        public int DecodeSessionSteps;
        public long Tokens;
        public bool Identical = true;
        public readonly List<double> Gaps = [];
    }

    private static async Task<StreamResult> Stream(IActorRef supervisor, int[] prompt, int maxTokens, string method, int width, CancellationToken ct, bool adaptive = false)
    {
        var (tokens, arrivals) = await BenchStreams.RunAsync(supervisor, prompt, maxTokens, method, width, ct, adaptive);

        var gaps = BenchStreams.Gaps(arrivals).Select(g => g.Ms).ToList();
        return new StreamResult(tokens, gaps);
    }

    private static void Write(List<SessionsRow> rows, BenchStamp stamp, string method, int width, int perSession, int rounds, string dir, FileInfo? json, Engine.Scheduling.DeviceProfile? profile, DiagnosticsProtocol.Overlap paced, ImmutableArray<(WidthBudgetSnapshot Snapshot, WidthBudgetChoice Choice)> widths, string? family, IReadOnlyList<string> files, GcCounts gc, string model)
    {
        Directory.CreateDirectory(dir);
        string stem = ReportStem.For("sessions" + (family is null ? "" : $"-{family}") + (profile is null ? "" : $"-{profile.Name}"), model);
        rows = profile is null ? rows : [.. rows.Select(r => r with { DeviceProfile = profile.Name })];
        string text = JsonSerializer.Serialize(rows, new JsonSerializerOptions { WriteIndented = true });
        File.WriteAllText(Path.Combine(dir, stem + ".json"), text);
        if (json is not null)
        {
            File.WriteAllText(json.FullName, text);
        }

        Plots.Sessions(rows, Path.Combine(dir, stem + ".png"));
        var md = new StringBuilder();
        md.AppendLine(profile is null ? "# Concurrent sessions (`coordgen bench sessions`)" : $"# Concurrent sessions, what-if on `{profile.Name}` (`coordgen bench sessions --device-profile {profile.Name}`)").AppendLine();
        md.AppendLine(stamp.ToMarkdown()).AppendLine();
        if (profile is not null)
        {
            md.AppendLine(CultureInfo.InvariantCulture, $"**{profile.Label}.** Every device step ran for real on the CPU and was then held until the profile's time for its graph width had passed (W = 1: {profile.StepMs(1):F1} ms; W = {width}: {profile.StepMs(width):F1} ms; a 32-token chunk: {profile.StepMs(32):F1} ms), and adaptive width costs each width by the profile, so tokens/s are the modes at the profile's step times (not measured on an NPU). Drafting, verification and the actors' own work are real. {paced.Paced} steps paced, {paced.Overran} of them took longer on the CPU than the profile allowed (those count at their real time).").AppendLine();
        }

        md.AppendLine(CultureInfo.InvariantCulture, $"Sessions run concurrently through the actor runtime on one loaded model; the device actor interleaves their prefill chunks and decode steps (packed: sessions ready together share one device run, each in its own slot against its own cache, plain tokens in width-1 runs and speculative trees in tree runs at one width, decisions 0016 and 0024; one per run: every device step carries one session). `ar` = plain greedy decoding; `spec` = `{method}` at the fixed W = {width}; `spec-adaptive` = `{method}` with adaptive width (the server's default) (each step verifies on width 1, 4 or {width}, whichever gives the session the most tokens per millisecond; docs/decisions/0006-adaptive-width.md). Prompts alternate task families (summary, rag, ui, reply, ...); aggregate tokens/s counts generated tokens over wall time, prefill included. {perSession} requests per session at each point, greedy; each point ran {rounds} time(s), the modes taking turns and starting with a different one each round, and the rows sum the rounds.").AppendLine();
        string root = ModelLocator.RepoRoot();
        md.AppendLine(CultureInfo.InvariantCulture, $"Workload: {string.Join(", ", files.Select(f => Path.GetRelativePath(root, f)))}. Generated tokens per request: {string.Join(", ", rows.Where(r => r.Mode == "ar").Select(r => string.Create(CultureInfo.InvariantCulture, $"{(double)r.Tokens / (r.Sessions * perSession * rounds):F1} at {r.Sessions} session(s)")))} (answers end at the model's end token or the request's max_tokens); the shorter the answers next to the prompts, the larger the prefill share and the less any decode speedup can show.").AppendLine();
        md.AppendLine(CultureInfo.InvariantCulture, $"Garbage collections during the timed runs: {gc.Gen0} gen0, {gc.Gen1} gen1, {gc.Gen2} gen2 (counts include the younger ones: a gen2 is also a gen1 and a gen0), {gc.PauseMs:F0} ms paused in all.").AppendLine();
        md.AppendLine("`prefill share` is the device's busy time in prefill chunks over its busy time; `decode tok/s (device)` counts generated tokens over device time in decode steps only, the decode phase's throughput without the prefill every mode pays alike.").AppendLine();
        bool bothCaches = rows.Select(r => r.PrefixCache).Distinct().Count() > 1;
        md.AppendLine(CultureInfo.InvariantCulture, $"Prefix cache: {(bothCaches ? "both ways (the `prefix cache` column)" : rows[0].PrefixCache ? "on" : "off")}; when on it is emptied before every pass, so a pass reuses only prompts it prefilled itself (docs/decisions/0019-prefix-cache.md).").AppendLine();
        bool bothMixes = rows.Where(r => r.Packed).Select(r => r.MixedSteps).Distinct().Count() > 1;
        md.AppendLine(CultureInfo.InvariantCulture, $"Mixed steps (decisions 0026, 0029): {(bothMixes ? "packed both ways (`packed` = `yes, mixed` when one-token steps, and trees with `--mixed-trees`, rode in prefill chunks' runs, `yes` when chunks ran alone)" : rows.Any(r => r.MixedSteps) ? "on: with packing, sessions whose next step is one token (a tree too, with `--mixed-trees`) ride in prefill chunks' runs" : "off: chunks run alone")}; a mixed run's time beyond the chunk alone (its recent solo time) counts as decode time, the rest as prefill.").AppendLine();
        bool bothBudgets = rows.Select(r => r.WidthBudget).Distinct().Count() > 1;
        if (bothBudgets)
        {
            md.AppendLine("Width budget (decision 0028): speculative modes both ways; `(widest)` rows took the widest pack of trees that pays, the others the width budget's choice of width and members by expected tokens per millisecond.").AppendLine();
        }

        if (widths.Any(d => d.Choice.Packed || WidthBudget.Widest(d.Snapshot).Packed))
        {
            // Both rules replayed on every logged snapshot (the device keeps the last 4,096), whichever was in force.
            var both = widths.Select(d => (Budget: WidthBudget.Choose(d.Snapshot), Widest: WidthBudget.Widest(d.Snapshot))).Where(x => x.Budget.Packed || x.Widest.Packed).ToList();
            int narrower = both.Count(x => x.Budget.Width < x.Widest.Width), otherMembers = both.Count(x => x.Budget.Width == x.Widest.Width && !x.Budget.SameAs(x.Widest));
            md.AppendLine(CultureInfo.InvariantCulture, $"Packed tree decisions logged: {both.Count}; replayed, the width budget chose a narrower width than the widest pack that pays in {narrower} ({narrower / (double)both.Count:P0}), other members at the same width in {otherMembers}; widths chosen by the budget: {string.Join(", ", both.GroupBy(x => x.Budget.Width).OrderBy(g => g.Key).Select(g => $"{g.Key}: {g.Count()}"))}; mean expected tokens per tree {both.Where(x => x.Budget.Packed).Select(x => x.Budget.ExpectedTokens / x.Budget.Members.Length).DefaultIfEmpty().Average():F2}.").AppendLine();
        }

        md.AppendLine("| sessions | mode | packed | prefix cache | aggregate tok/s | per-session tok/s | p50 inter-token ms | p99 inter-token ms | prefill share | decode tok/s (device) | sessions per decode run | identical to alone |").AppendLine("|---|---|---|---|---|---|---|---|---|---|---|---|");
        foreach (var r in rows)
        {
            md.AppendLine(CultureInfo.InvariantCulture, $"| {r.Sessions} | {Label(r)} | {(r.Packed ? bothMixes && r.MixedSteps ? "yes, mixed" : "yes" : "no")} | {(r.PrefixCache ? "on" : "off")} | {r.AggregateTokensPerS} | {r.PerSessionTokensPerS} | {r.P50IntertokenMs} | {r.P99IntertokenMs} | {r.PrefillShare:P0} | {r.DecodeTokensPerDeviceS} | {r.SessionsPerDecodeRun} | {(r.IdenticalToAlone ? "yes" : "NO")} |");
        }

        md.AppendLine();
        foreach (var (n, packed, mixed, cache) in rows.Select(r => (r.Sessions, r.Packed, r.MixedSteps, r.PrefixCache)).Distinct())
        {
            var ar = rows.First(r => r.Sessions == n && r.Packed == packed && r.MixedSteps == mixed && r.PrefixCache == cache && r.Mode == "ar");
            var parts = rows.Where(r => r.Sessions == n && r.Packed == packed && r.MixedSteps == mixed && r.PrefixCache == cache && r.Mode != "ar").Select(r => string.Create(CultureInfo.InvariantCulture,
                $"{Label(r)} / ar aggregate = {r.AggregateTokensPerS / ar.AggregateTokensPerS:F2}x (decode phase {r.DecodeTokensPerDeviceS / Math.Max(1e-9, ar.DecodeTokensPerDeviceS):F2}x)")).ToList();
            foreach (var b in rows.Where(r => bothBudgets && r.Sessions == n && r.Packed == packed && r.MixedSteps == mixed && r.PrefixCache == cache && r.Mode != "ar" && r.WidthBudget))
            {
                if (rows.FirstOrDefault(r => r.Sessions == n && r.Packed == packed && r.MixedSteps == mixed && r.PrefixCache == cache && r.Mode == b.Mode && !r.WidthBudget) is { } widest)
                {
                    parts.Insert(0, string.Create(CultureInfo.InvariantCulture, $"**{b.Mode} width budget / widest: aggregate {b.AggregateTokensPerS / widest.AggregateTokensPerS:F2}x, decode phase {b.DecodeTokensPerDeviceS / Math.Max(1e-9, widest.DecodeTokensPerDeviceS):F2}x**"));
                }
            }

            if (packed && rows.FirstOrDefault(r => r.Sessions == n && !r.Packed && r.PrefixCache == cache && r.Mode == "ar") is { } one)
            {
                parts.Insert(0, string.Create(CultureInfo.InvariantCulture, $"**packed ar / one-per-run ar: decode phase {ar.DecodeTokensPerDeviceS / Math.Max(1e-9, one.DecodeTokensPerDeviceS):F2}x, aggregate {ar.AggregateTokensPerS / one.AggregateTokensPerS:F2}x**"));
            }

            if (mixed && bothMixes)
            {
                var same = rows.Where(r => r.Sessions == n && r.Packed && r.MixedSteps && r.PrefixCache == cache).ToList();
                parts.Insert(0, "**mixed / chunks alone, aggregate: " + string.Join(", ", same.Select(r => rows.FirstOrDefault(x => x.Sessions == n && x.Packed && !x.MixedSteps && x.PrefixCache == cache && x.Mode == r.Mode) is { } alone
                    ? string.Create(CultureInfo.InvariantCulture, $"{r.Mode} {r.AggregateTokensPerS / alone.AggregateTokensPerS:F2}x") : r.Mode + " -")) + "**");
            }

            // Amdahl: prefill costs every mode the same, so even a free decode phase lifts the aggregate by at most 1 / prefill share.
            if (bothCaches && cache && rows.FirstOrDefault(r => r.Sessions == n && r.Packed == packed && !r.PrefixCache && r.Mode == "ar") is { } cold)
            {
                parts.Insert(0, string.Create(CultureInfo.InvariantCulture, $"**ar with the prefix cache / without: aggregate {ar.AggregateTokensPerS / cold.AggregateTokensPerS:F2}x**"));
            }

            md.AppendLine(CultureInfo.InvariantCulture, $"- {n} session(s), {(packed ? bothMixes ? mixed ? "packed, mixed" : "packed, chunks alone" : "packed" : "one per run")}{(bothCaches ? (cache ? ", prefix cache on" : ", prefix cache off") : "")}: {string.Join("; ", parts)}; ceiling for any decode speedup at ar's prefill share {ar.PrefillShare:P0}: {1 / Math.Max(1e-9, ar.PrefillShare):F2}x");
        }

        md.AppendLine().AppendLine(CultureInfo.InvariantCulture, $"![sessions]({stem}.png)");
        File.WriteAllText(Path.Combine(dir, stem + ".md"), md.ToString());
        ConsoleUi.Err.MarkupLineInterpolated($"[green]wrote {dir}/{stem}.md[/]");
    }
}
