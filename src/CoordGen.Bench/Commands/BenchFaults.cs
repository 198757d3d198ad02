using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Json.Serialization;
using System.Threading.Channels;
using Akka.Actor;
using CoordGen.Actors.Supervision;
using CoordGen.Engine;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Workloads;
using CoordGen.Messages;
using Spectre.Console;
using static CoordGen.Messages.GenerationProtocol;

namespace CoordGen.Host.Commands;

/// <summary>The result of <c>coordgen bench faults</c>.</summary>
internal sealed record FaultsReport
{
    [JsonPropertyName("faults_injected")] public int FaultsInjected { get; init; }
    [JsonPropertyName("faults_by_kind")] public Dictionary<string, int> FaultsByKind { get; init; } = new();
    [JsonPropertyName("streams")] public int Streams { get; init; }
    [JsonPropertyName("concurrent_streams")] public int ConcurrentStreams { get; init; }
    [JsonPropertyName("rounds")] public int Rounds { get; init; }
    [JsonPropertyName("divergent_streams")] public int DivergentStreams { get; init; }
    [JsonPropertyName("failed_streams")] public int FailedStreams { get; init; }
    [JsonPropertyName("lost_tokens")] public long LostTokens { get; init; }
    [JsonPropertyName("duplicated_tokens")] public long DuplicatedTokens { get; init; }
    [JsonPropertyName("tokens")] public long Tokens { get; init; }
    [JsonPropertyName("recovery_p50_ms")] public double RecoveryP50Ms { get; init; }
    [JsonPropertyName("recovery_max_ms")] public double RecoveryMaxMs { get; init; }
    [JsonPropertyName("recoveries")] public int Recoveries { get; init; }

    /// <summary>Runtimes (compiled graph sets) the faulty service built: 1 plus one per device restart that could not reuse the previous one.</summary>
    [JsonPropertyName("runtimes_built")] public int RuntimesBuilt { get; init; }

    /// <summary>Device runs the step watchdog ended mid-run: the injected hangs, which keep the device computing until it does.</summary>
    [JsonPropertyName("runs_ended_by_watchdog")] public int RunsEndedByWatchdog { get; init; }

    /// <summary>Device restarts that took the previous device's runtime.</summary>
    [JsonPropertyName("runtime_reuses")] public int RuntimeReuses { get; init; }
    [JsonPropertyName("method")] public string Method { get; init; } = "";
    [JsonPropertyName("seed")] public int Seed { get; init; }
    [JsonPropertyName("wall_s")] public double WallS { get; init; }
}

/// <summary>
/// <c>coordgen bench faults</c>: many concurrent streams through the full actor runtime while a seeded
/// <see cref="FaultPlan"/> injects device exceptions, hangs, NaN logits, drafter and calibrator crashes
/// and session kills; every stream is compared token for token with its fault-free output.
/// </summary>
internal static class BenchFaults
{
    public static Command Create()
    {
        var model = CommonOptions.Model();
        var faults = new Option<int>("--faults") { Description = "Faults to inject in all; rounds of --streams concurrent streams run until this many fired.", DefaultValueFactory = _ => 1000 };
        var streams = new Option<int>("--streams") { Description = "Concurrent streams per round.", DefaultValueFactory = _ => 50 };
        var maxTokens = new Option<int>("--max-tokens", "-n") { Description = "Tokens per stream.", DefaultValueFactory = _ => 48 };
        var method = new Option<string>("--method") { Description = "Decoding method of every stream (ar, pld, sam, pld+ours, sam+ours).", DefaultValueFactory = _ => "sam+ours" };
        var gap = new Option<int>("--mean-gap") { Description = "Mean device steps between faults.", DefaultValueFactory = _ => 3 };
        var kinds = new Option<string>("--kinds") { Description = $"Comma-separated fault kinds: {string.Join(", ", Enum.GetNames<FaultKind>())}. DeviceActorCrash (the device actor crashes and its back-off supervisor starts a new one; the requests on it resume) is opt-in.", DefaultValueFactory = _ => string.Join(",", Enum.GetNames<FaultKind>().Where(k => k != nameof(FaultKind.DeviceActorCrash))) };
        var seed = new Option<int>("--seed") { Description = "Seed of the fault plan.", DefaultValueFactory = _ => 1 };
        var json = new Option<FileInfo?>("--json") { Description = "Write the report as JSON here too.", HelpName = "OUT.json" };
        var outDir = new Option<DirectoryInfo?>("--out") { Description = "Report folder (default docs/bench/ of the checkout).", HelpName = "DIR" };
        var rebuild = new Option<bool>("--rebuild-runtime") { Description = "Each device-actor restart builds (compiles) a new runtime instead of taking the previous device's: the behaviour before runtimes were kept, for comparison." };
        var cmd = new Command("faults", "Fault injection under load: concurrent streams while device exceptions, hangs, NaN logits, drafter/calibrator crashes and session kills strike; reports divergent streams, lost and duplicated tokens and recovery times against fault-free runs.")
        {
            model, faults, streams, maxTokens, method, gap, kinds, seed, rebuild, json, outDir,
        };
        cmd.SetAction(async (parse, ct) =>
        {
            int nFaults = parse.GetValue(faults), nStreams = parse.GetValue(streams), n = parse.GetValue(maxTokens);
            if (nFaults < 1 || nStreams < 1 || nStreams > 1000 || n < 1)
            {
                throw new ArgumentException("--faults and --max-tokens must be at least 1, --streams between 1 and 1000.");
            }

            var kindList = parse.GetValue(kinds)!.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
                .Select(k => Enum.TryParse<FaultKind>(k, true, out var v) ? v : throw new ArgumentException($"unknown fault kind '{k}'; use {string.Join(", ", Enum.GetNames<FaultKind>())}.")).ToArray();
            string m = parse.GetValue(method)!;
            var bundle = ConsoleUi.LoadModel(ModelLocator.Resolve(parse.GetValue(model)));
            var prompts = Prompts(bundle, nStreams);
            var settings = new CoordGenOptions { MaxPending = nStreams, Method = m, KeepRuntimeAcrossRestarts = !parse.GetValue(rebuild) };
            var stamp = BenchStamp.Capture();

            // 1. Fault-free reference outputs.
            Dictionary<int, int[]> reference;
            await using (var clean = InferenceService.Start(bundle, settings))
            {
                reference = await ConsoleUi.Err.Status().StartAsync("fault-free reference streams", async _ =>
                    (await Task.WhenAll(prompts.Select((p, i) => Run(clean.Supervisor, i, p, n, m, ct)))).ToDictionary(r => r.Index, r => r.Tokens));
            }

            // 2. The same streams, in rounds, while the plan fires.
            var plan = new FaultPlan(parse.GetValue(seed), nFaults, parse.GetValue(gap), kindList);
            await using var faulty = InferenceService.Start(bundle, settings, plan, maxAttempts: 100_000, actorLogLevel: "OFF");
            var sw = Stopwatch.StartNew();
            int rounds = 0, total = 0, divergent = 0, failed = 0, killsMissed = 0;
            long lost = 0, duplicated = 0, tokens = 0;
            var recoveries = new List<double>();
            await AnsiConsole.Progress().Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new ElapsedTimeColumn()).StartAsync(async progress =>
            {
                var bar = progress.AddTask("faults injected", maxValue: nFaults);
                while (!plan.Exhausted && rounds < 200)
                {
                    rounds++;
                    using var roundDone = new CancellationTokenSource();
                    var killer = Task.Run(async () =>
                    {
                        while (!roundDone.IsCancellationRequested)
                        {
                            if (plan.TryTakeSessionKill() && !await faulty.Supervisor.Ask<bool>(DiagnosticsProtocol.KillRandomSession.Instance, TimeSpan.FromSeconds(10)))
                            {
                                Interlocked.Increment(ref killsMissed);
                            }

                            if (plan.TryTakeDeviceActorCrash())
                            {
                                faulty.Supervisor.Tell(DiagnosticsProtocol.CrashDevice.Instance);
                            }

                            bar.Value = plan.Injected;
                            await Task.Delay(2, CancellationToken.None);
                        }
                    }, CancellationToken.None);
                    var results = await Task.WhenAll(prompts.Select((p, i) => Run(faulty.Supervisor, i, p, n, m, ct)));
                    await roundDone.CancelAsync();
                    await killer;
                    foreach (var r in results)
                    {
                        total++;
                        var want = reference[r.Index];
                        tokens += r.Tokens.Length;
                        failed += r.Failed ? 1 : 0;
                        if (!r.Tokens.AsSpan().SequenceEqual(want))
                        {
                            divergent++;
                        }

                        lost += Math.Max(0, want.Length - r.Tokens.Length);
                        duplicated += Math.Max(0, r.Tokens.Length - want.Length);
                        recoveries.AddRange(r.Recoveries);
                    }

                    bar.Value = plan.Injected;
                }
            });

            recoveries.Sort();
            var byKind = plan.ByKind.ToDictionary(k => k.Key.ToString(), k => k.Value);
            byKind[nameof(FaultKind.SessionKill)] -= killsMissed;
            var report = new FaultsReport
            {
                FaultsInjected = plan.Injected - killsMissed,
                FaultsByKind = byKind,
                Streams = total,
                ConcurrentStreams = nStreams,
                Rounds = rounds,
                DivergentStreams = divergent,
                FailedStreams = failed,
                LostTokens = lost,
                DuplicatedTokens = duplicated,
                Tokens = tokens,
                RecoveryP50Ms = recoveries.Count == 0 ? 0 : Math.Round(recoveries[recoveries.Count / 2], 2),
                RecoveryMaxMs = recoveries.Count == 0 ? 0 : Math.Round(recoveries[^1], 2),
                Recoveries = recoveries.Count,
                RuntimesBuilt = faulty.RuntimeStarts.Built,
                RunsEndedByWatchdog = faulty.WatchdogTerminations,
                RuntimeReuses = faulty.RuntimeStarts.Reused,
                Method = m,
                Seed = parse.GetValue(seed),
                WallS = Math.Round(sw.Elapsed.TotalSeconds, 1),
            };
            Write(report, recoveries, stamp, parse.GetValue(outDir)?.FullName ?? Path.Combine(ModelLocator.RepoRoot(), "docs", "bench"), parse.GetValue(json));
            return report.DivergentStreams == 0 && report.FailedStreams == 0 ? 0 : 1;
        });
        return cmd;
    }

    private static List<int[]> Prompts(Engine.Model.ModelBundle bundle, int count)
    {
        // The shortest held-out prompts of every task family, in turn, so each round is mostly decoding.
        string dir = Path.Combine(ModelLocator.RepoRoot(), "workloads");
        var families = new[] { "summary", "rag", "ui", "reply" }
            .Select(t => WorkloadItem.Load(Path.Combine(dir, t + ".jsonl")).OrderBy(w => w.Context.Length).ToList()).ToList();
        var list = new List<int[]>();
        for (int i = 0; list.Count < count; i++)
        {
            var w = families[i % families.Count][(i / families.Count) % families[i % families.Count].Count];
            list.Add(bundle.Tokenizer.Encode(PromptTemplate.Render(w.Context, w.Prompt, bundle.HasRoleTokens)));
        }

        return list;
    }

    private sealed record StreamResult(int Index, int[] Tokens, bool Failed, IReadOnlyList<double> Recoveries);

    private static async Task<StreamResult> Run(IActorRef supervisor, int index, int[] prompt, int n, string method, CancellationToken ct)
    {
        var channel = Channel.CreateBounded<GeneratedToken>(16);
        var reply = supervisor.Ask<object>(new Generate(new SessionId($"s{index}"), TokenSequence.From(prompt), n, new Sampling(), method, 8, null, channel.Writer, ct), Timeout.InfiniteTimeSpan);
        var got = new List<int>();
        try
        {
            await foreach (var (t, _) in channel.Reader.ReadAllAsync(ct))
            {
                got.Add(t);
            }
        }
        catch (InvalidOperationException)
        {
            // The stream failed; the reply says why.
        }

        return await reply switch
        {
            GenerationCompleted c => new StreamResult(index, [.. got], false, c.RecoveryMs.IsDefault ? [] : c.RecoveryMs),
            _ => new StreamResult(index, [.. got], true, []),
        };
    }

    private static void Write(FaultsReport r, List<double> recoveries, BenchStamp stamp, string dir, FileInfo? json)
    {
        Directory.CreateDirectory(dir);
        var opts = new JsonSerializerOptions { WriteIndented = true };
        string text = JsonSerializer.Serialize(r, opts);
        File.WriteAllText(Path.Combine(dir, "faults.json"), text);
        if (json is not null)
        {
            File.WriteAllText(json.FullName, text);
        }

        Plots.Histogram(recoveries, "time from fault to next committed token (ms)", "Recovery after injected faults", Path.Combine(dir, "faults.png"));
        var md = new StringBuilder();
        md.AppendLine("# Fault injection (`coordgen bench faults`)").AppendLine();
        md.AppendLine(stamp.ToMarkdown()).AppendLine();
        md.AppendLine(CultureInfo.InvariantCulture, $"{r.ConcurrentStreams} concurrent greedy `{r.Method}` streams per round, {r.Rounds} rounds ({r.Streams} streams, {r.Tokens:N0} tokens), fault plan seed {r.Seed}; every stream compared token for token with its fault-free output.").AppendLine();
        md.AppendLine("| metric | value |").AppendLine("|---|---|");
        foreach (var (k, v) in new (string, object)[]
        {
            ("faults_injected", r.FaultsInjected), ("divergent_streams", r.DivergentStreams), ("failed_streams", r.FailedStreams),
            ("lost_tokens", r.LostTokens), ("duplicated_tokens", r.DuplicatedTokens), ("recovery_p50_ms", r.RecoveryP50Ms),
            ("recovery_max_ms", r.RecoveryMaxMs), ("runtimes_built", r.RuntimesBuilt), ("runs_ended_by_watchdog", r.RunsEndedByWatchdog), ("runtime_reuses", r.RuntimeReuses), ("wall_s", r.WallS),
        })
        {
            md.AppendLine(CultureInfo.InvariantCulture, $"| {k} | {v} |");
        }

        md.AppendLine().AppendLine("Faults by kind: " + string.Join(", ", r.FaultsByKind.Select(p => $"{p.Key} {p.Value}")) + ".").AppendLine();
        md.AppendLine("An injected device hang is a device that keeps computing: real runs of the step's graph, one after another, until the step watchdog ends one mid-run through ONNX Runtime's `RunOptions.Terminate` once the plan's hang time has passed (`runs_ended_by_watchdog`), exactly the path of a run that hangs for real; the step fails as a device fault and the session resumes. Recovery is the time from a fault to the stream's next committed token (a resumed session prefills its prompt plus committed tokens again).").AppendLine();
        md.AppendLine("![recovery histogram](faults.png)");
        File.WriteAllText(Path.Combine(dir, "faults.md"), md.ToString());
        ConsoleUi.Err.MarkupLineInterpolated($"[green]faults {r.FaultsInjected}, streams {r.Streams}, divergent {r.DivergentStreams}, failed {r.FailedStreams}, lost {r.LostTokens}, duplicated {r.DuplicatedTokens}, recovery p50 {r.RecoveryP50Ms} ms, max {r.RecoveryMaxMs} ms, runtimes built {r.RuntimesBuilt}, reused {r.RuntimeReuses}[/] -> {dir}/faults.md");
    }
}
