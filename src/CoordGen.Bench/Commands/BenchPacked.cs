using System.CommandLine;
using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Json.Serialization;
using CoordGen.Engine.Generation;
using CoordGen.Engine.Model;
using CoordGen.Engine.Runtime;
using Spectre.Console;

namespace CoordGen.Host.Commands;

internal sealed record PackedRow
{
    [JsonPropertyName("sessions")] public int Sessions { get; init; }
    [JsonPropertyName("packed")] public bool Packed { get; init; }
    [JsonPropertyName("weights")] public string Weights { get; init; } = "";

    /// <summary>Decode tokens of all sessions per second of device runs (median over repeats).</summary>
    [JsonPropertyName("tokens_per_device_second")] public double TokensPerDeviceSecond { get; init; }
    [JsonPropertyName("tokens_per_device_second_min")] public double Min { get; init; }
    [JsonPropertyName("tokens_per_device_second_max")] public double Max { get; init; }

    /// <summary>Decode tokens of all sessions per second of wall time (device runs plus the host's work between them).</summary>
    [JsonPropertyName("wall_tokens_per_second")] public double WallTokensPerSecond { get; init; }
    [JsonPropertyName("device_runs")] public int DeviceRuns { get; init; }
    [JsonPropertyName("tokens")] public int Tokens { get; init; }

    /// <summary>Packed rows: every session's tokens equal its tokens when stepped alone.</summary>
    [JsonPropertyName("identical_to_solo")] public bool IdenticalToSolo { get; init; }
}

/// <summary>
/// <c>coordgen bench packed</c>: plain decoding of N sessions, one session per device run (what the device
/// actor does today) against all of them packed into one run (<see cref="PlainSession.StepPacked"/>).
/// </summary>
internal static class BenchPacked
{
    public static Command Create()
    {
        var model = CommonOptions.Model();
        var sessions = new Option<string>("--sessions") { Description = "Comma-separated session counts to measure.", DefaultValueFactory = _ => "1,2,4,8,16" };
        var tokens = new Option<int>("--tokens") { Description = "Tokens each session decodes (stop tokens ignored, so every session decodes them all).", DefaultValueFactory = _ => 48 };
        var repeats = new Option<int>("--repeats") { Description = "Runs of each mode per session count, alternating modes (the report gives the median and the spread).", DefaultValueFactory = _ => 3 };
        var promptTokens = new Option<int>("--prompt-tokens") { Description = "Keep only the last N tokens of each workload prompt (0 = whole prompts): how the KV length moves the balance between reading weights and reading caches.", DefaultValueFactory = _ => 0 };
        var capacity = CommonOptions.Capacity();
        var weights = CommonOptions.Weights();
        var threads = CommonOptions.Threads();
        var groupQuery = new Option<bool>("--group-query") { Description = "Packed runs attend with GroupQueryAttention over each session's cache in place (the default; decision 0023); false: the caches are joined per layer.", DefaultValueFactory = _ => true };
        var outDir = new Option<DirectoryInfo?>("--out") { Description = "Report folder (default docs/bench/ of the checkout).", HelpName = "DIR" };
        var cmd = new Command("packed", "Plain decoding of N concurrent sessions: one session per device run against all sessions' rows packed into one run (issue 19). Tokens per device-second side by side, with the spread over repeats; writes packed.md/.json/.png.")
        {
            model, sessions, tokens, repeats, promptTokens, capacity, weights, threads, groupQuery, outDir,
        };
        cmd.SetAction((parse, ct) =>
        {
            int[] counts = [.. parse.GetValue(sessions)!.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Select(x => int.Parse(x, CultureInfo.InvariantCulture))];
            int perSession = parse.GetValue(tokens), reps = parse.GetValue(repeats), cap = parse.GetValue(capacity);
            if (counts.Length == 0 || counts.Any(c => c < 1 || c > 64) || perSession < 1 || reps < 1)
            {
                throw new ArgumentException("--sessions takes counts from 1 to 64; --tokens and --repeats must be at least 1.");
            }

            var stamp = BenchStamp.Capture();
            var bundle = ConsoleUi.LoadModel(ModelLocator.Resolve(parse.GetValue(model)));
            var format = parse.GetValue(weights);
            using var rt = new OrtModelRuntime(bundle.Weights, cap, [1, 64], new RuntimeOptions { IntraOpThreads = parse.GetValue(threads), Weights = format, PackedGroupQuery = parse.GetValue(groupQuery) });
            var gen = new Generator(rt);

            // Prompts from the four workloads, cut to leave room for the output; each prefilled once, copied per run.
            int keep = parse.GetValue(promptTokens) is > 0 and var k ? Math.Min(k, cap - perSession - 2) : cap - perSession - 2;
            var prompts = BenchStreams.Prompts(bundle, (counts.Max() + 3) / 4).Select(p => p.Tokens[^Math.Min(p.Tokens.Length, keep)..]).ToList();
            var templates = new List<(KvCache Cache, float[] Logits, int Length)>();
            ConsoleUi.Err.Progress().Start(p =>
            {
                var task = p.AddTask($"prefilling {counts.Max()} prompts", maxValue: counts.Max());
                foreach (var prompt in prompts.Take(counts.Max()))
                {
                    var cache = rt.CreateCache();
                    templates.Add((cache, gen.Prefill(cache, prompt), prompt.Length));
                    task.Increment(1);
                }
            });

            var none = new HashSet<int>();
            var sampling = new SamplingOptions();
            var rows = new List<PackedRow>();
            ConsoleUi.Err.Progress().Start(p =>
            {
                var task = p.AddTask("decoding", maxValue: counts.Length * reps * 2);
                foreach (int n in counts)
                {
                    var measured = new Dictionary<bool, List<(double Device, double Wall, int Runs, List<int>[] Out)>> { [false] = [], [true] = [] };
                    for (int r = 0; r < reps; r++)
                    {
                        foreach (bool packed in r % 2 == 0 ? new[] { false, true } : [true, false])
                        {
                            ct.ThrowIfCancellationRequested();
                            var list = templates.Take(n).Select(t =>
                            {
                                var cache = rt.CreateCache();
                                cache.CopyFrom(t.Cache);
                                return gen.StartDecode(cache, t.Logits, t.Length, 0, perSession, sampling, none);
                            }).ToList();
                            var wall = System.Diagnostics.Stopwatch.StartNew();
                            int runs = 0;
                            if (packed)
                            {
                                int most = OrtModelRuntime.PackedSlotCounts[^1];
                                for (int live = n; live > 0; live = PlainSession.StepPacked(list))
                                {
                                    runs += (live + most - 1) / most; // the runs this step takes
                                }
                            }
                            else
                            {
                                // One session per device run, in turns: what the device actor does today.
                                while (list.Any(s => !s.Done))
                                {
                                    foreach (var s in list.Where(s => !s.Done))
                                    {
                                        s.Step();
                                        runs++;
                                    }
                                }
                            }

                            double wallMs = wall.Elapsed.TotalMilliseconds;
                            var results = list.Select(s => s.Result()).ToList();
                            measured[packed].Add((results.Sum(x => x.Stats.DecodeRunMs), wallMs, runs, [.. results.Select(x => x.Tokens.ToList())]));
                            list.ForEach(s => s.Dispose());
                            task.Increment(1);
                        }
                    }

                    int total = n * perSession;
                    var solo = measured[false][0].Out;
                    foreach (bool packed in new[] { false, true })
                    {
                        var rates = measured[packed].Select(m => total / (m.Device / 1000)).Order().ToList();
                        rows.Add(new PackedRow
                        {
                            Sessions = n,
                            Packed = packed,
                            Weights = format.ToString().ToLowerInvariant(),
                            TokensPerDeviceSecond = Math.Round(rates[rates.Count / 2], 1),
                            Min = Math.Round(rates[0], 1),
                            Max = Math.Round(rates[^1], 1),
                            WallTokensPerSecond = Math.Round(measured[packed].Select(m => total / (m.Wall / 1000)).Order().ElementAt(reps / 2), 1),
                            DeviceRuns = measured[packed][0].Runs,
                            Tokens = total,
                            IdenticalToSolo = measured[packed].All(m => m.Out.Zip(solo).All(z => z.First.SequenceEqual(z.Second))),
                        });
                    }
                }
            });

            foreach (var t in templates)
            {
                t.Cache.Dispose();
            }

            string stem = ReportStem.For("packed" + (format == WeightFormat.F32 ? "" : $"-{format.ToString().ToLowerInvariant()}") + (parse.GetValue(promptTokens) > 0 ? $"-p{keep}" : ""), bundle.Name);
            string dir = parse.GetValue(outDir)?.FullName ?? Path.Combine(ModelLocator.RepoRoot(), "docs", "bench");
            Directory.CreateDirectory(dir);
            File.WriteAllText(Path.Combine(dir, stem + ".json"), JsonSerializer.Serialize(new { stamp = stamp.ToMarkdown(), model = bundle.Name, rows }, new JsonSerializerOptions { WriteIndented = true }));
            Plots.Packed(rows, Path.Combine(dir, stem + ".png"));
            var md = new StringBuilder();
            md.AppendLine(CultureInfo.InvariantCulture, $"# Packed plain decoding (`coordgen bench packed --model {parse.GetValue(model) ?? "coordgen-demo"}`)").AppendLine();
            md.AppendLine(stamp.ToMarkdown()).AppendLine();
            md.AppendLine(CultureInfo.InvariantCulture, $"Model `{bundle.Name}` ({bundle.Weights.TotalBytes / 1e6:F0} MB of weights, {format}), capacity {cap}. N sessions, each prefilled with a workload prompt ({(parse.GetValue(promptTokens) > 0 ? $"its last {keep} tokens" : "whole")}; mean {templates.Take(counts.Max()).Average(t => t.Length):F0} tokens), decode {perSession} greedy tokens each. **One per run**: each device run carries one session's token, sessions take turns (what the device actor does today). **Packed**: one run carries every session's token, each in its own slot against its own cache (`PlainSession.StepPacked`, graphs of 2, 4, 8 and 16 slots). Tokens per device-second: all sessions' tokens over the summed run time; median of {reps} runs per mode, alternating modes, min-max beside it.").AppendLine();
            md.AppendLine("| sessions | one per run (tok/device-s) | packed (tok/device-s) | packed / one per run | device runs (one / packed) | wall tok/s (one / packed) | packed tokens identical to solo |");
            md.AppendLine("|---:|---:|---:|---:|---:|---:|---|");
            foreach (var g in rows.GroupBy(r => r.Sessions))
            {
                var (one, pk) = (g.Single(r => !r.Packed), g.Single(r => r.Packed));
                md.AppendLine(CultureInfo.InvariantCulture, $"| {g.Key} | {one.TokensPerDeviceSecond} ({one.Min}-{one.Max}) | {pk.TokensPerDeviceSecond} ({pk.Min}-{pk.Max}) | **{pk.TokensPerDeviceSecond / one.TokensPerDeviceSecond:F2}x** (worst pairing {pk.Min / one.Max:F2}x) | {one.DeviceRuns} / {pk.DeviceRuns} | {one.WallTokensPerSecond} / {pk.WallTokensPerSecond} | {(pk.IdenticalToSolo ? "yes" : "**no**")} |");
            }

            md.AppendLine().AppendLine(CultureInfo.InvariantCulture, $"![packed]({stem}.png)");
            File.WriteAllText(Path.Combine(dir, stem + ".md"), md.ToString());
            var top = rows.Where(r => r.Packed).MaxBy(r => r.Sessions)!;
            var topOne = rows.Single(r => !r.Packed && r.Sessions == top.Sessions);
            ConsoleUi.Err.MarkupLineInterpolated($"[green]{top.Sessions} sessions: packed {top.TokensPerDeviceSecond / topOne.TokensPerDeviceSecond:F2}x one per run[/] -> {dir}/{stem}.md");
            return Task.FromResult(0);
        });
        return cmd;
    }
}
