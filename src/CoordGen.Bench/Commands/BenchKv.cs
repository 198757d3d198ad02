using System.CommandLine;
using System.Globalization;
using System.Text;
using System.Text.Json;
using CoordGen.Engine.Runtime;
using Spectre.Console;

namespace CoordGen.Host.Commands;

/// <summary>
/// <c>coordgen bench kv</c>: float32 against float16 KV caches on one model, side by side in one run: ms per
/// step at each KV fill and width (the two formats' graphs run in turn, run by run), bytes per session's
/// cache, sessions the KV budget holds, and the memory eight sessions' caches hold (measured on the managed heap).
/// </summary>
internal static class BenchKv
{
    public static Command Create()
    {
        var model = CommonOptions.Model();
        var capacity = new Option<int>("--capacity") { Description = "KV capacity of each session's cache (slots).", DefaultValueFactory = _ => 2048 };
        var fills = new Option<string>("--fills") { Description = "Comma-separated KV fills (tokens already cached) to time at.", DefaultValueFactory = _ => "512,2040" };
        var widths = new Option<string>("--widths") { Description = "Comma-separated graph widths to time (1: a decode step; 8: a verification).", DefaultValueFactory = _ => "1,8" };
        var repeats = new Option<int>("--repeats") { Description = "Timed runs per cell and format; the median is reported.", DefaultValueFactory = _ => 31 };
        var budget = new Option<int>("--kv-budget-mb") { Description = "KV budget to count sessions against (the server's default).", DefaultValueFactory = _ => 1024 };
        var weights = CommonOptions.Weights();
        var threads = CommonOptions.Threads();
        var outDir = new Option<DirectoryInfo?>("--out") { Description = "Report folder (default docs/bench/ of the checkout).", HelpName = "DIR" };
        var cmd = new Command("kv", "Float32 against float16 KV caches, side by side in one run: ms per step at each KV fill and width, bytes per session, sessions the KV budget holds, memory eight sessions' caches hold (docs/decisions/0020-float16-kv-cache.md).")
        {
            model, capacity, fills, widths, repeats, budget, weights, threads, outDir,
        };
        cmd.SetAction(parse =>
        {
            int cap = parse.GetValue(capacity), reps = Math.Max(5, parse.GetValue(repeats));
            var ws = parse.GetValue(widths)!.Split(',').Select(int.Parse).ToList();
            var fs = parse.GetValue(fills)!.Split(',').Select(int.Parse).ToList();
            if (fs.Any(f => f < 0) || ws.Any(w => w < 1) || fs.Max() + ws.Max() > cap)
            {
                throw new ArgumentException($"every --fills value plus the widest --widths must fit --capacity {cap} (got fills {string.Join(",", fs)}, widths {string.Join(",", ws)}).");
            }

            var stamp = BenchStamp.Capture();
            var bundle = ConsoleUi.LoadModel(ModelLocator.Resolve(parse.GetValue(model)));
            var c = bundle.Config;
            KvFormat[] formats = [KvFormat.F32, KvFormat.F16];
            var runtimes = formats.Select(f => ConsoleUi.Status($"compiling the {f.Name()} KV graphs", () =>
            {
                var r = new OrtModelRuntime(bundle.Weights, cap, ws, new RuntimeOptions { IntraOpThreads = parse.GetValue(threads), Weights = parse.GetValue(weights), Kv = f });
                r.CompileAll();
                return r;
            })).ToArray();
            try
            {
                var cells = new List<(int Fill, int Width, double[] Ms)>();
                AnsiConsole.Progress().Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new ElapsedTimeColumn()).Start(ctx =>
                {
                    var task = ctx.AddTask("fills x widths", maxValue: fs.Count * ws.Count);
                    foreach (int fill in fs)
                    {
                        foreach (int w in ws)
                        {
                            cells.Add((fill, w, ModelCommands.TimeStepMany(runtimes, w, fill, reps)));
                            task.Increment(1);
                        }
                    }
                });

                // Memory eight sessions' caches hold in each format, measured on the managed heap (the process's RSS
                // hides it: the garbage collector reuses pages freed while the graphs compiled). Nothing is freed
                // between the two sets.
                var held = new List<KvCache>();
                var heap = new long[formats.Length];
                var rows = new byte[KvCache.BytesFor(c.NumLayers, c.NumKvHeads, c.HeadDim, cap)];
                long last = GC.GetTotalMemory(forceFullCollection: true);
                for (int i = 0; i < formats.Length; i++)
                {
                    for (int n = 0; n < 8; n++)
                    {
                        var k = new KvCache(c.NumLayers, c.NumKvHeads, c.HeadDim, [cap], formats[i]);
                        k.AppendSlots(rows.AsSpan(0, (int)k.SlotBytesFor(cap)), cap);
                        held.Add(k);
                    }

                    long now = GC.GetTotalMemory(forceFullCollection: true);
                    heap[i] = now - last;
                    last = now;
                }

                held.ForEach(k => k.Dispose());
                Write(parse.GetValue(outDir)?.FullName ?? Path.Combine(ModelLocator.RepoRoot(), "docs", "bench"), stamp, bundle.Name, c, cap, reps, parse.GetValue(budget), formats, cells, heap);
            }
            finally
            {
                foreach (var r in runtimes)
                {
                    r.Dispose();
                }
            }

            return 0;
        });
        return cmd;
    }

    private static void Write(string dir, BenchStamp stamp, string model, Engine.Model.ModelConfig c, int cap, int reps, int budgetMb, KvFormat[] formats, List<(int Fill, int Width, double[] Ms)> cells, long[] heap)
    {
        Directory.CreateDirectory(dir);
        string stem = ReportStem.For("kv", model);
        long[] perSession = [.. formats.Select(f => KvCache.BytesFor(c.NumLayers, c.NumKvHeads, c.HeadDim, cap, f))];
        long[] perToken = [.. formats.Select(f => KvCache.BytesFor(c.NumLayers, c.NumKvHeads, c.HeadDim, 1, f))];
        int[] sessions = [.. perSession.Select(b => (int)(budgetMb * 1048576L / b))];
        var md = new StringBuilder();
        md.AppendLine("# KV cache formats (`coordgen bench kv`)").AppendLine();
        md.AppendLine(stamp.ToMarkdown()).AppendLine();
        md.AppendLine(CultureInfo.InvariantCulture, $"Model `{model}` ({c.NumLayers} layers, {c.NumKvHeads} KV heads of {c.HeadDim}), capacity {cap}. Each cell runs the float32-cache graph and the float16-cache graph of one width in turn, run by run ({reps} runs each; median), at a KV fill of that many committed slots (the step attends over the bucket that holds them). Float16 caches are read by the graph through a Cast to float32 per layer and step, and the new rows are written as float16 (decision 0020).").AppendLine();
        md.AppendLine("| KV fill | width | f32 ms | f16 ms | f16 / f32 |").AppendLine("|---|---|---|---|---|");
        foreach (var (fill, w, ms) in cells)
        {
            md.AppendLine(CultureInfo.InvariantCulture, $"| {fill} | {w} | {ms[0]:F2} | {ms[1]:F2} | {ms[1] / ms[0]:F2}x |");
        }

        md.AppendLine();
        md.AppendLine("| | f32 | f16 |").AppendLine("|---|---|---|");
        md.AppendLine(CultureInfo.InvariantCulture, $"| bytes per token | {perToken[0]:N0} | {perToken[1]:N0} |");
        md.AppendLine(CultureInfo.InvariantCulture, $"| one session's cache at {cap} slots | {perSession[0] / 1048576.0:F1} MiB | {perSession[1] / 1048576.0:F1} MiB |");
        md.AppendLine(CultureInfo.InvariantCulture, $"| sessions a {budgetMb} MiB KV budget holds | {sessions[0]} | {sessions[1]} |");
        md.AppendLine(CultureInfo.InvariantCulture, $"| memory 8 sessions' caches hold (measured, managed heap) | {heap[0] / 1048576.0:F0} MiB | {heap[1] / 1048576.0:F0} MiB |");
        File.WriteAllText(Path.Combine(dir, stem + ".md"), md.ToString());
        File.WriteAllText(Path.Combine(dir, stem + ".json"), JsonSerializer.Serialize(new
        {
            stamp,
            model,
            capacity = cap,
            repeats = reps,
            cells = cells.Select(x => new { fill = x.Fill, width = x.Width, f32_ms = Math.Round(x.Ms[0], 3), f16_ms = Math.Round(x.Ms[1], 3) }),
            bytes_per_session = new { f32 = perSession[0], f16 = perSession[1] },
            sessions_in_budget = new { budget_mb = budgetMb, f32 = sessions[0], f16 = sessions[1] },
            heap_8_sessions_bytes = new { f32 = heap[0], f16 = heap[1] },
        }, new JsonSerializerOptions { WriteIndented = true }));
        ConsoleUi.Err.MarkupLineInterpolated($"[green]wrote {dir}/{stem}.md[/]");
        Console.WriteLine(md.ToString());
    }
}
