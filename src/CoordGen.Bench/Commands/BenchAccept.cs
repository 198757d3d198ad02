using System.CommandLine;
using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Json.Serialization;
using CoordGen.Engine;
using CoordGen.Engine.Generation;
using CoordGen.Engine.Model;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Scheduling;
using CoordGen.Engine.Speculative;
using CoordGen.Engine.Workloads;
using Spectre.Console;

namespace CoordGen.Host.Commands;

/// <summary>One (method, task, width) row of <c>coordgen bench accept</c>.</summary>
internal sealed record AcceptRow
{
    [JsonPropertyName("method")] public required string Method { get; init; }
    [JsonPropertyName("task")] public required string Task { get; init; }
    [JsonPropertyName("width")] public required int Width { get; init; }
    [JsonPropertyName("mean_accepted")] public double MeanAccepted { get; init; }
    [JsonPropertyName("tokens_per_s")] public double TokensPerS { get; init; }
    [JsonPropertyName("speedup")] public double Speedup { get; init; }
    [JsonPropertyName("identical_to_ar")] public bool IdenticalToAr { get; init; }
    [JsonPropertyName("prompts")] public int Prompts { get; init; }
    [JsonPropertyName("tokens")] public long Tokens { get; init; }
    [JsonPropertyName("steps")] public long Steps { get; init; }
    [JsonPropertyName("draft_ms_per_step")] public double DraftMsPerStep { get; init; }
    [JsonPropertyName("calibration_ms_per_context_token")] public double CalibrationMsPerContextToken { get; init; }
    [JsonPropertyName("accepted_by_source")] public Dictionary<string, long> AcceptedBySource { get; init; } = new();
    [JsonPropertyName("proposed_by_source")] public Dictionary<string, long> ProposedBySource { get; init; } = new();

    /// <summary>
    /// Tokens per step of the best copy from the text after an earlier occurrence of the last token, at
    /// every step of this task's greedy outputs (<see cref="Engine.Speculative.CopyCeiling"/>): the most
    /// any suffix-matching drafter could reach. The same for every method and width of a task.
    /// </summary>
    [JsonPropertyName("copy_ceiling")] public double CopyCeiling { get; init; }

    /// <summary>The linear layers' weight format of this run (f32, int8, int4).</summary>
    [JsonPropertyName("weights")] public string Weights { get; init; } = "f32";

    /// <summary>As <see cref="CopyCeiling"/>, but a copy may start anywhere (knowing the output in advance; no drafter can).</summary>
    [JsonPropertyName("any_copy_ceiling")] public double AnyCopyCeiling { get; init; }

    /// <summary>Rounds this row pools (--rounds): its rates (mean_accepted, tokens/s, speedup, per-step and per-token times) are the
    /// medians of the rounds, its counts (prompts, tokens, steps, accepted and proposed by source) their sums; null with one round.</summary>
    [JsonPropertyName("rounds")][JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] public int? Rounds { get; init; }

    /// <summary>The smallest and largest <see cref="Speedup"/> of the rounds (--rounds); null with one round.</summary>
    [JsonPropertyName("speedup_min")][JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] public double? SpeedupMin { get; init; }

    [JsonPropertyName("speedup_max")][JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] public double? SpeedupMax { get; init; }

    /// <summary>The smallest and largest <see cref="TokensPerS"/> of the rounds (--rounds); null with one round.</summary>
    [JsonPropertyName("tokens_per_s_min")][JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] public double? TokensPerSMin { get; init; }

    [JsonPropertyName("tokens_per_s_max")][JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] public double? TokensPerSMax { get; init; }

    /// <summary>Verification steps per width they ran at (with adaptive width, its choices; width 1 = a plain step), summed over the prompts (and rounds).</summary>
    [JsonPropertyName("steps_by_width")] public IReadOnlyDictionary<int, long> StepsByWidth { get; init; } = new Dictionary<int, long>();

    /// <summary>What-if (with --device-profile): speedup over ar if the profile's step times applied to these steps (at the widths they ran at) and drafting times. Not measured.</summary>
    [JsonPropertyName("profile_speedup")][JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] public double? ProfileSpeedup { get; init; }
}

/// <summary>
/// <c>coordgen bench accept</c>: every method on workload prompts, side by side in one process; greedy
/// outputs are compared with plain greedy (ar) token for token. Each prompt is prefilled once and
/// every method decodes from a copy of that cache, so decode speed is compared on equal footing.
/// </summary>
internal static class BenchAccept
{
    public static readonly string[] AllMethods = ["ar", "pld", "sam", "sam+history", "pld+ours", "sam+ours"];

    public static Command Create()
    {
        var model = CommonOptions.Model();
        var workloads = new Option<string[]>("--workload", "-w")
        {
            Description = "Workload JSONL file(s); repeat the option for several. Default: workloads/{summary,rag,ui,reply}.jsonl.",
            AllowMultipleArgumentsPerToken = true,
        };
        var widths = new Option<string>("--width") { Description = "Comma-separated verification widths.", DefaultValueFactory = _ => "8,16,32,64" };
        var methods = new Option<string>("--methods") { Description = $"Comma-separated methods: {string.Join(", ", AllMethods)}.", DefaultValueFactory = _ => string.Join(",", AllMethods) };
        var limit = new Option<int>("--limit") { Description = "Prompts per workload file (0 = all).", DefaultValueFactory = _ => 0 };
        var json = new Option<FileInfo?>("--json") { Description = "Write the result rows as JSON here.", HelpName = "OUT.json" };
        var outDir = new Option<DirectoryInfo?>("--out") { Description = "Report folder (default docs/bench/ of the checkout).", HelpName = "DIR" };
        var capacity = CommonOptions.Capacity();
        var calibK = new Option<int>("--calib-k") { Description = "Calibration: next-token candidates per context position.", DefaultValueFactory = _ => new CalibrationOptions().TopK };
        var calibDepth = new Option<int>("--calib-depth") { Description = "Calibration: tokens per calibrated path.", DefaultValueFactory = _ => new CalibrationOptions().Depth };
        var calibMinP = new Option<float>("--calib-min-p") { Description = "Calibration: smallest probability followed.", DefaultValueFactory = _ => new CalibrationOptions().MinProbability };
        var weights = new Option<string>("--weights") { Description = "Comma-separated weight formats (f32, int8, int4; docs/decisions/0012-quantized-weights.md), run side by side prompt by prompt; each format's speedups are over its own plain decoding, and the report compares the formats' tokens/s.", DefaultValueFactory = _ => "f32" };
        var adaptive = new Option<bool>("--adaptive-width") { Description = "Speculative methods choose their width per step (1, 4 or up to --width) from the model's own measured step costs, as the server does by default (docs/decisions/0006-adaptive-width.md); mean_accepted then counts plain steps too. --adaptive-width false verifies every step at the full width.", DefaultValueFactory = _ => true };
        var rounds = new Option<int>("--rounds") { Description = "Times to run every prompt (every format and method each time). With more than one, each row gives the median of the rounds and the spread of its speedup and tokens/s, and the formats' ratios their spread: this shared machine's speed swings between runs, so a single run can mislead.", DefaultValueFactory = _ => 1 };
        var deviceProfile = CommonOptions.DeviceProfile("What-if: also report the speedup these acceptance counts would give at this accelerator profile's step times (profile_speedup; not measured, labelled as such).");
        var cmd = new Command("accept", "Acceptance ratio, decode tokens/s and speedup over plain greedy for each drafting method, task and verification width, with a check that greedy outputs match plain greedy token for token. Writes Markdown, JSON and a PNG plot.")
        {
            model, workloads, widths, methods, limit, json, outDir, capacity, calibK, calibDepth, calibMinP, deviceProfile, adaptive, weights, rounds,
        };
        cmd.SetAction(parse =>
        {
            var ws = parse.GetValue(widths)!.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Select(int.Parse).ToList();
            if (ws.Any(w => w < 2 || w > 256))
            {
                throw new ArgumentException("--width values must be between 2 and 256.");
            }

            int nRounds = parse.GetValue(rounds);
            if (nRounds < 1 || nRounds > 20)
            {
                throw new ArgumentException($"--rounds must be between 1 and 20 (got {nRounds}).");
            }

            var ms = parse.GetValue(methods)!.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).ToList();
            if (!ms.Contains("ar"))
            {
                ms.Insert(0, "ar"); // the baseline of every speedup, always measured
            }
            foreach (var m in ms.Where(m => m != "ar"))
            {
                _ = SpeculationOptions.ForMethod(m, 8);
            }

            string root = ModelLocator.RepoRoot();
            var files = parse.GetValue(workloads) is { Length: > 0 } given ? given.ToList()
                : new[] { "summary", "rag", "ui", "reply" }.Select(t => Path.Combine(root, "workloads", t + ".jsonl")).ToList();
            var bundle = ConsoleUi.LoadModel(ModelLocator.Resolve(parse.GetValue(model)));
            int cap = parse.GetValue(capacity);
            var formats = parse.GetValue(weights)!.Split(',', StringSplitOptions.RemoveEmptyEntries).Select(WeightQuantizer.Parse).Distinct().ToList();
            var runtimes = formats.Select(f => ConsoleUi.Status($"compiling the {WeightQuantizer.Name(f)} graphs", () =>
            {
                var r = new OrtModelRuntime(bundle.Weights, cap, [.. new[] { 1, 64 }.Concat(ws).Concat(parse.GetValue(adaptive) ? [4] : []).Distinct()], new RuntimeOptions { Weights = f });
                r.CompileAll();
                return r;
            })).ToList();
            var calib = new CalibrationOptions { TopK = parse.GetValue(calibK), Depth = parse.GetValue(calibDepth), MinProbability = parse.GetValue(calibMinP) };
            var profile = parse.GetValue(deviceProfile) is { } pn ? DeviceProfile.Load(pn) : null;
            List<AcceptRow> rows;
            var perRound = new List<List<AcceptRow>>();
            try
            {
                for (int i = 0; i < nRounds; i++)
                {
                    if (nRounds > 1)
                    {
                        ConsoleUi.Err.MarkupLineInterpolated($"[grey]round {i + 1} of {nRounds}[/]");
                    }

                    perRound.Add(Run(bundle, runtimes, files, ws, ms, parse.GetValue(limit), calib, parse.GetValue(adaptive), profile));
                }

                rows = Pool(perRound);
            }
            finally
            {
                runtimes.ForEach(r => r.Dispose());
            }

            if (profile is not null)
            {
                // Per token: (the profile's step at the width each step ran at + our measured drafting) / tokens.
                rows = [.. rows.Select(r => r with { ProfileSpeedup = ProfileSpeedup(r, profile) })];
            }

            Report(rows, perRound, bundle, parse.GetValue(json), parse.GetValue(outDir), ws, ms, parse.GetValue(limit), files, profile, parse.GetValue(adaptive), formats);
            return 0;
        });
        return cmd;
    }

    internal static List<AcceptRow> Run(ModelBundle bundle, OrtModelRuntime rt, List<string> files, List<int> widths, List<string> methods, int limit, CalibrationOptions calib, bool adaptive = false) =>
        Run(bundle, [rt], files, widths, methods, limit, calib, adaptive);

    /// <summary>Every runtime (one per weight format) runs every prompt in turn, so formats meet the same drift in the machine's speed.</summary>
    internal static List<AcceptRow> Run(ModelBundle bundle, IReadOnlyList<OrtModelRuntime> runtimes, List<string> files, List<int> widths, List<string> methods, int limit, CalibrationOptions calib, bool adaptive = false, DeviceProfile? profile = null)
    {
        var rows = new List<AcceptRow>();
        var engines = runtimes.Select(r => (Runtime: r, Plain: new Generator(r), Spec: new SpeculativeDecoder(r), Name: WeightQuantizer.Name(r.WeightFormat))).ToList();
        var greedy = new SamplingOptions();
        var stops = bundle.StopTokens;
        AnsiConsole.Progress().Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new ElapsedTimeColumn(), new RemainingTimeColumn()).Start(ctx =>
        {
            foreach (var file in files)
            {
                var items = WorkloadItem.Load(file);
                if (limit > 0)
                {
                    items = items.Take(limit).ToList();
                }

                string task = items.Count > 0 ? items[0].Task : Path.GetFileNameWithoutExtension(file);
                var progress = ctx.AddTask($"{task} ({items.Count} prompts)", maxValue: items.Count);
                var acc = new Dictionary<(string, string, int), Accum>();
                var histories = new Dictionary<(string, int), HistoryStore>();
                long ceilTokens = 0, ceilSteps = 0, anyCeilSteps = 0;
                int maxDraft = new SpeculationOptions().MaxDraft;
                foreach (var item in items)
                {
                    int[] prompt = bundle.Tokenizer.Encode(PromptTemplate.Render(item.Context, item.Prompt, bundle.HasRoleTokens));
                    foreach (var (rt, plain, spec, fmt) in engines)
                    {
                        using var pre = spec.Prefill(prompt, calib);
                        using var arCache = rt.CreateCache();
                        arCache.CopyFrom(pre.Cache);
                        var ar = plain.Decode(arCache, pre.LastLogits, prompt.Length, pre.PrefillMs, item.MaxTokens, greedy, stops);
                        int[] arTokens = [.. ar.Tokens];
                        if (rt == engines[0].Runtime)
                        {
                            ceilTokens += arTokens.Length;
                            ceilSteps += CopyCeiling.Steps(prompt, arTokens, maxDraft, afterLastToken: true);
                            anyCeilSteps += CopyCeiling.Steps(prompt, arTokens, maxDraft, afterLastToken: false);
                        }

                        if (methods.Contains("ar"))
                        {
                            foreach (int w in widths)
                            {
                                Get(acc, fmt, "ar", w).Add(ar.Tokens.Count, ar.Tokens.Count, ar.Stats.DecodeMs, 0, 0, 0, true, null);
                            }
                        }

                        foreach (var m in methods.Where(m => m != "ar"))
                        {
                            foreach (int w in widths)
                            {
                                // With a device profile, adaptive width prices each width at the profile's step time, as the server does with
                                // --device-profile: its choices are then the same on every run (and machine).
                                var opts = SpeculationOptions.ForMethod(m, w) with { Calibration = calib, AdaptiveWidth = adaptive, WidthCostMs = profile is null ? null : profile.StepMs };
                                HistoryStore? history = null;
                                if (opts.UseHistory && !histories.TryGetValue((fmt, w), out history))
                                {
                                    histories[(fmt, w)] = history = new HistoryStore();
                                }

                                // A plain decode right before each speculative one: the speedup compares runs moments
                                // apart, so the machine's drifts in speed land on both sides.
                                arCache.CopyFrom(pre.Cache);
                                var pair = plain.Decode(arCache, pre.LastLogits, prompt.Length, pre.PrefillMs, item.MaxTokens, greedy, stops);
                                var r = spec.Generate(pre, item.MaxTokens, greedy, stops, opts, history);
                                Get(acc, fmt, m, w).AddPairedPlain(pair.Tokens.Count, pair.Stats.DecodeMs);
                                bool same = r.Tokens.SequenceEqual(ar.Tokens);
                                Get(acc, fmt, m, w).Add(r.Tokens.Count, r.Accounting.Steps, r.Stats.DecodeMs, r.DraftMs, opts.UseCalibration ? r.CalibrationMs : 0,
                                    opts.UseCalibration ? prompt.Length : 0, same, r.Accounting);
                            }
                        }

                        foreach (var ((hf, _), h) in histories)
                        {
                            if (hf == fmt)
                            {
                                h.Add(ar.Tokens.ToArray());
                            }
                        }
                    }

                    progress.Increment(1);
                }

                foreach (var ((fmt, m, w), a) in acc)
                {
                    var arAcc = acc.GetValueOrDefault((fmt, "ar", w));
                    double tps = a.Tokens / (a.DecodeMs / 1000);
                    double arTps = m == "ar" ? tps : a.PairedPlainMs > 0 ? a.PairedPlainTokens / (a.PairedPlainMs / 1000)
                        : arAcc is null ? double.NaN : arAcc.Tokens / (arAcc.DecodeMs / 1000);
                    rows.Add(new AcceptRow
                    {
                        Method = m,
                        Task = task,
                        Width = w,
                        MeanAccepted = a.Steps == 0 ? 0 : (double)a.Tokens / a.Steps,
                        TokensPerS = tps,
                        Speedup = tps / arTps,
                        IdenticalToAr = a.AllSame,
                        Prompts = a.Prompts,
                        Tokens = a.Tokens,
                        Steps = a.Steps,
                        DraftMsPerStep = a.Steps == 0 ? 0 : a.DraftMs / a.Steps,
                        CalibrationMsPerContextToken = a.ContextTokens == 0 ? 0 : a.CalibrationMs / a.ContextTokens,
                        AcceptedBySource = Enum.GetValues<DraftSource>().ToDictionary(s => s.ToString().ToLowerInvariant(), s => a.Accepted[(int)s]),
                        ProposedBySource = Enum.GetValues<DraftSource>().ToDictionary(s => s.ToString().ToLowerInvariant(), s => a.Proposed[(int)s]),
                        CopyCeiling = ceilSteps == 0 ? 0 : (double)ceilTokens / ceilSteps,
                        AnyCopyCeiling = anyCeilSteps == 0 ? 0 : (double)ceilTokens / anyCeilSteps,
                        Weights = fmt,
                        StepsByWidth = m == "ar" ? new Dictionary<int, long> { [1] = a.Steps } : new Dictionary<int, long>(a.StepsByWidth),
                    });
                }
            }
        });
        return rows;
    }

    /// <summary>A row's speedup over ar at <paramref name="profile"/>'s step times: its tokens at the profile's width-1 step,
    /// over its steps at the profile's time for the width each ran at plus its measured drafting.</summary>
    internal static double? ProfileSpeedup(AcceptRow r, DeviceProfile profile)
    {
        if (r.Tokens <= 0 || r.Steps <= 0)
        {
            return null;
        }

        if (r.Method == "ar")
        {
            return 1.0;
        }

        double ms = r.StepsByWidth.Count > 0 ? r.StepsByWidth.Sum(kv => kv.Value * profile.StepMs(kv.Key)) : r.Steps * profile.StepMs(r.Width);
        return r.Tokens * profile.StepMs(1) / (ms + (r.Steps * r.DraftMsPerStep));
    }

    /// <summary>
    /// One row per (task, weights, method, width) over the rounds: the median of each rate, the sum of each count, the
    /// spread of speedup and tokens/s, and identical only if every round was. One round: its rows as they are.
    /// </summary>
    internal static List<AcceptRow> Pool(IReadOnlyList<List<AcceptRow>> perRound)
    {
        if (perRound.Count == 1)
        {
            return perRound[0];
        }

        return [.. perRound.SelectMany(r => r).GroupBy(r => (r.Task, r.Weights, r.Method, r.Width)).Select(g =>
        {
            var all = g.ToList();
            return all[0] with
            {
                MeanAccepted = Median(all.Select(r => r.MeanAccepted)),
                TokensPerS = Median(all.Select(r => r.TokensPerS)),
                Speedup = Median(all.Select(r => r.Speedup)),
                DraftMsPerStep = Median(all.Select(r => r.DraftMsPerStep)),
                CalibrationMsPerContextToken = Median(all.Select(r => r.CalibrationMsPerContextToken)),
                IdenticalToAr = all.All(r => r.IdenticalToAr),
                Prompts = all.Sum(r => r.Prompts),
                Tokens = all.Sum(r => r.Tokens),
                Steps = all.Sum(r => r.Steps),
                AcceptedBySource = all.SelectMany(r => r.AcceptedBySource).GroupBy(kv => kv.Key).ToDictionary(k => k.Key, k => k.Sum(kv => kv.Value)),
                ProposedBySource = all.SelectMany(r => r.ProposedBySource).GroupBy(kv => kv.Key).ToDictionary(k => k.Key, k => k.Sum(kv => kv.Value)),
                StepsByWidth = all.SelectMany(r => r.StepsByWidth).GroupBy(kv => kv.Key).OrderBy(k => k.Key).ToDictionary(k => k.Key, k => k.Sum(kv => kv.Value)),
                Rounds = all.Count,
                SpeedupMin = all.Min(r => r.Speedup),
                SpeedupMax = all.Max(r => r.Speedup),
                TokensPerSMin = all.Min(r => r.TokensPerS),
                TokensPerSMax = all.Max(r => r.TokensPerS),
            };
        })];
    }

    private static double Median(IEnumerable<double> xs)
    {
        var s = xs.Order().ToList();
        return s.Count % 2 == 1 ? s[s.Count / 2] : (s[(s.Count / 2) - 1] + s[s.Count / 2]) / 2;
    }

    private static Accum Get(Dictionary<(string, string, int), Accum> d, string fmt, string m, int w)
    {
        if (!d.TryGetValue((fmt, m, w), out var a))
        {
            d[(fmt, m, w)] = a = new Accum();
        }

        return a;
    }

    private sealed class Accum
    {
        public long Tokens;
        public long Steps;
        public double DecodeMs;
        public double DraftMs;
        public double CalibrationMs;
        public long ContextTokens;
        public int Prompts;
        public bool AllSame = true;
        public long PairedPlainTokens;
        public double PairedPlainMs;
        public readonly long[] Accepted = new long[4];
        public readonly SortedDictionary<int, long> StepsByWidth = [];
        public readonly long[] Proposed = new long[4];

        /// <summary>The plain decode run next to this method's run of the same prompt (the speedup's denominator).</summary>
        public void AddPairedPlain(long tokens, double decodeMs)
        {
            PairedPlainTokens += tokens;
            PairedPlainMs += decodeMs;
        }

        public void Add(long tokens, long steps, double decodeMs, double draftMs, double calMs, long ctxTokens, bool same, DraftAccounting? acct)
        {
            Tokens += tokens;
            Steps += steps;
            DecodeMs += decodeMs;
            DraftMs += draftMs;
            CalibrationMs += calMs;
            ContextTokens += ctxTokens;
            Prompts++;
            AllSame &= same;
            if (acct is not null)
            {
                foreach (var s in Enum.GetValues<DraftSource>())
                {
                    Accepted[(int)s] += acct.Accepted(s);
                    Proposed[(int)s] += acct.Proposed(s);
                }

                foreach (var (w, n) in acct.StepsByWidth)
                {
                    StepsByWidth[w] = StepsByWidth.GetValueOrDefault(w) + n;
                }
            }
        }
    }

    private static void Report(List<AcceptRow> rows, IReadOnlyList<List<AcceptRow>> perRound, ModelBundle bundle, FileInfo? json, DirectoryInfo? outDir, List<int> widths, List<string> methods, int limit, List<string> files, DeviceProfile? profile, bool adaptive, List<WeightFormat> formats)
    {
        bool plainF32 = formats is [WeightFormat.F32];
        string formatList = string.Join(",", formats.Select(WeightQuantizer.Name));
        string stem = ReportStem.For("accept", bundle.Name) + (plainF32 ? "" : "-" + string.Join("-", formats.Select(WeightQuantizer.Name)));
        var opts = new JsonSerializerOptions { WriteIndented = true };
        string dir = outDir?.FullName ?? Path.Combine(ModelLocator.RepoRoot(), "docs", "bench");
        Directory.CreateDirectory(dir);
        string jsonText = JsonSerializer.Serialize(rows, opts);
        if (json is not null)
        {
            File.WriteAllText(json.FullName, jsonText);
        }

        File.WriteAllText(Path.Combine(dir, stem + ".json"), jsonText);
        var stamp = BenchStamp.Capture();
        var tasks = rows.Select(r => r.Task).Distinct().ToList();
        var md = new StringBuilder();
        md.AppendLine(CultureInfo.InvariantCulture, $"# Acceptance and decode speed by method: {bundle.Name}");
        md.AppendLine();
        md.AppendLine(stamp.ToMarkdown());
        md.AppendLine(CultureInfo.InvariantCulture, $"Command: `coordgen bench accept{(bundle.Name == "coordgen-demo" ? "" : $" --model {bundle.Directory}")} --width {string.Join(",", widths)}{(adaptive ? "" : " --adaptive-width false")}{(plainF32 ? "" : $" --weights {formatList}")} --methods {string.Join(",", methods)}{(limit > 0 ? $" --limit {limit}" : "")}{(perRound.Count > 1 ? $" --rounds {perRound.Count}" : "")}{(profile is null ? "" : $" --device-profile {profile.Name}")}` over {string.Join(", ", files.Select(Path.GetFileName))}. Greedy decoding; every method decodes from a copy of the same prefilled cache, in one process, prompt by prompt.");
        md.AppendLine();
        md.AppendLine("`mean_accepted` is tokens committed per verification step (accepted draft tokens plus the model's own next token; 1.0 for plain decoding). `speedup` is decode tokens/s over plain greedy decoding of the same prompts, each speculative run paired with a plain run right before it (this shared machine drifts in speed; a pair sees the same drift). `ar`'s own row is its first run of each prompt. `identical` is whether every greedy output equalled plain greedy token for token.");
        if (perRound.Count > 1)
        {
            md.AppendLine();
            md.AppendLine(CultureInfo.InvariantCulture, $"{perRound.Count} rounds, each running every prompt with every format and method: each rate is the median of the rounds, with the range of the rounds in parentheses. A format ratio is the median of the rounds' own ratios, so it can differ from the ratio of the medians in the rows above it.");
        }

        md.AppendLine();
        md.AppendLine(adaptive
            ? "Adaptive width (the default, as in the server): each step verifies at the width with the most expected tokens per millisecond on this model's own measured step costs (docs/decisions/0006-adaptive-width.md), up to the row's `width`; `mean_accepted` counts its plain steps too."
            : "Fixed width (`--adaptive-width false`): every step verifies at the row's `width`.");
        foreach (var task in tasks)
        {
            md.AppendLine();
            md.AppendLine(CultureInfo.InvariantCulture, $"## {task}");
            md.AppendLine();
            md.AppendLine("| weights | method | width | mean_accepted | tokens/s | speedup | identical | draft ms/step |");
            md.AppendLine("|---|---|---|---|---|---|---|---|");
            foreach (var r in rows.Where(r => r.Task == task).OrderBy(r => formatList.IndexOf(r.Weights, StringComparison.Ordinal)).ThenBy(r => Array.IndexOf(AllMethods, r.Method)).ThenBy(r => r.Width))
            {
                string tps = r.Rounds is null ? r.TokensPerS.ToString("F0", CultureInfo.InvariantCulture) : string.Create(CultureInfo.InvariantCulture, $"{r.TokensPerS:F0} ({r.TokensPerSMin:F0}-{r.TokensPerSMax:F0})");
                string speedup = r.Rounds is null ? r.Speedup.ToString("F2", CultureInfo.InvariantCulture) + "x" : string.Create(CultureInfo.InvariantCulture, $"{r.Speedup:F2}x ({r.SpeedupMin:F2}-{r.SpeedupMax:F2})");
                md.AppendLine(CultureInfo.InvariantCulture, $"| {r.Weights} | {r.Method} | {r.Width} | {r.MeanAccepted:F2} | {tps} | {speedup} | {(r.IdenticalToAr ? "yes" : "**NO**")} | {r.DraftMsPerStep:F3} |");
            }

            if (formats.Count > 1)
            {
                string baseFormat = WeightQuantizer.Name(formats[0]);
                md.AppendLine();
                md.AppendLine(CultureInfo.InvariantCulture, $"Formats side by side (each prompt ran every format in turn): decode tokens/s over {baseFormat}'s for the same method and width.");
                md.AppendLine();
                md.AppendLine("| method | width | " + string.Join(" | ", formats.Skip(1).Select(f => $"{WeightQuantizer.Name(f)} / {baseFormat}")) + " |");
                md.AppendLine("|---|---|" + string.Concat(formats.Skip(1).Select(_ => "---|")));
                foreach (var g in rows.Where(r => r.Task == task && r.Weights == baseFormat).OrderBy(r => Array.IndexOf(AllMethods, r.Method)).ThenBy(r => r.Width))
                {
                    // Each round's ratio (the same prompts, format beside format), then their median and range.
                    var cells = formats.Skip(1).Select(f =>
                    {
                        var ratios = perRound.Select(round => (Base: round.FirstOrDefault(r => r.Task == task && r.Weights == baseFormat && r.Method == g.Method && r.Width == g.Width),
                                Other: round.FirstOrDefault(r => r.Task == task && r.Weights == WeightQuantizer.Name(f) && r.Method == g.Method && r.Width == g.Width)))
                            .Where(x => x.Base is not null && x.Other is not null).Select(x => x.Other!.TokensPerS / x.Base!.TokensPerS).ToList();
                        if (ratios.Count == 0)
                        {
                            return "";
                        }

                        double median = Median(ratios);
                        return ratios.Count == 1
                            ? median.ToString("F2", CultureInfo.InvariantCulture) + "x"
                            : string.Create(CultureInfo.InvariantCulture, $"{median:F2}x ({ratios.Min():F2}-{ratios.Max():F2})");
                    });
                    md.AppendLine($"| {g.Method} | {g.Width} | " + string.Join(" | ", cells) + " |");
                }
            }

            var first = rows.First(r => r.Task == task);
            var baselines = new[] { "pld", "sam" }.Select(m => (m, best: rows.Where(r => r.Task == task && r.Method == m).Select(r => r.MeanAccepted).DefaultIfEmpty(0).Max())).Where(x => x.best > 0).ToList();
            md.AppendLine();
            md.AppendLine(CultureInfo.InvariantCulture, $"Copy ceiling: **{first.CopyCeiling:F2}** tokens per step (`copy_ceiling`) if every step copied the best continuation (up to {new SpeculationOptions().MaxDraft} tokens) following an earlier occurrence of the last token in prompt + output: no suffix-matching drafter (pld, sam, the copy part of ours) gets more; only drafts the model predicts (calibrated, reused) can. {first.AnyCopyCeiling:F2} (`any_copy_ceiling`) if a copy could start anywhere, knowing the output in advance.{string.Concat(baselines.Select(b => $" Over {b.m}'s best ({b.best:F2}): {first.CopyCeiling / b.best:F2}x."))}");
        }

        if (profile is not null)
        {
            md.AppendLine();
            md.AppendLine(CultureInfo.InvariantCulture, $"## What-if: the same acceptance at `{profile.Name}` step times");
            md.AppendLine();
            md.AppendLine(CultureInfo.InvariantCulture, $"**{profile.Label}.** `profile_speedup` = tokens x the profile's width-1 step / (each step at the profile's time for the width it ran at, `steps_by_width`, + our measured drafting per step): what these steps would give where a W-token step costs what the profile says; with adaptive width the widths were chosen by the profile's step times too, as the server chooses them with `--device-profile`, so those choices are the same on any machine (width 1: {profile.StepMs(1):F1} ms; {string.Join("; ", widths.Select(w => $"width {w}: {profile.StepMs(w):F1} ms"))}). Projected from the measured acceptance, not measured on a device.");
            md.AppendLine();
            md.AppendLine("| task | method | " + string.Join(" | ", widths.Select(w => $"W={w}")) + " |");
            md.AppendLine("|---|---|" + string.Concat(widths.Select(_ => "---|")));
            foreach (var task in tasks)
            {
                foreach (var m in methods.Where(m => m != "ar"))
                {
                    var cells = widths.Select(w => rows.FirstOrDefault(r => r.Task == task && r.Method == m && r.Width == w)?.ProfileSpeedup is { } x ? x.ToString("F2", CultureInfo.InvariantCulture) + "x" : "");
                    md.AppendLine("| " + task + " | " + m + " | " + string.Join(" | ", cells) + " |");
                }
            }
        }

        md.AppendLine();
        md.AppendLine(CultureInfo.InvariantCulture, $"![acceptance by method]({stem}.png)");
        File.WriteAllText(Path.Combine(dir, stem + ".md"), md.ToString());
        Plots.AcceptPlot(rows, Path.Combine(dir, stem + ".png"));

        var t = new Table().AddColumns("task", "method", "width", "mean acc.", "tok/s", "speedup", "identical", "draft ms/step");
        foreach (var r in rows.OrderBy(r => r.Task).ThenBy(r => Array.IndexOf(AllMethods, r.Method)).ThenBy(r => r.Width))
        {
            t.AddRow(r.Task, r.Method, r.Width.ToString(CultureInfo.InvariantCulture), r.MeanAccepted.ToString("F2", CultureInfo.InvariantCulture),
                r.TokensPerS.ToString("F0", CultureInfo.InvariantCulture), r.Speedup.ToString("F2", CultureInfo.InvariantCulture) + "x",
                r.IdenticalToAr ? "yes" : "[red]NO[/]", r.DraftMsPerStep.ToString("F3", CultureInfo.InvariantCulture));
        }

        AnsiConsole.Write(t);
        ConsoleUi.Err.MarkupLineInterpolated($"[grey]wrote {dir}/{stem}.md, .json and .png[/]");
    }
}
