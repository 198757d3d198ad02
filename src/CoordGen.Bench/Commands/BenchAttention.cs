using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.Json;
using CoordGen.Engine.Model;
using CoordGen.Engine.Onnx;
using Microsoft.ML.OnnxRuntime;
using Spectre.Console;

namespace CoordGen.Host.Commands;

/// <summary>
/// <c>coordgen bench attention</c>: a model's attention layers alone, in today's form (each slot's cache
/// joined, scored over the whole capacity) and in ONNX Runtime's GroupQueryAttention over one shared
/// past/present buffer per layer (each slot scored over its own length), side by side, run by run; and
/// whether either form gives a chain of W rows exactly what W single steps give (<see cref="AttentionProbe"/>).
/// </summary>
internal static class BenchAttention
{
    public static Command Create()
    {
        var model = CommonOptions.Model();
        var slots = new Option<string>("--slots") { Description = "Comma-separated session counts per run (1: a solo step; more: a packed run).", DefaultValueFactory = _ => "1,8" };
        var widths = new Option<string>("--widths") { Description = "Comma-separated rows per slot (1: a decode step; 8: a verification).", DefaultValueFactory = _ => "1,8" };
        var cells = new Option<string>("--cells") { Description = "Comma-separated CAPACITY:FILL pairs: each slot's cache capacity and the tokens already in it.", DefaultValueFactory = _ => "1024:900,2048:900,2048:1800" };
        var repeats = new Option<int>("--repeats") { Description = "Timed runs per form and point; the median is reported.", DefaultValueFactory = _ => 21 };
        var threads = CommonOptions.Threads();
        var outDir = new Option<DirectoryInfo?>("--out") { Description = "Report folder (default docs/bench/ of the checkout).", HelpName = "DIR" };
        var cmd = new Command("attention", "A model's attention layers alone: today's joined caches against GroupQueryAttention over shared past/present buffers, side by side (ms per step per slot count, width, capacity and fill), and whether a chain of rows equals single steps bit for bit (the KV slot pool of issue 19).")
        {
            model, slots, widths, cells, repeats, threads, outDir,
        };
        cmd.SetAction(parse =>
        {
            var ss = parse.GetValue(slots)!.Split(',').Select(int.Parse).ToList();
            var ws = parse.GetValue(widths)!.Split(',').Select(int.Parse).ToList();
            var cs = parse.GetValue(cells)!.Split(',').Select(p => p.Split(':')).Select(p => (Cap: int.Parse(p[0], CultureInfo.InvariantCulture), Fill: int.Parse(p[1], CultureInfo.InvariantCulture))).ToList();
            if (ss.Any(s => s < 1) || ws.Any(w => w < 1) || cs.Any(c => c.Fill < 4 || c.Fill + ws.Max() > c.Cap))
            {
                throw new ArgumentException("every --slots and --widths value must be at least 1, and every --cells FILL at least 4 with FILL plus the widest width within its CAPACITY (e.g. 2048:900).");
            }

            var stamp = BenchStamp.Capture();
            string dir = ModelLocator.Resolve(parse.GetValue(model));
            var c = ModelConfig.Load(Path.Combine(dir, "config.json"));
            string name = Path.GetFileName(dir.TrimEnd(Path.DirectorySeparatorChar));
            using var so = new SessionOptions { GraphOptimizationLevel = GraphOptimizationLevel.ORT_ENABLE_ALL, IntraOpNumThreads = parse.GetValue(threads), LogSeverityLevel = OrtLoggingLevel.ORT_LOGGING_LEVEL_FATAL }; // a refused form is reported, not logged
            int reps = Math.Max(5, parse.GetValue(repeats));
            var rows = new List<Row>();
            AnsiConsole.Progress().Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new ElapsedTimeColumn()).Start(ctx =>
            {
                var task = ctx.AddTask("cells x slots x widths", maxValue: cs.Count * ss.Count * ws.Count);
                foreach (var (cap, fill) in cs)
                {
                    foreach (int s in ss)
                    {
                        foreach (int w in ws)
                        {
                            rows.Add(Time(c, so, s, w, cap, fill, reps));
                            task.Increment(1);
                        }
                    }
                }
            });

            var identity = new[] { Identity(c, so, cs[0].Cap, cs[0].Fill, gqa: false), Identity(c, so, cs[0].Cap, cs[0].Fill, gqa: true) };
            Write(parse.GetValue(outDir)?.FullName ?? Path.Combine(ModelLocator.RepoRoot(), "docs", "bench"), stamp, name, c, reps, rows, identity, cs[0]);
            return 0;
        });
        return cmd;
    }

    private sealed record Row(int Capacity, int Fill, int Slots, int Width, double JoinedMs, double? GqaMs, string? GqaRefused);

    private static float[] Random(Random rng, long n)
    {
        var a = new float[n];
        for (long i = 0; i < n; i++)
        {
            a[i] = (float)((rng.NextDouble() * 2) - 1);
        }

        return a;
    }

    private static OrtValue Tensor(float[] data, params long[] dims) => OrtValue.CreateTensorValueFromMemory(data, dims);

    private static Row Time(ModelConfig c, SessionOptions so, int s, int w, int cap, int fill, int reps)
    {
        int h = c.NumHeads, hkv = c.NumKvHeads, d = c.HeadDim, g = h / hkv, layers = c.NumLayers;
        var rng = new Random(1);
        var values = new List<OrtValue>();
        OrtValue T(float[] data, params long[] dims)
        {
            var v = Tensor(data, dims);
            values.Add(v);
            return v;
        }

        try
        {
            // Today's form: every slot's cache its own input, joined per layer.
            using var joined = new InferenceSession(AttentionProbe.Joined(layers, s, w, cap, h, hkv, d), so);
            var mask = new float[s * g * w * (cap + w)];
            for (int r = 0; r < s * g * w; r++)
            {
                for (int col = 0; col < cap + w; col++)
                {
                    mask[(r * (cap + w)) + col] = col < fill || (col >= cap && col - cap <= r % w) ? 0 : float.NegativeInfinity;
                }
            }

            var jIn = new Dictionary<string, OrtValue>
            {
                ["q"] = T(Random(rng, s * hkv * g * w * d), s, hkv, g * w, d),
                ["k"] = T(Random(rng, s * hkv * w * d), s, hkv, w, d),
                ["v"] = T(Random(rng, s * hkv * w * d), s, hkv, w, d),
                ["mask"] = T(mask, s, 1, g * w, cap + w),
            };
            for (int l = 0; l < layers; l++)
            {
                for (int slot = 0; slot < s; slot++)
                {
                    jIn[$"pk{l}_{slot}"] = T(Random(rng, (long)hkv * cap * d), 1, hkv, cap, d);
                    jIn[$"pv{l}_{slot}"] = T(Random(rng, (long)hkv * cap * d), 1, hkv, cap, d);
                }
            }

            var jOut = T(new float[s * hkv * g * w * d], s, hkv, g * w, d);

            // GroupQueryAttention: one buffer per layer, past and present bound to the same memory.
            InferenceSession? gqa = null;
            string? refused = null;
            var gIn = new Dictionary<string, OrtValue>
            {
                ["q"] = T(Random(rng, s * w * h * d), s, w, h * d),
                ["k"] = T(Random(rng, s * w * hkv * d), s, w, hkv * d),
                ["v"] = T(Random(rng, s * w * hkv * d), s, w, hkv * d),
                ["seqlens_k"] = OrtValue.CreateTensorValueFromMemory(Enumerable.Repeat(fill + w - 1, s).ToArray(), [s]),
                ["total_len"] = OrtValue.CreateTensorValueFromMemory(new[] { fill + w }, []),
            };
            var gOut = new Dictionary<string, OrtValue> { ["out"] = T(new float[s * w * h * d], s, w, h * d) };
            for (int l = 0; l < layers; l++)
            {
                gIn[$"pk{l}"] = gOut[$"prk{l}"] = T(Random(rng, (long)s * hkv * cap * d), s, hkv, cap, d);
                gIn[$"pv{l}"] = gOut[$"prv{l}"] = T(Random(rng, (long)s * hkv * cap * d), s, hkv, cap, d);
            }

            using var ro = new RunOptions();
            try
            {
                gqa = new InferenceSession(AttentionProbe.GroupQuery(layers, s, w, cap, h, hkv, d), so);
                gqa.Run(ro, gIn.Keys.ToArray(), gIn.Values.ToArray(), gOut.Keys.ToArray(), gOut.Values.ToArray());
            }
            catch (OnnxRuntimeException ex)
            {
                refused = ex.Message.Split("Status Message: ").Last().Trim();
                gqa?.Dispose();
                gqa = null;
            }

            var (jNames, jVals) = (jIn.Keys.ToArray(), jIn.Values.ToArray());
            var (gNames, gVals, goNames, goVals) = (gIn.Keys.ToArray(), gIn.Values.ToArray(), gOut.Keys.ToArray(), gOut.Values.ToArray());
            var (tj, tg) = (new List<double>(), new List<double>());
            for (int i = 0; i < reps + 3; i++)
            {
                long t0 = Stopwatch.GetTimestamp();
                joined.Run(ro, jNames, jVals, ["out"], [jOut]);
                double jm = Stopwatch.GetElapsedTime(t0).TotalMilliseconds;
                t0 = Stopwatch.GetTimestamp();
                gqa?.Run(ro, gNames, gVals, goNames, goVals);
                double gm = Stopwatch.GetElapsedTime(t0).TotalMilliseconds;
                if (i >= 3)
                {
                    tj.Add(jm);
                    tg.Add(gm);
                }
            }

            gqa?.Dispose();
            return new Row(cap, fill, s, w, Median(tj), gqa is null && refused is not null ? null : Median(tg), refused);
        }
        finally
        {
            values.ForEach(v => v.Dispose());
        }
    }

    private static double Median(List<double> xs)
    {
        xs.Sort();
        return xs[xs.Count / 2];
    }

    /// <summary>One layer, one slot: a chain of 4 rows at <paramref name="fill"/> against 4 single steps that each append the row before; bit-identical outputs counted.</summary>
    private static (string Form, int Same, int Differ, double MaxDiff) Identity(ModelConfig c, SessionOptions so, int cap, int fill, bool gqa)
    {
        const int W = 4;
        int h = c.NumHeads, hkv = c.NumKvHeads, d = c.HeadDim, g = h / hkv;
        var rng = new Random(7);
        var q = Random(rng, W * h * d);
        var k = Random(rng, W * hkv * d);
        var v = Random(rng, W * hkv * d);
        var pk = Random(rng, (long)hkv * cap * d);
        var pv = Random(rng, (long)hkv * cap * d);

        // Rows of head hh of query row r, in the two layouts: GQA [W, H*D]; joined [Hkv, G*W, D] with heads h = kv*G + gg.
        float[] Run(int w, int first, float[] kCache, float[] vCache)
        {
            using var ro = new RunOptions();
            if (gqa)
            {
                using var s = new InferenceSession(AttentionProbe.GroupQuery(1, 1, w, cap, h, hkv, d), so);
                using var kc = Tensor(kCache, 1, hkv, cap, d);
                using var vc = Tensor(vCache, 1, hkv, cap, d);
                using var outV = Tensor(new float[w * h * d], 1, w, h * d);
                using var qv = Tensor(q[(first * h * d)..((first + w) * h * d)], 1, w, h * d);
                using var kv = Tensor(k[(first * hkv * d)..((first + w) * hkv * d)], 1, w, hkv * d);
                using var vv = Tensor(v[(first * hkv * d)..((first + w) * hkv * d)], 1, w, hkv * d);
                using var sl = OrtValue.CreateTensorValueFromMemory(new[] { fill + first + w - 1 }, [1]);
                using var tl = OrtValue.CreateTensorValueFromMemory(new[] { fill + first + w }, []);
                s.Run(ro, ["q", "k", "v", "seqlens_k", "total_len", "pk0", "pv0"], [qv, kv, vv, sl, tl, kc, vc], ["out", "prk0", "prv0"], [outV, kc, vc]);
                return outV.GetTensorDataAsSpan<float>().ToArray();
            }

            // Joined: the step's own rows in [Hkv, G*w, D] / [Hkv, w, D]; earlier single steps' keys are in the cache.
            var qj = new float[hkv * g * w * d];
            var kj = new float[hkv * w * d];
            var vj = new float[hkv * w * d];
            for (int r = 0; r < w; r++)
            {
                for (int head = 0; head < h; head++)
                {
                    int kvh = head / g, gg = head % g;
                    Array.Copy(q, ((first + r) * h * d) + (head * d), qj, (((kvh * g * w) + (gg * w) + r) * d), d);
                }

                for (int kvh = 0; kvh < hkv; kvh++)
                {
                    Array.Copy(k, ((first + r) * hkv * d) + (kvh * d), kj, ((kvh * w) + r) * d, d);
                    Array.Copy(v, ((first + r) * hkv * d) + (kvh * d), vj, ((kvh * w) + r) * d, d);
                }
            }

            var mask = new float[g * w * (cap + w)];
            for (int row = 0; row < g * w; row++)
            {
                for (int col = 0; col < cap + w; col++)
                {
                    mask[(row * (cap + w)) + col] = col < fill + first || (col >= cap && col - cap <= row % w) ? 0 : float.NegativeInfinity;
                }
            }

            using var js = new InferenceSession(AttentionProbe.Joined(1, 1, w, cap, h, hkv, d), so);
            using var o = Tensor(new float[hkv * g * w * d], 1, hkv, g * w, d);
            using var qt = Tensor(qj, 1, hkv, g * w, d);
            using var kt = Tensor(kj, 1, hkv, w, d);
            using var vt = Tensor(vj, 1, hkv, w, d);
            using var mt = Tensor(mask, 1, 1, g * w, cap + w);
            using var kc2 = Tensor(kCache, 1, hkv, cap, d);
            using var vc2 = Tensor(vCache, 1, hkv, cap, d);
            js.Run(ro, ["q", "k", "v", "mask", "pk0_0", "pv0_0"], [qt, kt, vt, mt, kc2, vc2], ["out"], [o]);
            var joinedOut = o.GetTensorDataAsSpan<float>();

            // Back to [w, H*D], and the step's keys and values into the cache (what the device commits).
            var result = new float[w * h * d];
            for (int r = 0; r < w; r++)
            {
                for (int head = 0; head < h; head++)
                {
                    int kvh = head / g, gg = head % g;
                    joinedOut.Slice(((kvh * g * w) + (gg * w) + r) * d, d).CopyTo(result.AsSpan(((r * h) + head) * d, d));
                }

                for (int kvh = 0; kvh < hkv; kvh++)
                {
                    Array.Copy(kj, ((kvh * w) + r) * d, kCache, ((kvh * cap) + fill + first + r) * d, d);
                    Array.Copy(vj, ((kvh * w) + r) * d, vCache, ((kvh * cap) + fill + first + r) * d, d);
                }
            }

            return result;
        }

        var chain = Run(W, 0, (float[])pk.Clone(), (float[])pv.Clone());
        var (kS, vS) = ((float[])pk.Clone(), (float[])pv.Clone());
        int same = 0, differ = 0;
        double max = 0;
        for (int i = 0; i < W; i++)
        {
            var one = Run(1, i, kS, vS);
            for (int j = 0; j < h * d; j++)
            {
                float a = chain[(i * h * d) + j], b = one[j];
                if (BitConverter.SingleToInt32Bits(a) == BitConverter.SingleToInt32Bits(b))
                {
                    same++;
                }
                else
                {
                    differ++;
                    max = Math.Max(max, Math.Abs(a - b));
                }
            }
        }

        return (gqa ? "GroupQueryAttention" : "joined (today)", same, differ, max);
    }

    private static void Write(string dir, BenchStamp stamp, string model, ModelConfig c, int reps, List<Row> rows, (string Form, int Same, int Differ, double MaxDiff)[] identity, (int Cap, int Fill) idCell)
    {
        Directory.CreateDirectory(dir);
        string stem = ReportStem.For("attention", model);
        var md = new StringBuilder();
        md.AppendLine("# Attention alone: joined caches against GroupQueryAttention (`coordgen bench attention`)").AppendLine();
        md.AppendLine(stamp.ToMarkdown()).AppendLine();
        md.AppendLine(CultureInfo.InvariantCulture, $"Model `{model}`: {c.NumLayers} attention layers of {c.NumHeads} query heads and {c.NumKvHeads} KV heads of {c.HeadDim}, nothing else (no projections, norms or head), float32, random values. **Joined**: today's graphs (each slot's cache its own input, joined per layer for a packed run, every row scored against the whole capacity, masked, and against the step's own columns). **GQA**: ONNX Runtime's `com.microsoft.GroupQueryAttention` over one buffer per layer [slots, KV heads, capacity, head dim] bound as both past and present, so the step's keys and values are written in place and each slot is scored over its own length only. The two forms run in turn, run by run; {reps} timed runs each, median ms per step.").AppendLine();
        md.AppendLine("| capacity | fill | slots | width | joined ms | GQA ms | joined / GQA |").AppendLine("|---|---|---|---|---|---|---|");
        foreach (var r in rows)
        {
            string gqa = r.GqaMs is { } g
                ? string.Create(CultureInfo.InvariantCulture, $"{g:F2} | {r.JoinedMs / g:F2}x")
                : $"refused: {r.GqaRefused} |";
            md.AppendLine(CultureInfo.InvariantCulture, $"| {r.Capacity} | {r.Fill} | {r.Slots} | {r.Width} | {r.JoinedMs:F2} | {gqa} |");
        }

        md.AppendLine();
        md.AppendLine(CultureInfo.InvariantCulture, $"**Rows of a chain against single steps** (one layer, one slot, capacity {idCell.Cap}, fill {idCell.Fill}): a chain of 4 rows in one run against 4 runs of one row, each after the previous row's key and value were committed; output values compared bit for bit. Lossless speculation on quantized weights does not rely on either: it sums attention in float64 (decision 0025).").AppendLine();
        md.AppendLine("| form | values identical | values that differ | largest difference |").AppendLine("|---|---|---|---|");
        foreach (var (form, same, differ, max) in identity)
        {
            md.AppendLine(CultureInfo.InvariantCulture, $"| {form} | {same} | {differ} | {max:E2} |");
        }

        File.WriteAllText(Path.Combine(dir, stem + ".md"), md.ToString());
        File.WriteAllText(Path.Combine(dir, stem + ".json"), JsonSerializer.Serialize(new
        {
            stamp,
            model,
            repeats = reps,
            rows = rows.Select(r => new { capacity = r.Capacity, fill = r.Fill, slots = r.Slots, width = r.Width, joined_ms = Math.Round(r.JoinedMs, 3), gqa_ms = r.GqaMs is { } g ? Math.Round(g, 3) : (double?)null, gqa_refused = r.GqaRefused }),
            identity = identity.Select(i => new { form = i.Form, identical = i.Same, differ = i.Differ, max_difference = i.MaxDiff }),
        }, new JsonSerializerOptions { WriteIndented = true }));
        ConsoleUi.Err.MarkupLineInterpolated($"[green]wrote {dir}/{stem}.md[/]");
        Console.WriteLine(md.ToString());
    }
}
