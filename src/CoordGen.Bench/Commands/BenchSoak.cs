using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Json.Serialization;
using CoordGen.Engine;
using CoordGen.Engine.Workloads;
using Spectre.Console;
using static CoordGen.Messages.GenerationProtocol;

namespace CoordGen.Host.Commands;

/// <summary>One interval of <c>coordgen bench soak</c>.</summary>
internal sealed record SoakSample
{
    [JsonPropertyName("t_s")] public double TimeS { get; init; }
    [JsonPropertyName("rss_mb")] public double RssMb { get; init; }
    [JsonPropertyName("managed_mb")] public double ManagedMb { get; init; }
    [JsonPropertyName("completed")] public int Completed { get; init; }
    [JsonPropertyName("refused_429")] public int Refused { get; init; }
    [JsonPropertyName("tokens_per_s")] public double TokensPerS { get; init; }
    [JsonPropertyName("latency_p50_ms")] public double LatencyP50Ms { get; init; }
    [JsonPropertyName("latency_p99_ms")] public double LatencyP99Ms { get; init; }
}

internal sealed record SoakReport
{
    [JsonPropertyName("minutes")] public double Minutes { get; init; }
    [JsonPropertyName("warmup_s")] public double WarmupS { get; init; }
    [JsonPropertyName("clients")] public int Clients { get; init; }
    [JsonPropertyName("max_pending")] public int MaxPending { get; init; }
    [JsonPropertyName("completed")] public int Completed { get; init; }
    [JsonPropertyName("refused_429")] public int Refused { get; init; }
    [JsonPropertyName("failed")] public int Failed { get; init; }
    [JsonPropertyName("rss_first_third_mb")] public double RssFirstMb { get; init; }
    [JsonPropertyName("rss_last_third_mb")] public double RssLastMb { get; init; }
    [JsonPropertyName("rss_growth_pct")] public double RssGrowthPct { get; init; }
    [JsonPropertyName("latency_p50_first_third_ms")] public double LatencyFirstMs { get; init; }
    [JsonPropertyName("latency_p50_last_third_ms")] public double LatencyLastMs { get; init; }
    [JsonPropertyName("latency_drift_pct")] public double LatencyDriftPct { get; init; }
    [JsonPropertyName("samples")] public List<SoakSample> Samples { get; init; } = [];
}

/// <summary>
/// <c>coordgen bench soak</c>: many clients generating without pause for minutes against one loaded
/// model, through the actor runtime with its admission limit; memory and latency sampled over time to
/// show there is no growth and no drift.
/// </summary>
internal static class BenchSoak
{
    public static Command Create()
    {
        var model = CommonOptions.Model();
        var minutes = new Option<double>("--minutes") { Description = "How long to run.", DefaultValueFactory = _ => 10 };
        var clients = new Option<int>("--clients") { Description = "Concurrent clients, each sending its next request as soon as the last one ends.", DefaultValueFactory = _ => 16 };
        var maxPending = new Option<int>("--max-pending") { Description = "Admission limit (running plus queued); clients beyond it get 429 and retry after a pause.", DefaultValueFactory = _ => 8 };
        var maxTokens = new Option<int>("--max-tokens", "-n") { Description = "Tokens per request.", DefaultValueFactory = _ => 32 };
        var interval = new Option<double>("--interval") { Description = "Seconds between samples.", DefaultValueFactory = _ => 10 };
        var warmup = new Option<double>("--warmup") { Description = "Seconds at the start (graph compilation, caches filling) left out of the growth and drift figures; still plotted.", DefaultValueFactory = _ => 60 };
        var json = new Option<FileInfo?>("--json") { Description = "Write the report as JSON here too.", HelpName = "OUT.json" };
        var outDir = new Option<DirectoryInfo?>("--out") { Description = "Report folder (default docs/bench/ of the checkout).", HelpName = "DIR" };
        var cmd = new Command("soak", "Sustained load: clients generate back to back for --minutes while memory (RSS, managed heap) and latency are sampled; reports growth and drift between the first and last third, with a plot.")
        {
            model, minutes, clients, maxPending, maxTokens, interval, warmup, json, outDir,
        };
        cmd.SetAction(async (parse, ct) =>
        {
            double mins = parse.GetValue(minutes), every = parse.GetValue(interval);
            int nClients = parse.GetValue(clients), n = parse.GetValue(maxTokens), pending = parse.GetValue(maxPending);
            if (mins <= 0 || every <= 0 || nClients < 1 || n < 1 || pending < 1)
            {
                throw new ArgumentException("--minutes, --interval, --clients, --max-pending and --max-tokens must be positive.");
            }

            var bundle = ConsoleUi.LoadModel(ModelLocator.Resolve(parse.GetValue(model)));
            string dir = Path.Combine(ModelLocator.RepoRoot(), "workloads");
            var prompts = new[] { "summary", "rag", "ui", "reply" }
                .SelectMany(t => WorkloadItem.Load(Path.Combine(dir, t + ".jsonl")).Take(15))
                .Select(w => bundle.Tokenizer.Encode(PromptTemplate.Render(w.Context, w.Prompt, bundle.HasRoleTokens))).ToArray();
            var stamp = BenchStamp.Capture();
            await using var service = InferenceService.Start(bundle, new CoordGenOptions { MaxPending = pending });

            var latencies = new List<double>();
            int completed = 0, refused = 0, failed = 0;
            long tokens = 0;
            var gate = new object();
            using var stop = CancellationTokenSource.CreateLinkedTokenSource(ct);
            var duration = TimeSpan.FromMinutes(mins);
            var sw = Stopwatch.StartNew();
            var workers = Enumerable.Range(0, nClients).Select(c => Task.Run(async () =>
            {
                int next = c;
                while (!stop.IsCancellationRequested)
                {
                    var prompt = prompts[next++ % prompts.Length];
                    long t0 = Stopwatch.GetTimestamp();
                    try
                    {
                        var o = await service.RunAsync(new InferenceRequest(prompt, n, new Sampling(), []), _ => Task.CompletedTask, stop.Token);
                        lock (gate)
                        {
                            completed++;
                            tokens += o.CompletionTokens;
                            latencies.Add(Stopwatch.GetElapsedTime(t0).TotalMilliseconds);
                        }
                    }
                    catch (ApiException ex) when (ex.Status == 429)
                    {
                        Interlocked.Increment(ref refused);
                        await Task.Delay(200, CancellationToken.None);
                    }
                    catch (OperationCanceledException) when (stop.IsCancellationRequested)
                    {
                        return;
                    }
                    catch (ApiException)
                    {
                        Interlocked.Increment(ref failed);
                    }
                }
            }, CancellationToken.None)).ToArray();

            var samples = new List<SoakSample>();
            int lastRefused = 0;
            await AnsiConsole.Progress().Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn()).StartAsync(async progress =>
            {
                var bar = progress.AddTask($"soak: {nClients} clients", maxValue: duration.TotalSeconds);
                var last = sw.Elapsed;
                while (sw.Elapsed < duration && !ct.IsCancellationRequested)
                {
                    await Task.Delay(TimeSpan.FromSeconds(every), CancellationToken.None);
                    List<double> window;
                    long windowTokens;
                    int windowDone;
                    lock (gate)
                    {
                        window = [.. latencies];
                        latencies.Clear();
                        windowTokens = tokens;
                        tokens = 0;
                        windowDone = window.Count;
                    }

                    var now = sw.Elapsed;
                    window.Sort();
                    using var proc = Process.GetCurrentProcess();
                    int r = Volatile.Read(ref refused);
                    samples.Add(new SoakSample
                    {
                        TimeS = Math.Round(now.TotalSeconds, 1),
                        RssMb = Math.Round(proc.WorkingSet64 / 1048576.0, 1),
                        ManagedMb = Math.Round(GC.GetTotalMemory(false) / 1048576.0, 1),
                        Completed = windowDone,
                        Refused = r - lastRefused,
                        TokensPerS = Math.Round(windowTokens / (now - last).TotalSeconds, 1),
                        LatencyP50Ms = window.Count == 0 ? 0 : Math.Round(window[window.Count / 2], 1),
                        LatencyP99Ms = window.Count == 0 ? 0 : Math.Round(window[Math.Min(window.Count - 1, (int)(window.Count * 0.99))], 1),
                    });
                    lastRefused = r;
                    last = now;
                    bar.Value = Math.Min(duration.TotalSeconds, now.TotalSeconds);
                }
            });
            await stop.CancelAsync();
            await Task.WhenAll(workers);

            var steady = samples.Where(s => s.TimeS > parse.GetValue(warmup)).ToList();
            if (steady.Count < 3)
            {
                steady = samples;
            }

            int third = Math.Max(1, steady.Count / 3);
            double rssFirst = steady.Take(third).Average(s => s.RssMb), rssLast = steady.TakeLast(third).Average(s => s.RssMb);
            double latFirst = steady.Take(third).Average(s => s.LatencyP50Ms), latLast = steady.TakeLast(third).Average(s => s.LatencyP50Ms);
            var report = new SoakReport
            {
                Minutes = mins,
                WarmupS = parse.GetValue(warmup),
                Clients = nClients,
                MaxPending = pending,
                Completed = samples.Sum(s => s.Completed),
                Refused = refused,
                Failed = failed,
                RssFirstMb = Math.Round(rssFirst, 1),
                RssLastMb = Math.Round(rssLast, 1),
                RssGrowthPct = Math.Round(100 * ((rssLast / rssFirst) - 1), 1),
                LatencyFirstMs = Math.Round(latFirst, 1),
                LatencyLastMs = Math.Round(latLast, 1),
                LatencyDriftPct = latFirst > 0 ? Math.Round(100 * ((latLast / latFirst) - 1), 1) : 0,
                Samples = samples,
            };
            Write(report, stamp, parse.GetValue(outDir)?.FullName ?? Path.Combine(ModelLocator.RepoRoot(), "docs", "bench"), parse.GetValue(json));
            return failed == 0 ? 0 : 1;
        });
        return cmd;
    }

    private static void Write(SoakReport r, BenchStamp stamp, string dir, FileInfo? json)
    {
        Directory.CreateDirectory(dir);
        string text = JsonSerializer.Serialize(r, new JsonSerializerOptions { WriteIndented = true });
        File.WriteAllText(Path.Combine(dir, "soak.json"), text);
        if (json is not null)
        {
            File.WriteAllText(json.FullName, text);
        }

        Plots.Soak(r.Samples, Path.Combine(dir, "soak.png"));
        var md = new StringBuilder();
        md.AppendLine("# Soak (`coordgen bench soak`)").AppendLine();
        md.AppendLine(stamp.ToMarkdown()).AppendLine();
        md.AppendLine(CultureInfo.InvariantCulture, $"{r.Clients} clients sending greedy requests back to back for {r.Minutes} minutes through the actor runtime (admission limit {r.MaxPending}; refused clients wait 200 ms and retry). Growth and drift compare the first and last third of the samples after a {r.WarmupS} s warm-up.").AppendLine();
        md.AppendLine("| metric | value |").AppendLine("|---|---|");
        foreach (var (k, v) in new (string, object)[]
        {
            ("completed", r.Completed), ("refused_429", r.Refused), ("failed", r.Failed),
            ("rss first third (MB)", r.RssFirstMb), ("rss last third (MB)", r.RssLastMb), ("rss growth", $"{r.RssGrowthPct}%"),
            ("latency p50 first third (ms)", r.LatencyFirstMs), ("latency p50 last third (ms)", r.LatencyLastMs), ("latency drift", $"{r.LatencyDriftPct}%"),
        })
        {
            md.AppendLine(CultureInfo.InvariantCulture, $"| {k} | {v} |");
        }

        md.AppendLine().AppendLine("![memory and latency over time](soak.png)");
        File.WriteAllText(Path.Combine(dir, "soak.md"), md.ToString());
        ConsoleUi.Err.MarkupLineInterpolated($"[green]completed {r.Completed}, refused {r.Refused}, failed {r.Failed}; RSS {r.RssFirstMb} -> {r.RssLastMb} MB ({r.RssGrowthPct}%), p50 latency {r.LatencyFirstMs} -> {r.LatencyLastMs} ms ({r.LatencyDriftPct}%)[/] -> {dir}/soak.md");
    }
}
