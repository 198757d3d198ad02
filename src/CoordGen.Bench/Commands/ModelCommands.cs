using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.Json;
using CoordGen.Engine;
using CoordGen.Engine.Generation;
using CoordGen.Engine.Model;
using CoordGen.Engine.Onnx;
using CoordGen.Engine.Runtime;
using Spectre.Console;

namespace CoordGen.Host.Commands;

/// <summary><c>coordgen model synth|inspect|profile</c>.</summary>
internal static class ModelCommands
{
    public static Command Create()
    {
        var cmd = new Command("model", "Model tools: make random-weight shape models and function-preserving twins, inspect a checkpoint, profile latency against graph width.");
        cmd.Add(Synth());
        cmd.Add(ModelInflate.Create());
        cmd.Add(ModelCompare.Create());
        cmd.Add(Export());
        cmd.Add(Inspect());
        cmd.Add(Profile());
        cmd.Add(ModelEvaluate.Create());
        return cmd;
    }

    private static Command Synth()
    {
        var shape = new Option<string?>("--shape") { Description = $"One of: {string.Join(", ", ShapeCatalog.Shapes.Keys)}." };
        var like = new Option<string?>("--like") { Description = "Copy the shape (config.json and tokenizer) of this model directory instead, e.g. a twin: random weights of exactly its shape.", HelpName = "DIR" };
        var output = new Option<DirectoryInfo>("--out", "-o") { Description = "Directory to write config.json, model.safetensors and tokenizer.json into.", Required = true, HelpName = "DIR" };
        var seed = new Option<int>("--seed") { Description = "Seed for the random weights.", DefaultValueFactory = _ => 1 };
        var cmd = new Command("synth", "Write a random-weight checkpoint with a real model's shape, or with exactly the shape of a given model (--like): the weights are random, the file layout is real. The tokenizer is coordgen-demo's (or the --like model's).")
        {
            shape, like, output, seed,
        };
        cmd.SetAction(parse =>
        {
            string? likeDir = parse.GetValue(like) is { } l ? ModelLocator.Resolve(l) : null;
            if ((parse.GetValue(shape) is null) == (likeDir is null))
            {
                throw new ArgumentException($"give either --shape ({string.Join(", ", ShapeCatalog.Shapes.Keys)}) or --like DIR, not both and not neither.");
            }

            string name = parse.GetValue(shape) ?? $"{Path.GetFileName(Path.TrimEndingDirectorySeparator(Path.GetFullPath(likeDir!)))}'s";
            var config = likeDir is null ? ShapeCatalog.Get(parse.GetValue(shape)!) : ModelConfig.Load(Path.Combine(likeDir, "config.json"));

            var dir = parse.GetValue(output)!;
            dir.Create();
            var weights = ConsoleUi.Status($"generating {config.ParameterCount / 1e6:F0}M random weights", () => ModelWeights.Random(config, parse.GetValue(seed)));
            ConsoleUi.Status("writing model.safetensors (F16)", () =>
            {
                SafeTensors.Write(Path.Combine(dir.FullName, "model.safetensors"), weights.Tensors.Select(t => (t.Name, t.Shape, t.Data)), SafeTensorDType.F16);
                return 0;
            });
            File.WriteAllText(Path.Combine(dir.FullName, "config.json"), config.ToJson());
            string tok = Path.Combine(likeDir ?? ModelLocator.Resolve(null), "tokenizer.json");
            File.Copy(tok, Path.Combine(dir.FullName, "tokenizer.json"), overwrite: true);
            ConsoleUi.Err.MarkupLineInterpolated($"wrote a random-weight model of {name} shape ({config.ParameterCount / 1e6:F1}M parameters) to {dir.FullName}");
            return 0;
        });
        return cmd;
    }

    private static Command Export()
    {
        var model = CommonOptions.Model();
        var format = new Option<string>("--format") { Description = "ort-genai: a folder ONNX Runtime GenAI loads (model.onnx with dynamic lengths, model.onnx.data, genai_config.json).", DefaultValueFactory = _ => "ort-genai" };
        var output = new Option<DirectoryInfo>("--out", "-o") { Description = "Folder to write.", Required = true, HelpName = "DIR" };
        var context = new Option<int>("--context-length") { Description = "GenAI's context_length and max_length: prompt plus output.", DefaultValueFactory = _ => 2048 };
        var threads = CommonOptions.Threads();
        var cmd = new Command("export", "Write the model for another runtime: --format ort-genai writes a folder ONNX Runtime GenAI loads, with the same arithmetic as our graphs (coordgen bench peers compares the two).")
        {
            model, format, output, context, threads,
        };
        cmd.SetAction(parse =>
        {
            if (parse.GetValue(format) != "ort-genai")
            {
                throw new ArgumentException($"unknown --format '{parse.GetValue(format)}'; the one export format is ort-genai.");
            }

            var bundle = ConsoleUi.LoadModel(ModelLocator.Resolve(parse.GetValue(model)));
            string dir = parse.GetValue(output)!.FullName;
            int n = parse.GetValue(threads) > 0 ? parse.GetValue(threads) : Environment.ProcessorCount;
            ConsoleUi.Status("writing model.onnx, model.onnx.data and genai_config.json", () =>
            {
                GenAiExport.Write(bundle.Weights, dir, parse.GetValue(context), n, bundle.StopTokens);
                return 0;
            });
            File.Copy(Path.Combine(bundle.Directory, "tokenizer.json"), Path.Combine(dir, "tokenizer.json"), overwrite: true);
            ConsoleUi.Err.MarkupLineInterpolated($"wrote {bundle.Name} for ONNX Runtime GenAI to {dir}");
            return 0;
        });
        return cmd;
    }

    private static Command Inspect()
    {
        var model = CommonOptions.Model();
        var cmd = new Command("inspect", "Print a checkpoint's architecture, shapes, parameter count and tokenizer facts.") { model };
        cmd.SetAction(parse =>
        {
            var b = ConsoleUi.LoadModel(ModelLocator.Resolve(parse.GetValue(model)));
            var c = b.Config;
            var t = new Table().AddColumn("key").AddColumn("value");
            void Row(string k, object v) => t.AddRow(Markup.Escape(k), Markup.Escape(Convert.ToString(v, CultureInfo.InvariantCulture) ?? ""));
            Row("directory", Path.GetFullPath(b.Directory));
            Row("architecture", c.Architecture);
            Row("parameters", $"{c.ParameterCount:N0}");
            Row("layers", c.NumLayers);
            Row("hidden / intermediate", $"{c.HiddenSize} / {c.IntermediateSize}");
            Row("heads / kv heads / head dim", $"{c.NumHeads} / {c.NumKvHeads} / {c.HeadDim}");
            Row("vocab", c.VocabSize);
            Row("rope theta", c.RopeTheta);
            Row("tied embeddings", c.TieWordEmbeddings);
            Row("attention bias", c.AttentionBias);
            Row("max positions", c.MaxPositionEmbeddings);
            Row("weights in memory (fp32)", $"{b.Weights.TotalBytes / 1048576.0:F1} MiB");
            Row("tokenizer tokens", b.Tokenizer.VocabSize);
            Row("special tokens", string.Join(" ", b.Tokenizer.SpecialTokens.Keys));
            Row("KV bytes per token", 2L * c.NumLayers * c.KvDim * sizeof(float));
            AnsiConsole.Write(t);
            return 0;
        });
        return cmd;
    }

    private static Command Profile()
    {
        var model = CommonOptions.Model();
        var capacity = CommonOptions.Capacity();
        var widths = new Option<string>("--widths") { Description = "Comma-separated graph widths to time.", DefaultValueFactory = _ => "1,2,4,8,16,32,64,128" };
        var fills = new Option<string>("--fills") { Description = "Comma-separated KV fills (tokens already cached) as fractions of capacity.", DefaultValueFactory = _ => "0.05,0.5,0.9" };
        var repeats = new Option<int>("--repeats") { Description = "Timed runs per cell; the median is reported.", DefaultValueFactory = _ => 15 };
        var threads = CommonOptions.Threads();
        var outDir = new Option<DirectoryInfo?>("--out") { Description = "Where to write the report (default: docs/bench/ of the checkout).", HelpName = "DIR" };
        var compare = new Option<string?>("--compare") { Description = "A second model timed cell by cell beside --model, runs alternating, for a side-by-side table (e.g. a twin against a random-weight model of its shape: model synth --like).", HelpName = "DIR" };
        var weights = new Option<string>("--weights") { Description = "Comma-separated weight formats to time side by side, cell by cell (f32, int8, int4): ms per step, bytes read per step and the bandwidth that makes, against the machine's measured read bandwidth.", DefaultValueFactory = _ => "f32" };
        var fusedOps = new Option<bool>("--fused-ops") { Description = "true: rotary embedding and each residual add with its RMS norm run as ONNX Runtime's contrib kernels (the CPU default); false: as plain ONNX nodes (the form an NPU compiles). Time both side by side with --compare naming the same model and --compare-fused-ops.", DefaultValueFactory = _ => true };
        var compareFusedOps = new Option<bool?>("--compare-fused-ops") { Description = "--fused-ops for the --compare model (default: the same as --fused-ops)." };
        var ortProfile = new Option<bool>("--ort-profile") { Description = "After the timings, run every --weights format's graphs of every --widths at the first --fills with ONNX Runtime's profiler on (not timed: it adds a few microseconds per node), and write where a step's time goes by operator type: ort-profile-<model>.md/.json." };
        var cmd = new Command("profile", "Time one graph step against width and KV fill (median of repeated runs), and compare coordgen generate's per-token decode time with the bare ONNX Runtime run of the width-1 graph in the same process. Writes Markdown and JSON under docs/bench/.")
        {
            model, capacity, widths, fills, repeats, threads, outDir, compare, weights, fusedOps, compareFusedOps, ortProfile,
        };
        cmd.SetAction(parse =>
        {
            int cap = parse.GetValue(capacity);
            CommonOptions.Validate(cap, 1);
            var ws = ParseList(parse.GetValue(widths)!, int.Parse);
            if (ws.Any(w => w < 1 || w * 2 > cap))
            {
                throw new ArgumentException($"--widths must be between 1 and half of --capacity {cap} (got {string.Join(",", ws)}): lower --widths or raise --capacity.");
            }

            // The runtimes also hold the width-1 graph when --widths leaves it out: the report's decode comparison runs it.
            int[] graphWidths = [.. ws.Append(1).Distinct()];
            var fs = ParseList(parse.GetValue(fills)!, s => double.Parse(s, CultureInfo.InvariantCulture));
            int reps = Math.Max(3, parse.GetValue(repeats));
            var formats = ParseList(parse.GetValue(weights)!, WeightQuantizer.Parse).Distinct().ToList();
            bool fused = parse.GetValue(fusedOps), compareFused = parse.GetValue(compareFusedOps) ?? fused;
            var bundle = ConsoleUi.LoadModel(ModelLocator.Resolve(parse.GetValue(model)));
            long rssWeights = CurrentRss();
            using var one = new OrtModelRuntime(bundle.Weights, cap, [ws[0]], new RuntimeOptions { IntraOpThreads = parse.GetValue(threads) });
            long rssOneGraph = CurrentRss();
            one.Dispose();
            using var rt = ConsoleUi.Status("compiling graphs", () =>
            {
                var r = new OrtModelRuntime(bundle.Weights, cap, graphWidths, new RuntimeOptions { IntraOpThreads = parse.GetValue(threads), Weights = formats[0], FusedOps = fused });
                r.CompileAll();
                return r;
            });
            var extra = formats.Skip(1).Select(f => ConsoleUi.Status($"compiling the {WeightQuantizer.Name(f)} graphs", () =>
            {
                var r = new OrtModelRuntime(bundle.Weights, cap, graphWidths, new RuntimeOptions { IntraOpThreads = parse.GetValue(threads), Weights = f, FusedOps = fused });
                r.CompileAll();
                return r;
            })).ToList();
            double readGbs = formats.Count > 1 || formats[0] != WeightFormat.F32 ? ConsoleUi.Status("measuring memory read bandwidth", MemoryProbe.ReadGbPerSecond) : 0;
            var memory = new MemoryReport(bundle.Weights.TotalBytes, rssWeights, rssOneGraph, CurrentRss(), rt.GraphCount);
            var other = parse.GetValue(compare) is { } otherDir ? ConsoleUi.LoadModel(ModelLocator.Resolve(otherDir)) : null;
            using var otherRt = other is null ? null : ConsoleUi.Status($"compiling {other.Name}'s graphs", () =>
            {
                var r = new OrtModelRuntime(other.Weights, cap, graphWidths, new RuntimeOptions { IntraOpThreads = parse.GetValue(threads), Weights = formats[0], FusedOps = compareFused });
                r.CompileAll();
                return r;
            });
            var otherCells = new List<ProfileCell>();
            AnsiConsole.MarkupLineInterpolated($"memory: weights {memory.WeightBytes / 1048576.0:F1} MiB; process RSS {memory.RssWeights / 1048576.0:F0} MiB with weights loaded, {memory.RssOneGraph / 1048576.0:F0} MiB with 1 graph, {memory.RssAllGraphs / 1048576.0:F0} MiB with all {memory.Graphs} graphs (widths x buckets) sharing them");
            var cells = new List<ProfileCell>();
            var formatCells = extra.Select(_ => new List<ProfileCell>()).ToList();
            AnsiConsole.Progress().Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn()).Start(ctx =>
            {
                var task = ctx.AddTask("profiling widths x fills", maxValue: ws.Count * fs.Count);
                foreach (double f in fs)
                {
                    foreach (int w in ws)
                    {
                        int fill = Math.Clamp((int)(f * cap), 0, cap - w);
                        // Every runtime (formats, then the --compare model) times this cell in turn, run by run.
                        OrtModelRuntime[] all = [rt, .. extra, .. otherRt is null ? Array.Empty<OrtModelRuntime>() : [otherRt]];
                        var medians = TimeStepMany(all, w, fill, reps);
                        cells.Add(Cell(rt, w, fill, medians[0]));
                        for (int i = 0; i < extra.Count; i++)
                        {
                            formatCells[i].Add(Cell(extra[i], w, fill, medians[1 + i]));
                        }

                        if (otherRt is not null)
                        {
                            otherCells.Add(Cell(otherRt, w, fill, medians[^1]));
                        }

                        task.Increment(1);
                    }
                }
            });

            var overhead = MeasureOverhead(bundle, rt, cap, reps);
            var table = new Table().AddColumn("width");
            foreach (double f in fs)
            {
                table.AddColumn($"fill {f:P0} (ms)");
            }

            table.AddColumn("ms/token @ first fill");
            foreach (int w in ws)
            {
                var row = new List<string> { w.ToString(CultureInfo.InvariantCulture) };
                row.AddRange(fs.Select((f, i) => cells.First(c => c.Width == w && c.Fill == Math.Clamp((int)(f * cap), 0, cap - w)).MedianMs.ToString("F2", CultureInfo.InvariantCulture)));
                var first = cells.First(c => c.Width == w);
                row.Add((first.MedianMs / w).ToString("F3", CultureInfo.InvariantCulture));
                table.AddRow(row.ToArray());
            }

            AnsiConsole.Write(table);
            AnsiConsole.MarkupLineInterpolated($"engine overhead at fill {overhead.Fill}: generate {overhead.GenerateMsPerToken:F3} ms/token vs bare W=1 run {overhead.BareRunMs:F3} ms → [bold]{overhead.Ratio:F3}x[/] (bar: ≤ 1.10x)");
            foreach (var r in extra)
            {
                r.Dispose();
            }

            var allCells = cells.Concat(formatCells.SelectMany(c => c)).ToList();
            if (formats.Count > 1 || formats[0] != WeightFormat.F32)
            {
                var ft = new Table().AddColumns("weights", "width", "fill", "ms", "MiB read", "GB/s", "of measured read");
                foreach (var c in allCells)
                {
                    ft.AddRow(c.Weights, $"{c.Width}", $"{c.Fill}", c.MedianMs.ToString("F2", CultureInfo.InvariantCulture), (c.BytesPerStep / 1048576.0).ToString("F0", CultureInfo.InvariantCulture),
                        c.GbPerSecond.ToString("F1", CultureInfo.InvariantCulture), (c.GbPerSecond / readGbs).ToString("P0", CultureInfo.InvariantCulture));
                }

                AnsiConsole.Write(ft);
            }

            WriteReport(parse.GetValue(outDir), bundle, rt, cap, reps, allCells, fs, ws, overhead, memory, formats, readGbs);
            if (other is not null)
            {
                WriteComparison(parse.GetValue(outDir), bundle, other, cap, reps, cells, otherCells, (formats[0], fused, compareFused));
            }

            if (parse.GetValue(ortProfile))
            {
                ProfileOperators(parse.GetValue(outDir), bundle, cap, ws, fs[0], reps, formats, fused, parse.GetValue(threads));
            }

            return 0;
        });
        return cmd;
    }

    /// <summary>One timed cell: weights read once plus the KV bucket's keys and values, per step.</summary>
    internal sealed record ProfileCell(int Width, int Fill, double MedianMs, string Weights = "f32", long BytesPerStep = 0)
    {
        public double GbPerSecond => MedianMs <= 0 ? 0 : BytesPerStep / (MedianMs / 1000) / 1e9;
    }

    private static ProfileCell Cell(OrtModelRuntime rt, int width, int fill, double ms)
    {
        var c = rt.Config;
        int bucket = rt.Buckets.First(b => b >= Math.Min(fill + width, rt.Capacity));
        long kv = 2L * c.NumLayers * c.KvDim * rt.Kv.ElementBytes() * bucket;
        return new ProfileCell(width, fill, ms, WeightQuantizer.Name(rt.WeightFormat), rt.SharedWeightBytes + kv);
    }

    internal sealed record Overhead(int Fill, double GenerateMsPerToken, double BareRunMs, double Ratio);

    internal sealed record MemoryReport(long WeightBytes, long RssWeights, long RssOneGraph, long RssAllGraphs, int Graphs);

    internal static long CurrentRss()
    {
        GC.Collect();
        using var p = System.Diagnostics.Process.GetCurrentProcess();
        p.Refresh();
        return p.WorkingSet64;
    }

    private static List<T> ParseList<T>(string s, Func<string, T> parse)
        => s.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Select(parse).ToList();

    private static double TimeStep(OrtModelRuntime rt, int width, int fill, int reps)
    {
        using var step = new StepTimer(rt, width, fill);
        var times = new double[reps];
        for (int r = 0; r < reps; r++)
        {
            times[r] = step.RunOnce();
        }

        Array.Sort(times);
        return times[reps / 2];
    }

    /// <summary>The same cell on several runtimes, run by run in turn (the order rotating), so drift in the machine's speed hits all alike; medians.</summary>
    internal static double[] TimeStepMany(IReadOnlyList<OrtModelRuntime> runtimes, int width, int fill, int reps)
    {
        var timers = runtimes.Select(r => new StepTimer(r, width, fill)).ToList();
        try
        {
            var times = runtimes.Select(_ => new double[reps]).ToArray();
            for (int r = 0; r < reps; r++)
            {
                for (int k = 0; k < timers.Count; k++)
                {
                    int i = (k + r) % timers.Count;
                    times[i][r] = timers[i].RunOnce();
                }
            }

            return [.. times.Select(t => t.Order().ElementAt(reps / 2))];
        }
        finally
        {
            timers.ForEach(t => t.Dispose());
        }
    }

    /// <summary>One graph step of a width at a KV fill, ready to be timed run after run.</summary>
    private sealed class StepTimer : IDisposable
    {
        private readonly OrtModelRuntime _rt;
        private readonly KvCache _cache;
        private readonly int _width;

        public StepTimer(OrtModelRuntime rt, int width, int fill)
        {
            _rt = rt;
            _width = width;
            _cache = rt.CreateCache();

            // Pretend `fill` slots are committed: the mask exposes them, their contents are zeros.
            var c = rt.Config;
            var zeros = Enumerable.Range(0, c.NumLayers).Select(_ => KvCache.Allocate(rt.Kv, c.NumKvHeads * c.HeadDim)).ToArray();
            while (_cache.Length < fill)
            {
                _cache.Commit(zeros, zeros, 1, [0]);
            }

            var buf = rt.Buffers(width, _cache);
            buf.SetLinear(Enumerable.Range(10, width).ToArray(), fill, fill);
            rt.Run(width, _cache);
        }

        public double RunOnce()
        {
            long t0 = Stopwatch.GetTimestamp();
            _rt.Run(_width, _cache);
            return Stopwatch.GetElapsedTime(t0).TotalMilliseconds;
        }

        public void Dispose() => _cache.Dispose();
    }

    /// <summary>
    /// The engine's decode step (what generate runs per token: Generator.Step, which fills the
    /// inputs, runs the width-1 graph and commits the new keys/values, then the sampler's choice)
    /// against the bare ONNX Runtime Run of the same graph at the same KV fill. The two alternate
    /// step by step in one process, so the machine's drifting speed affects both alike; the
    /// medians of the per-step times are compared.
    /// </summary>
    private static Overhead MeasureOverhead(ModelBundle bundle, OrtModelRuntime rt, int cap, int reps)
    {
        var gen = new Generator(rt);
        string text = string.Concat(Enumerable.Repeat("The keeper lit the lamp every evening so that ships could find the harbour. ", 20));
        int[] prompt = bundle.Tokenizer.Encode(PromptTemplate.Render(text, "Summarize the document.", bundle.HasRoleTokens));
        prompt = prompt.Length > cap / 2 ? prompt[..(cap / 2)] : prompt;

        // As many steps as asked for, but prompt + steps must fit the cache (small --capacity values).
        int steps = Math.Min(Math.Max(128, reps * 16), cap - prompt.Length - 1);
        var sampler = new Sampler(new SamplingOptions());
        using var engineCache = rt.CreateCache();
        using var bareCache = rt.CreateCache();
        var logits = gen.Prefill(engineCache, prompt);
        gen.Prefill(bareCache, prompt);
        int token = sampler.Next(logits);

        // Both caches in the bucket the engine ends in, from the first step: otherwise the engine's cache
        // grows into the next bucket (a larger graph) half way while the bare one stays, and the ratio
        // measures the bucket change, not the engine.
        engineCache.EnsureRoom(engineCache.Length + steps + 1);
        bareCache.EnsureRoom(engineCache.Length + steps + 1);
        var engine = new double[steps];
        var bare = new double[steps];
        for (int i = 0; i < steps; i++)
        {
            // Alternate which goes first, so neither always runs on caches the other just warmed.
            for (int k = 0; k < 2; k++)
            {
                long t0 = System.Diagnostics.Stopwatch.GetTimestamp();
                if ((i + k) % 2 == 0)
                {
                    token = sampler.Next(gen.Step(engineCache, token));
                    engine[i] = System.Diagnostics.Stopwatch.GetElapsedTime(t0).TotalMilliseconds;
                }
                else
                {
                    rt.Run(1, bareCache);
                    bare[i] = System.Diagnostics.Stopwatch.GetElapsedTime(t0).TotalMilliseconds;
                }
            }
        }

        Array.Sort(engine);
        Array.Sort(bare);
        double e = engine[steps / 2], b = bare[steps / 2];
        return new Overhead(prompt.Length + (steps / 2), e, b, e / b);
    }

    /// <summary>Each format's graphs run with ONNX Runtime's profiler on, then its traces summed by operator type (<see cref="OrtProfileReport"/>).</summary>
    private static void ProfileOperators(DirectoryInfo? outDir, ModelBundle bundle, int cap, List<int> ws, double fill, int reps, List<WeightFormat> formats, bool fused, int threads)
    {
        var ops = new List<OrtOpTime>();
        foreach (var f in formats)
        {
            var traces = Directory.CreateTempSubdirectory("coordgen-ort-profile-");
            try
            {
                using var rt = ConsoleUi.Status($"profiling the {WeightQuantizer.Name(f)} graphs' operators", () =>
                {
                    var r = new OrtModelRuntime(bundle.Weights, cap, ws, new RuntimeOptions { IntraOpThreads = threads, Weights = f, FusedOps = fused, ProfilePrefix = traces.FullName + Path.DirectorySeparatorChar });
                    foreach (int w in ws)
                    {
                        using var timer = new StepTimer(r, w, Math.Clamp((int)(fill * cap), 0, cap - w));
                        for (int i = 0; i < reps; i++)
                        {
                            timer.RunOnce();
                        }
                    }

                    return r;
                });
                foreach (string trace in rt.EndProfiling())
                {
                    ops.AddRange(OrtProfileReport.Read(trace, WeightQuantizer.Name(f)));
                }
            }
            finally
            {
                traces.Delete(recursive: true);
            }
        }

        string command = string.Create(CultureInfo.InvariantCulture, $"coordgen model profile --model {bundle.Directory} --capacity {cap} --widths {string.Join(",", ws)} --fills {fill} --repeats {reps} --weights {string.Join(",", formats.Select(WeightQuantizer.Name))} --fused-ops {(fused ? "true" : "false")} --ort-profile");
        OrtProfileReport.Write(outDir?.FullName ?? Path.Combine(ModelLocator.RepoRoot(), "docs", "bench"), bundle.Name, BenchStamp.Capture(), command, ops);
    }

    /// <summary>profile-&lt;model&gt;-vs-&lt;other&gt;.md/.json: both models' cells side by side and their ratio.</summary>
    /// <param name="how">The weight format both sides ran, and whether each used the contrib kernels (--fused-ops).</param>
    private static void WriteComparison(DirectoryInfo? outDir, ModelBundle modelA, ModelBundle modelB, int cap, int reps, List<ProfileCell> cellsA, List<ProfileCell> cellsB, (WeightFormat Weights, bool FusedA, bool FusedB) how)
    {
        string dir = outDir?.FullName ?? Path.Combine(ModelLocator.RepoRoot(), "docs", "bench");
        Directory.CreateDirectory(dir);
        var stamp = BenchStamp.Capture();

        // Each side named by its model, and by its kernels where the two sides differ in them.
        string Label(ModelBundle m, bool f) => how.FusedA == how.FusedB ? m.Name : $"{m.Name}{(f ? "" : "-plain-ops")}";
        var (a, b) = ((Name: Label(modelA, how.FusedA), modelA.Directory, modelA.Config), (Name: Label(modelB, how.FusedB), modelB.Directory, modelB.Config));
        string weightsPart = how.Weights == WeightFormat.F32 ? "" : $"-{WeightQuantizer.Name(how.Weights)}";
        string name = $"profile-{a.Name}-vs-{b.Name}{weightsPart}";
        var ratios = cellsA.Zip(cellsB, (x, y) => x.MedianMs / y.MedianMs).ToList();
        var table = new Table().AddColumns("width", "fill", $"{a.Name} ms", $"{b.Name} ms", "ratio");
        var md = new StringBuilder();
        md.AppendLine(CultureInfo.InvariantCulture, $"# Step time side by side: {a.Name} and {b.Name}");
        md.AppendLine();
        md.AppendLine(stamp.ToMarkdown());
        md.AppendLine(CultureInfo.InvariantCulture, $"Command: `coordgen model profile --model {a.Directory} --compare {b.Directory} --capacity {cap} --repeats {reps} --weights {WeightQuantizer.Name(how.Weights)} --fused-ops {(how.FusedA ? "true" : "false")} --compare-fused-ops {(how.FusedB ? "true" : "false")}`. Each cell runs the two sides' graphs in turn, {reps} times each (which goes first alternating); medians. `-plain-ops`: rotary embedding and residual norms as plain ONNX nodes instead of ONNX Runtime's contrib kernels.");
        md.AppendLine();
        md.AppendLine(CultureInfo.InvariantCulture, $"Parameters: {a.Config.ParameterCount:N0} and {b.Config.ParameterCount:N0}. Ratio {a.Name} / {b.Name}: median {Median(ratios):F3}, range {ratios.Min():F3}-{ratios.Max():F3}; largest departure from 1: {ratios.Max(r => Math.Abs(r - 1)):P1}.");
        md.AppendLine();
        md.AppendLine(CultureInfo.InvariantCulture, $"| width | KV fill | {a.Name} ms | {b.Name} ms | ratio |");
        md.AppendLine("|---|---|---|---|---|");
        for (int i = 0; i < cellsA.Count; i++)
        {
            var (x, y) = (cellsA[i], cellsB[i]);
            md.AppendLine(CultureInfo.InvariantCulture, $"| {x.Width} | {x.Fill} | {x.MedianMs:F2} | {y.MedianMs:F2} | {ratios[i]:F3} |");
            table.AddRow($"{x.Width}", $"{x.Fill}", x.MedianMs.ToString("F2", CultureInfo.InvariantCulture), y.MedianMs.ToString("F2", CultureInfo.InvariantCulture), ratios[i].ToString("F3", CultureInfo.InvariantCulture));
        }

        AnsiConsole.Write(table);
        File.WriteAllText(Path.Combine(dir, name + ".md"), md.ToString());
        File.WriteAllText(Path.Combine(dir, name + ".json"), JsonSerializer.Serialize(new
        {
            stamp,
            model = modelA.Name,
            compare = modelB.Name,
            model_label = a.Name,
            compare_label = b.Name,
            weights = WeightQuantizer.Name(how.Weights),
            fused_ops = how.FusedA,
            compare_fused_ops = how.FusedB,
            capacity = cap,
            repeats = reps,
            median_ratio = Median(ratios),
            max_abs_departure = ratios.Max(r => Math.Abs(r - 1)),
            cells = cellsA.Zip(cellsB, (x, y) => new { width = x.Width, fill = x.Fill, median_ms = x.MedianMs, compare_median_ms = y.MedianMs, ratio = x.MedianMs / y.MedianMs }),
        }, new JsonSerializerOptions { WriteIndented = true }));
        ConsoleUi.Err.MarkupLineInterpolated($"[grey]wrote {Path.Combine(dir, name)}.md and .json[/]");
    }

    private static double Median(List<double> xs)
    {
        var s = xs.Order().ToList();
        return s.Count == 0 ? 0 : s[s.Count / 2];
    }

    private static void WriteReport(DirectoryInfo? outDir, ModelBundle bundle, OrtModelRuntime rt, int cap, int reps, List<ProfileCell> cells,
        List<double> fills, List<int> widths, Overhead overhead, MemoryReport memory, List<WeightFormat> formats, double readGbs)
    {
        string dir = outDir?.FullName ?? Path.Combine(ModelLocator.RepoRoot(), "docs", "bench");
        Directory.CreateDirectory(dir);
        var stamp = BenchStamp.Capture();
        bool multi = formats.Count > 1 || formats[0] != WeightFormat.F32;
        string name = $"profile-{bundle.Name}" + (multi ? "-weights" : "");
        string mainFormat = WeightQuantizer.Name(formats[0]);
        var allCells = cells;
        cells = [.. cells.Where(c => c.Weights == mainFormat)];
        var md = new StringBuilder();
        md.AppendLine(CultureInfo.InvariantCulture, $"# Latency against graph width: {bundle.Name}");
        md.AppendLine();
        md.AppendLine(stamp.ToMarkdown());
        md.AppendLine(CultureInfo.InvariantCulture, $"Command: `coordgen model profile --model {bundle.Directory} --capacity {cap} --repeats {reps}{(multi ? $" --weights {string.Join(",", formats.Select(WeightQuantizer.Name))}" : "")}`. Capacity C={cap}; median of {reps} runs per cell; ONNX Runtime CPU provider. Graphs: {rt.GraphCount} (widths {string.Join(",", widths)} x KV buckets {string.Join(",", rt.Buckets)}), all sharing one copy of the weights ({rt.SharedWeightBytes / 1048576.0:F1} MiB, {mainFormat}). The table below is {mainFormat}.");
        md.AppendLine();
        md.AppendLine(CultureInfo.InvariantCulture, $"Memory (process RSS): {memory.RssWeights / 1048576.0:F0} MiB with the weights loaded, {memory.RssOneGraph / 1048576.0:F0} MiB with one graph, {memory.RssAllGraphs / 1048576.0:F0} MiB with all {memory.Graphs} graphs: {(memory.RssAllGraphs - memory.RssOneGraph) / 1048576.0:F0} MiB for {memory.Graphs - 1} more graphs, against {memory.WeightBytes / 1048576.0:F0} MiB per graph if each held its own weights.");
        md.AppendLine();
        md.Append("| width |");
        foreach (double f in fills)
        {
            md.Append(CultureInfo.InvariantCulture, $" fill {f:P0} ms |");
        }

        md.AppendLine(" cost vs W=1 | ms/token |");
        md.Append("|---|");
        md.AppendLine(string.Concat(Enumerable.Repeat("---|", fills.Count + 2)));
        double w1 = cells.First(c => c.Width == widths.Min()).MedianMs;
        foreach (int w in widths)
        {
            md.Append(CultureInfo.InvariantCulture, $"| {w} |");
            var mine = cells.Where(c => c.Width == w).ToList();
            foreach (var c in mine)
            {
                md.Append(CultureInfo.InvariantCulture, $" {c.MedianMs:F2} |");
            }

            md.AppendLine(CultureInfo.InvariantCulture, $" {mine[0].MedianMs / w1:F2}x | {mine[0].MedianMs / w:F3} |");
        }

        md.AppendLine();
        if (multi)
        {
            md.AppendLine();
            md.AppendLine("## Weight formats side by side");
            md.AppendLine();
            md.AppendLine(CultureInfo.InvariantCulture, $"Every cell ran each format's graph in turn, run by run. Bytes per step: the weights as held (quantized linear layers: codes plus one float scale per {WeightQuantizer.BlockSize} weights; norms, embedding and head stay float32) plus the keys and values of the KV bucket the step reads. Measured memory read bandwidth of this machine (all cores summing a 512 MiB array, best of 5): **{readGbs:F1} GB/s**; the last column is each step's bytes over its time against that floor.");
            md.AppendLine();
            md.AppendLine("| weights | width | KV fill | ms per step | speed vs f32 | MiB read | GB/s | of measured read |");
            md.AppendLine("|---|---|---|---|---|---|---|---|");
            foreach (var c in allCells.OrderBy(c => c.Fill).ThenBy(c => c.Width).ThenBy(c => formats.FindIndex(f => WeightQuantizer.Name(f) == c.Weights)))
            {
                var f32 = allCells.FirstOrDefault(x => x.Weights == "f32" && x.Width == c.Width && x.Fill == c.Fill);
                md.AppendLine(CultureInfo.InvariantCulture, $"| {c.Weights} | {c.Width} | {c.Fill} | {c.MedianMs:F2} | {(f32 is null ? "" : $"{f32.MedianMs / c.MedianMs:F2}x")} | {c.BytesPerStep / 1048576.0:F0} | {c.GbPerSecond:F1} | {c.GbPerSecond / readGbs:P0} |");
            }

            md.AppendLine();
        }

        md.AppendLine(CultureInfo.InvariantCulture, $"Engine overhead (bar ≤ 1.10x): the decode step `coordgen generate` runs per token (Generator.Step: inputs, width-1 run, KV commit; then the sampler) took a median {overhead.GenerateMsPerToken:F3} ms against {overhead.BareRunMs:F3} ms for the bare ONNX Runtime run of the same graph, alternating step by step (and which goes first) at KV fill ≈{overhead.Fill}: **{overhead.Ratio:F3}x**.");
        File.WriteAllText(Path.Combine(dir, name + ".md"), md.ToString());
        File.WriteAllText(Path.Combine(dir, name + ".json"), JsonSerializer.Serialize(new
        {
            stamp,
            model = bundle.Name,
            capacity = cap,
            repeats = reps,
            shared_weight_bytes = rt.SharedWeightBytes,
            graphs = rt.GraphCount,
            rss_bytes = new { weights_loaded = memory.RssWeights, one_graph = memory.RssOneGraph, all_graphs = memory.RssAllGraphs },
            read_bandwidth_gb_s = multi ? Math.Round(readGbs, 2) : (double?)null,
            cells = allCells.Select(c => new { width = c.Width, fill = c.Fill, median_ms = c.MedianMs, weights = c.Weights, bytes_per_step = c.BytesPerStep, gb_per_s = Math.Round(c.GbPerSecond, 2) }),
            overhead = new { fill = overhead.Fill, generate_ms_per_token = overhead.GenerateMsPerToken, bare_run_ms = overhead.BareRunMs, ratio = overhead.Ratio },
        }, new JsonSerializerOptions { WriteIndented = true }));
        // The same widths as a device profile (docs/snapdragon.md), at the middle KV fill: run this on a
        // device and pass the file to --device-profile for what-if runs elsewhere.
        int mid = cells.Select(c => c.Fill).Distinct().Order().ElementAt(cells.Select(c => c.Fill).Distinct().Count() / 2);
        var device = new CoordGen.Engine.Scheduling.DeviceProfile
        {
            Name = $"measured-{bundle.Name}",
            Device = $"{stamp.Machine} ({stamp.Cores} cores), ONNX Runtime {rt.Provider}",
            Model = bundle.Name,
            Measured = true,
            Source = $"coordgen model profile at commit {stamp.Commit}, {stamp.When:yyyy-MM-dd HH:mm} UTC; median of {reps} runs per width at KV fill {mid} of {cap}",
            Steps = [.. widths.Select(w => new CoordGen.Engine.Scheduling.StepPoint(w, cells.Where(c => c.Width == w).OrderBy(c => Math.Abs(c.Fill - mid)).First().MedianMs))],
            Blocks = 1,
            LoadMsPerBlock = 0,
            LoadSource = "not measured by model profile (bench graphs measures block loads)",
            WeightsMb = Math.Round(memory.WeightBytes / 1048576.0, 1),
            WeightsSource = "float32 weights as loaded",
        };
        File.WriteAllText(Path.Combine(dir, $"device-profile-{bundle.Name}.json"), JsonSerializer.Serialize(device, new JsonSerializerOptions { WriteIndented = true }));
        ConsoleUi.Err.MarkupLineInterpolated($"[grey]wrote {Path.Combine(dir, name)}.md and .json, and {Path.Combine(dir, $"device-profile-{bundle.Name}.json")} (a --device-profile file)[/]");
    }
}
