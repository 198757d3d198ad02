using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Json.Serialization;
using CoordGen.Engine.Model;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Scheduling;
using Spectre.Console;

namespace CoordGen.Host.Commands;

/// <summary>One strategy's measurement in <c>coordgen bench graphs</c>.</summary>
internal sealed record GraphsRow
{
    [JsonPropertyName("strategy")] public required string Strategy { get; init; }
    [JsonPropertyName("ttft_ms")] public double TtftMs { get; init; }
    [JsonPropertyName("first_step_ms")] public double FirstStepMs { get; init; }
    [JsonPropertyName("ready_ms")] public double ReadyMs => Math.Round(TtftMs + FirstStepMs, 1);
    [JsonPropertyName("peak_mb")] public double PeakMb { get; init; }
    [JsonPropertyName("setup_ms")] public double SetupMs { get; init; }
    [JsonPropertyName("plan")] public string? Plan { get; init; }

    /// <summary>The next request, arriving right after the first step: its prefill needs the wide graph back.</summary>
    [JsonPropertyName("second_ttft_ms")] public double? SecondTtftMs { get; init; }
    [JsonPropertyName("second_first_step_ms")] public double? SecondFirstStepMs { get; init; }
    [JsonPropertyName("second_peak_mb")] public double? SecondPeakMb { get; init; }
    [JsonPropertyName("simulated")] public bool Simulated { get; init; }
}

/// <summary>
/// <c>coordgen bench graphs</c>: time to first token, the first verification step and peak memory for
/// four ways of getting from a wide prefill graph to a narrow verification graph (paper §3.2), on a
/// block-split model with real graph loads. Each strategy runs in its own process so its peak memory
/// (VmHWM) is its own.
/// </summary>
internal static class BenchGraphs
{
    public static readonly string[] Strategies = ["single", "sync", "progressive", "resident"];

    private static int Threads { get; set; } = 1;

    public static Command Create()
    {
        var model = CommonOptions.Model();
        var promptTokens = new Option<int>("--prompt-tokens") { Description = "Prompt length (random token ids; only timing matters).", DefaultValueFactory = _ => 1024 };
        var wide = new Option<int>("--wide") { Description = "Prefill graph width G1 (the chunk size).", DefaultValueFactory = _ => 256 };
        var narrow = new Option<int>("--narrow") { Description = "Verification graph width G2.", DefaultValueFactory = _ => 32 };
        var blocks = new Option<int>("--blocks") { Description = "Blocks the model is split into (more blocks: less memory held twice while one switches).", DefaultValueFactory = _ => 6 };
        var capacity = new Option<int>("--capacity") { Description = "KV slots (static C of every graph).", DefaultValueFactory = _ => 1536 };
        var threads = new Option<int>("--threads") { Description = "Intra-op threads for compute. Default 1: one core plays the accelerator and the other stays free for graph loads, as an NPU's loads do not take its compute (with every core computing, a load on the CPU steals from the prefill it should hide behind).", DefaultValueFactory = _ => 1 };
        var repeat = new Option<int>("--repeat") { Description = "Runs per strategy (the median is reported).", DefaultValueFactory = _ => 3 };
        var json = new Option<FileInfo?>("--json") { Description = "Write the rows as JSON here too.", HelpName = "OUT.json" };
        var outDir = new Option<DirectoryInfo?>("--out") { Description = "Report folder (default docs/bench/ of the checkout).", HelpName = "DIR" };
        var only = new Option<string?>("--run-strategy") { Description = "Internal: measure one strategy in this process and print its row as JSON.", Hidden = true };
        var costsOpt = new Option<string?>("--costs") { Description = "Internal: profiled block costs (JSON) for the progressive strategy.", Hidden = true };
        var deviceProfile = CommonOptions.DeviceProfile("Simulate the four strategies with this accelerator latency profile instead of measuring on the CPU (what-if; every output says so).");
        var cmd = new Command("graphs", "Graph switching strategies on a block-split model with real graph loads: (a) single = the wide graph for both phases, (b) sync = switch every block after prefill, (c) progressive = the planner's schedule overlapping loads with chunked prefill, (d) resident = both variants loaded. Reports ttft_ms, first_step_ms and peak_mb per strategy.")
        {
            model, promptTokens, wide, narrow, blocks, capacity, threads, repeat, json, outDir, only, costsOpt, deviceProfile,
        };
        cmd.SetAction(parse =>
        {
            int p = parse.GetValue(promptTokens), g1 = parse.GetValue(wide), g2 = parse.GetValue(narrow), nb = parse.GetValue(blocks), cap = parse.GetValue(capacity);
            if (g2 < 1 || g1 < g2 || g1 % g2 != 0)
            {
                throw new ArgumentException($"--wide must be a multiple of --narrow (got {g1} and {g2}).");
            }

            if (p < 1 || p + g2 > cap)
            {
                throw new ArgumentException($"--prompt-tokens plus --narrow must fit --capacity {cap} (got {p} + {g2}).");
            }

            string reportDir = parse.GetValue(outDir)?.FullName ?? Path.Combine(ModelLocator.RepoRoot(), "docs", "bench");
            if (parse.GetValue(deviceProfile) is { } profileName)
            {
                var profile = DeviceProfile.Load(profileName);
                var simulated = Simulate(profile, p, g1, g2, nb);
                WriteSimulated(simulated, profile, BenchStamp.Capture(), p, g1, g2, nb, reportDir, parse.GetValue(json));
                return 0;
            }

            string dir = ModelLocator.Resolve(parse.GetValue(model));
            Threads = parse.GetValue(threads);
            if (parse.GetValue(only) is { } strategy)
            {
                if (strategy == "profile")
                {
                    Console.Out.WriteLine(JsonSerializer.Serialize(ProfileCosts(dir, p, g1, g2, nb, cap)));
                    return 0;
                }

                var costs = parse.GetValue(costsOpt) is { } cj ? JsonSerializer.Deserialize<BlockCosts>(cj) : null;
                var row = Measure(strategy, dir, p, g1, g2, nb, cap, costs);
                Console.Out.WriteLine(JsonSerializer.Serialize(row));
                return 0;
            }

            var stamp = BenchStamp.Capture();
            var rows = new List<GraphsRow>();
            // Warm-up profiling in its own process, so its memory does not count against any strategy.
            string profiled = RunChildRaw("profile", dir, p, g1, g2, nb, cap, null);
            int reps = Math.Max(1, parse.GetValue(repeat));
            AnsiConsole.Progress().Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new ElapsedTimeColumn()).Start(progress =>
            {
                var bar = progress.AddTask("strategies", maxValue: Strategies.Length * reps);
                foreach (string s in Strategies)
                {
                    var runs = new List<GraphsRow>();
                    for (int r = 0; r < reps; r++)
                    {
                        runs.Add(JsonSerializer.Deserialize<GraphsRow>(RunChildRaw(s, dir, p, g1, g2, nb, cap, s == "progressive" ? profiled : null))!);
                        bar.Increment(1);
                    }

                    var mid = runs.OrderBy(x => x.ReadyMs).ElementAt(runs.Count / 2);
                    rows.Add(mid with { PeakMb = Math.Round(runs.Select(x => x.PeakMb).Order().ElementAt(runs.Count / 2), 1) });
                }
            });
            Write(rows, stamp, dir, p, g1, g2, nb, reportDir, parse.GetValue(json));
            return 0;
        });
        return cmd;
    }

    private static string RunChildRaw(string strategy, string model, int p, int g1, int g2, int nb, int cap, string? costs)
    {
        string exe = Environment.ProcessPath!;
        var args = new List<string>();
        if (!exe.EndsWith("coordgen", StringComparison.Ordinal))
        {
            args.Add((System.Reflection.Assembly.GetEntryAssembly() ?? typeof(BenchGraphs).Assembly).Location);
        }

        args.AddRange(["bench", "graphs", "--run-strategy", strategy, "--model", model, "--prompt-tokens", $"{p}", "--wide", $"{g1}", "--narrow", $"{g2}", "--blocks", $"{nb}", "--capacity", $"{cap}", "--threads", $"{Threads}"]);
        if (costs is not null)
        {
            args.AddRange(["--costs", costs]);
        }

        var psi = new ProcessStartInfo(exe, args) { RedirectStandardOutput = true, RedirectStandardError = true };
        using var proc = Process.Start(psi)!;
        string stdout = proc.StandardOutput.ReadToEnd();
        string stderr = proc.StandardError.ReadToEnd();
        proc.WaitForExit();
        string? line = stdout.Split('\n').LastOrDefault(l => l.TrimStart().StartsWith('{'));
        if (proc.ExitCode != 0 || line is null)
        {
            throw new InvalidOperationException($"strategy {strategy} failed: {stderr.Trim()}");
        }

        return line;
    }

    /// <summary>One strategy, in this process: setup (graphs for prefill resident), prefill, first verification step.</summary>
    private static GraphsRow Measure(string strategy, string dir, int p, int g1, int g2, int nb, int cap, BlockCosts? costs)
    {
        var bundle = ModelBundle.Load(dir);
        using var model = new BlockModel(bundle.Weights, cap, nb, new RuntimeOptions { IntraOpThreads = Threads });
        var rng = new Random(7);
        int[] prompt = [.. Enumerable.Range(0, p).Select(_ => rng.Next(bundle.Config.VocabSize))];
        int[] step = [.. Enumerable.Range(0, g2).Select(_ => rng.Next(bundle.Config.VocabSize))];
        int chunks = (p + g1 - 1) / g1;
        var width = new int[nb];
        string? planText = null;

        // Setup, outside the timed region: what a server does at start.
        var setup = Stopwatch.StartNew();
        SwitchPlan? plan = null;
        if (strategy == "progressive")
        {
            plan = ProgressivePlanner.Plan(costs ?? throw new ArgumentException("the progressive strategy needs --costs"), chunks);
            planText = string.Join(" ", plan.Steps.Select(s => $"P{s.Block + 1}@{s.StartSlot}")) + $" (predicted ready {plan.ReadyMs:F0} ms)";
        }

        for (int b = 0; b < nb; b++)
        {
            model.Load(b, g1);
            width[b] = g1;
            if (strategy == "resident")
            {
                model.Load(b, g2);
            }
        }

        double setupMs = setup.Elapsed.TotalMilliseconds;
        using var switcher = new GraphSwitcher(model, width);
        var sw = Stopwatch.StartNew();
        double ttft, firstStep;
        using (var cache = model.CreateCache())
        {
            switch (strategy)
            {
                case "single":
                case "resident":
                case "sync":
                    Prefill(model, cache, prompt, g1, _ => g1);
                    ttft = sw.Elapsed.TotalMilliseconds;
                    if (strategy == "sync")
                    {
                        SwitchAll(model, nb, g1, g2);
                    }

                    model.Run(cache, step, _ => strategy == "single" ? g1 : g2);
                    firstStep = sw.Elapsed.TotalMilliseconds - ttft;
                    break;
                case "progressive":
                    (ttft, firstStep) = RunProgressive(model, switcher, cache, prompt, step, plan!, g1, g2, sw, switchBack: false);
                    break;
                default:
                    throw new ArgumentException($"unknown strategy '{strategy}'; use {string.Join(", ", Strategies)}.");
            }
        }

        double peak = PeakRssMb();

        // The next request arrives as soon as the first step is done: where the blocks are on the
        // narrow graph, its prefill needs the wide one back.
        int[] prompt2 = [.. Enumerable.Range(0, p).Select(_ => rng.Next(bundle.Config.VocabSize))];
        double ttft2, firstStep2;
        sw.Restart();
        using (var cache = model.CreateCache())
        {
            switch (strategy)
            {
                case "single":
                case "resident":
                    Prefill(model, cache, prompt2, g1, _ => g1);
                    ttft2 = sw.Elapsed.TotalMilliseconds;
                    model.Run(cache, step, _ => strategy == "single" ? g1 : g2);
                    firstStep2 = sw.Elapsed.TotalMilliseconds - ttft2;
                    break;
                case "sync":
                    SwitchAll(model, nb, g2, g1);
                    Prefill(model, cache, prompt2, g1, _ => g1);
                    ttft2 = sw.Elapsed.TotalMilliseconds;
                    SwitchAll(model, nb, g1, g2);
                    model.Run(cache, step, _ => g2);
                    firstStep2 = sw.Elapsed.TotalMilliseconds - ttft2;
                    break;
                default:
                    (ttft2, firstStep2) = RunProgressive(model, switcher, cache, prompt2, step, plan!, g1, g2, sw, switchBack: true);
                    break;
            }
        }

        return new GraphsRow
        {
            Strategy = strategy,
            TtftMs = Math.Round(ttft, 1),
            FirstStepMs = Math.Round(firstStep, 1),
            PeakMb = Math.Round(peak, 1),
            SetupMs = Math.Round(setupMs, 1),
            Plan = planText,
            SecondTtftMs = Math.Round(ttft2, 1),
            SecondFirstStepMs = Math.Round(firstStep2, 1),
            SecondPeakMb = Math.Round(PeakRssMb(), 1),
        };
    }

    private static void Prefill(BlockModel model, KvCache cache, int[] prompt, int g1, Func<int, int> widthOf)
    {
        for (int s = 0; s < prompt.Length; s += g1)
        {
            model.Run(cache, prompt.AsSpan(s, Math.Min(g1, prompt.Length - s)), widthOf);
        }
    }

    /// <summary>The synchronous switch: every block, last first, frees one variant and loads the other.</summary>
    private static void SwitchAll(BlockModel model, int nb, int from, int to)
    {
        for (int b = nb - 1; b >= 0; b--)
        {
            model.Unload(b, from);
            model.Load(b, to);
        }
    }

    /// <summary>Warm-up profiling: each block's G2 load time and its compute time per chunk on G1 and on G2.</summary>
    private static BlockCosts ProfileCosts(string dir, int p, int g1, int g2, int nb, int cap)
    {
        var bundle = ModelBundle.Load(dir);
        using var model = new BlockModel(bundle.Weights, cap, nb, new RuntimeOptions { IntraOpThreads = Threads });
        var load = new double[nb];
        var c1 = new double[nb];
        var c2 = new double[nb];
        var rng = new Random(3);
        int[] chunk = [.. Enumerable.Range(0, g1).Select(_ => rng.Next(model.Config.VocabSize))];
        // One variant set at a time, so profiling never holds both (it would set the peak).
        foreach (var (w, into) in new[] { (g1, c1), (g2, c2) })
        {
            for (int b = 0; b < nb; b++)
            {
                double ms = model.Load(b, w);
                if (w == g2)
                {
                    load[b] = ms;
                }
            }

            // Per-block compute: one chunk with every block on this width, timing each block.
            using (var cache = model.CreateCache())
            {
                var sw = Stopwatch.StartNew();
                double mark = 0;
                model.Run(cache, chunk, _ => w, b =>
                {
                    if (b > 0)
                    {
                        into[b - 1] = sw.Elapsed.TotalMilliseconds - mark;
                    }

                    mark = sw.Elapsed.TotalMilliseconds;
                });
                into[nb - 1] = sw.Elapsed.TotalMilliseconds - mark;
            }

            for (int b = 0; b < nb; b++)
            {
                model.Unload(b, w);
            }
        }

        return new BlockCosts(load, c1, c2);
    }

    /// <summary>
    /// Chunked prefill with the planner's switches to G2 started at their slots on the switcher's loader
    /// thread; a block waits for its planned load before it computes (as the planner counts). With
    /// <paramref name="switchBack"/> the blocks start on G2 (the previous request decoded on them): every
    /// block's G1 is asked for at once, first block first (prefill computes it first), and until it is
    /// loaded the block runs the chunk as G2 sub-chunks, which give the same result; the plan's G2
    /// switches then call off the switch-backs of the blocks that never made it back.
    /// </summary>
    private static (double Ttft, double FirstStep) RunProgressive(BlockModel model, GraphSwitcher switcher, KvCache cache, int[] prompt, int[] step, SwitchPlan plan, int g1, int g2, Stopwatch sw, bool switchBack)
    {
        int nb = model.Blocks, p = prompt.Length, next = 0, slot = 0;
        void StartLoads(int s)
        {
            while (next < plan.Steps.Count && plan.Steps[next].StartSlot <= s)
            {
                switcher.Request(plan.Steps[next++].Block, g2);
            }
        }

        if (switchBack)
        {
            for (int b = 0; b < nb; b++)
            {
                switcher.Request(b, g1);
            }
        }

        for (int s = 0; s < p; s += g1)
        {
            model.Run(cache, prompt.AsSpan(s, Math.Min(g1, p - s)), switcher.WidthOf, b =>
            {
                StartLoads(slot++);
                switcher.Apply(b, waitFor: g2);
            });
        }

        double ttft = sw.Elapsed.TotalMilliseconds;
        StartLoads(int.MaxValue);
        switcher.ApplyAll();
        model.Run(cache, step, _ => g2);
        return (ttft, sw.Elapsed.TotalMilliseconds - ttft);
    }

    /// <summary>
    /// The four strategies played out on an accelerator latency profile instead of measured: the
    /// progressive plan through <see cref="ProgressivePlanner.Simulate"/>, memory as weight shares
    /// (one variant of every block, plus the blocks holding both while they switch).
    /// </summary>
    internal static List<GraphsRow> Simulate(DeviceProfile profile, int p, int g1, int g2, int nb)
    {
        int chunks = (p + g1 - 1) / g1;
        var costs = profile.Costs(nb, g1, g2);
        double prefill = chunks * profile.StepMs(g1), narrowStep = profile.StepMs(g2), w = profile.WeightsMb;
        var plan = ProgressivePlanner.Plan(costs, chunks);
        var capped = ProgressivePlanner.Plan(costs, chunks, maxBothBlocks: 1);
        GraphsRow Row(string s, double ttft, double first, double peak, string? planText = null) => new()
        {
            Strategy = s,
            TtftMs = Math.Round(ttft, 1),
            FirstStepMs = Math.Round(first, 1),
            PeakMb = Math.Round(peak, 1),
            Plan = planText,
            Simulated = true,
        };
        return
        [
            Row("single", prefill, profile.StepMs(g1), w),
            Row("sync", prefill, costs.LoadG2.Sum() + narrowStep, w),
            Row("progressive", plan.PrefillEndMs, plan.ReadyMs - plan.PrefillEndMs + narrowStep, w * (1 + ((double)plan.PeakBothBlocks / nb)),
                string.Join(" ", plan.Steps.Select(x => $"P{x.Block + 1}@{x.StartSlot}"))),
            Row("progressive-1", capped.PrefillEndMs, capped.ReadyMs - capped.PrefillEndMs + narrowStep, w * (1 + ((double)capped.PeakBothBlocks / nb)),
                string.Join(" ", capped.Steps.Select(x => $"P{x.Block + 1}@{x.StartSlot}"))),
            Row("resident", prefill, narrowStep, 2 * w),
        ];
    }

    private static void WriteSimulated(List<GraphsRow> rows, DeviceProfile profile, BenchStamp stamp, int p, int g1, int g2, int nb, string dir, FileInfo? json)
    {
        Directory.CreateDirectory(dir);
        string text = JsonSerializer.Serialize(rows, new JsonSerializerOptions { WriteIndented = true });
        string stem = $"graphs-{profile.Name}";
        File.WriteAllText(Path.Combine(dir, stem + ".json"), text);
        if (json is not null)
        {
            File.WriteAllText(json.FullName, text);
        }

        Plots.Graphs(rows, Path.Combine(dir, stem + ".png"), $"WHAT-IF, not measured: {profile.Name}");
        var a = rows.First(r => r.Strategy == "single");
        var d = rows.First(r => r.Strategy == "resident");
        var c = rows.First(r => r.Strategy == "progressive");
        var md = new StringBuilder();
        md.AppendLine(CultureInfo.InvariantCulture, $"# Graph switching on `{profile.Name}` (what-if, `coordgen bench graphs --device-profile {profile.Name}`)").AppendLine();
        md.AppendLine(CultureInfo.InvariantCulture, $"**{profile.Label}.** Nothing below ran on a device: the strategies are played out by `ProgressivePlanner.Simulate` on the profile's numbers.").AppendLine();
        md.AppendLine(stamp.ToMarkdown()).AppendLine();
        md.AppendLine(CultureInfo.InvariantCulture, $"Profile: {profile.Source}").AppendLine();
        foreach (var pt in profile.Steps)
        {
            md.AppendLine(CultureInfo.InvariantCulture, $"- width {pt.Width}: {pt.Ms} ms per step ({pt.Source})");
        }

        if (profile.StepNote is not null)
        {
            md.AppendLine(CultureInfo.InvariantCulture, $"- {profile.StepNote}");
        }

        md.AppendLine(CultureInfo.InvariantCulture, $"- graph load: {profile.LoadMsPerBlock} ms per block of {profile.Blocks} ({profile.LoadSource})");
        md.AppendLine(CultureInfo.InvariantCulture, $"- weights: {profile.WeightsMb} MB per variant set ({profile.WeightsSource})").AppendLine();
        md.AppendLine(CultureInfo.InvariantCulture, $"Prompt {p} tokens in chunks of G1 = {g1}; first verification step G2 = {g2}; {nb} blocks.").AppendLine();
        md.AppendLine("| strategy | ttft_ms | first_step_ms | ttft + first step | peak_mb |").AppendLine("|---|---|---|---|---|");
        foreach (var r in rows)
        {
            md.AppendLine(CultureInfo.InvariantCulture, $"| {r.Strategy} | {r.TtftMs} | {r.FirstStepMs} | {r.ReadyMs} | {r.PeakMb} |");
        }

        var c1 = rows.First(r => r.Strategy == "progressive-1");
        md.AppendLine().AppendLine(CultureInfo.InvariantCulture, $"Progressive vs resident (latency to the end of the first step): {c.ReadyMs / d.ReadyMs:F3}x; vs single (peak memory): {c.PeakMb / a.PeakMb:F3}x; plan (block@slot): {c.Plan}.").AppendLine();
        md.AppendLine(CultureInfo.InvariantCulture, $"`progressive-1` is the planner with a memory cap (`maxBothBlocks: 1`, at most one block holding both variants at a time): vs resident {c1.ReadyMs / d.ReadyMs:F3}x, vs single memory {c1.PeakMb / a.PeakMb:F3}x; plan {c1.Plan}. Memory here counts weights only: a block holds both variants from its load's start until it first computes on G2.").AppendLine();
        md.AppendLine("The switch back to G1 for the next request is measured on the CPU only (`bench graphs` without a profile); this what-if leaves it out.").AppendLine();
        md.AppendLine(CultureInfo.InvariantCulture, $"![strategies]({stem}.png)");
        File.WriteAllText(Path.Combine(dir, stem + ".md"), md.ToString());
        ConsoleUi.Err.MarkupLineInterpolated($"[yellow]what-if ({profile.Name}, not measured)[/]: progressive/resident latency {c.ReadyMs / d.ReadyMs:F3}x, progressive/single memory {c.PeakMb / a.PeakMb:F3}x -> {dir}/{stem}.md");
    }

    private static double PeakRssMb()
    {
        const string key = "VmHWM:";
        if (File.Exists("/proc/self/status"))
        {
            string? line = File.ReadLines("/proc/self/status").FirstOrDefault(l => l.StartsWith(key, StringComparison.Ordinal));
            if (line is not null && long.TryParse(line[key.Length..].Trim().Split(' ')[0], out long kb))
            {
                return kb / 1024.0;
            }
        }

        return Process.GetCurrentProcess().PeakWorkingSet64 / 1048576.0;
    }

    private static void Write(List<GraphsRow> rows, BenchStamp stamp, string model, int p, int g1, int g2, int nb, string dir, FileInfo? json)
    {
        Directory.CreateDirectory(dir);
        string text = JsonSerializer.Serialize(rows, new JsonSerializerOptions { WriteIndented = true });
        File.WriteAllText(Path.Combine(dir, "graphs.json"), text);
        if (json is not null)
        {
            File.WriteAllText(json.FullName, text);
        }

        Plots.Graphs(rows, Path.Combine(dir, "graphs.png"));
        var a = rows.First(r => r.Strategy == "single");
        var d = rows.First(r => r.Strategy == "resident");
        var c = rows.First(r => r.Strategy == "progressive");
        var md = new StringBuilder();
        md.AppendLine("# Graph switching strategies (`coordgen bench graphs`)").AppendLine();
        md.AppendLine(stamp.ToMarkdown()).AppendLine();
        md.AppendLine(CultureInfo.InvariantCulture, $"Model `{Path.GetFileName(Path.TrimEndingDirectorySeparator(model))}` split into {nb} blocks; prompt {p} tokens prefilled in chunks of G1 = {g1}; the first verification step has G2 = {g2} tokens. CPU execution provider with {Threads} compute thread(s) (the other core is free for loads); a graph load is a real ONNX Runtime session creation with its own pre-packed weights. Each strategy runs in its own process (peak = VmHWM); median of the runs.").AppendLine();
        md.AppendLine("| strategy | ttft_ms | first_step_ms | ttft + first step | peak_mb | setup_ms | next request: ttft_ms | next: first_step_ms | peak_mb with next |").AppendLine("|---|---|---|---|---|---|---|---|---|");
        foreach (var r in rows)
        {
            md.AppendLine(CultureInfo.InvariantCulture, $"| {r.Strategy} | {r.TtftMs} | {r.FirstStepMs} | {r.ReadyMs} | {r.PeakMb} | {r.SetupMs} | {r.SecondTtftMs} | {r.SecondFirstStepMs} | {r.SecondPeakMb} |");
        }

        md.AppendLine().AppendLine(CultureInfo.InvariantCulture, $"Switching back: the next request (same length) arrives right after the first step. `single` and `resident` need no switch; `sync` frees every G2 and loads every G1 before the prefill, then switches forward again after it; `progressive` asks for every block's G1 at once on the loader thread (first block first), computes a block on G2 sub-chunks until its G1 is in, and runs the same forward plan, which calls off the switch-backs of blocks that would go back to G2 anyway (`GraphSwitcher`). Next-request TTFT, progressive vs resident: {c.SecondTtftMs / d.SecondTtftMs:F3}x; sync vs resident: {rows.First(r => r.Strategy == "sync").SecondTtftMs / d.SecondTtftMs:F3}x; to the end of its first step, progressive vs resident: {(c.SecondTtftMs + c.SecondFirstStepMs) / (d.SecondTtftMs + d.SecondFirstStepMs):F3}x.");

        md.AppendLine().AppendLine(CultureInfo.InvariantCulture, $"Progressive vs resident (latency to the end of the first step): {c.ReadyMs / d.ReadyMs:F3}x (bar: at most 1.10x). Progressive vs single (peak memory): {c.PeakMb / a.PeakMb:F3}x (bar: at most 1.15x).").AppendLine();
        md.AppendLine(CultureInfo.InvariantCulture, $"Progressive plan (block@slot, slot = chunk x blocks + block): {c.Plan}.").AppendLine();
        md.AppendLine("Strategies: **single** = the wide graph for both phases; **sync** = after prefill, unload each block's wide graph and load its narrow one; **progressive** = `ProgressivePlanner` over warm-up profiles (measured in a separate process), loads on a background thread during chunked prefill, a switched block's wide graph freed at once; **resident** = both variants loaded at start. Setup (loading what prefill needs) is outside the timed region for all.").AppendLine();
        md.AppendLine("Reproduce: `coordgen model synth --shape smollm2-135m --out /tmp/smol && coordgen bench graphs --model /tmp/smol` (random weights with SmolLM2-135M's shape: the demo model is too small for loads to matter). The same strategies on the paper's Snapdragon figures (what-if, not measured): `coordgen bench graphs --device-profile paper-qwen2.5-1.5b-htp`, [graphs-paper-qwen2.5-1.5b-htp.md](graphs-paper-qwen2.5-1.5b-htp.md).").AppendLine();
        md.AppendLine("![strategies](graphs.png)");
        File.WriteAllText(Path.Combine(dir, "graphs.md"), md.ToString());
        ConsoleUi.Err.MarkupLineInterpolated($"[green]progressive/resident latency {c.ReadyMs / d.ReadyMs:F3}x, progressive/single memory {c.PeakMb / a.PeakMb:F3}x[/] -> {dir}/graphs.md");
    }
}
