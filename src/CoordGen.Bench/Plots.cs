using CoordGen.Host.Commands;
using ScottPlot;

namespace CoordGen.Host;

/// <summary>PNG plots for benchmark reports (ScottPlot).</summary>
internal static class Plots
{
    public static void AcceptPlot(List<AcceptRow> rows, string path)
    {
        var tasks = rows.Select(r => r.Task).Distinct().ToList();
        var formats = rows.Select(r => r.Weights).Distinct().ToList();
        var methods = BenchAccept.AllMethods.Where(m => rows.Any(r => r.Method == m))
            .SelectMany(m => formats.Select(f => (Method: m, Weights: f))).ToList();
        var multi = new Multiplot();
        multi.AddPlots(tasks.Count);
        var palette = new ScottPlot.Palettes.Category10();
        for (int ti = 0; ti < tasks.Count; ti++)
        {
            var plot = multi.GetPlot(ti);
            string task = tasks[ti];
            for (int mi = 0; mi < methods.Count; mi++)
            {
                var pts = rows.Where(r => r.Task == task && r.Method == methods[mi].Method && r.Weights == methods[mi].Weights).OrderBy(r => r.Width).ToList();
                if (pts.Count == 0)
                {
                    continue;
                }

                var sc = plot.Add.Scatter(pts.Select(p => Math.Log2(p.Width)).ToArray(), pts.Select(p => p.Speedup).ToArray());
                sc.LegendText = formats.Count > 1 ? $"{methods[mi].Method} ({methods[mi].Weights})" : methods[mi].Method;
                sc.Color = palette.GetColor(mi);
                sc.LineWidth = 2;
                sc.MarkerSize = 6;
            }

            plot.Title($"{task}: decode speedup over ar");
            plot.Axes.Bottom.Label.Text = "verification width (log2)";
            plot.Axes.Left.Label.Text = "speedup (x)";
            plot.ShowLegend(Alignment.UpperLeft);
        }

        multi.Layout = new ScottPlot.MultiplotLayouts.Grid(rows: (tasks.Count + 1) / 2, columns: Math.Min(2, tasks.Count));
        multi.SavePng(path, 1200, 420 * ((tasks.Count + 1) / 2));
    }

    /// <summary>A histogram of values (for example recovery times), 30 bins.</summary>
    public static void Histogram(IReadOnlyList<double> values, string xLabel, string title, string path)
    {
        var plot = new Plot();
        if (values.Count > 0)
        {
            var hist = ScottPlot.Statistics.Histogram.WithBinCount(30, values.Min(), values.Max() + 1e-9);
            hist.AddRange(values);
            var bars = plot.Add.Bars(hist.Bins, hist.Counts);
            foreach (var b in bars.Bars)
            {
                b.Size = hist.FirstBinSize * 0.9;
            }
        }

        plot.Title(title);
        plot.Axes.Bottom.Label.Text = xLabel;
        plot.Axes.Left.Label.Text = "count";
        plot.SavePng(path, 900, 500);
    }

    /// <summary>Soak: memory (top) and latency (bottom) against time.</summary>
    public static void Soak(IReadOnlyList<SoakSample> samples, string path)
    {
        var multi = new Multiplot();
        multi.AddPlots(2);
        double[] t = [.. samples.Select(s => s.TimeS / 60)];
        var mem = multi.GetPlot(0);
        mem.Add.Scatter(t, samples.Select(s => s.RssMb).ToArray()).LegendText = "RSS (MB)";
        mem.Add.Scatter(t, samples.Select(s => s.ManagedMb).ToArray()).LegendText = "managed heap (MB)";
        mem.Title("memory");
        mem.Axes.Left.Label.Text = "MB";
        mem.ShowLegend(Alignment.MiddleRight);
        var lat = multi.GetPlot(1);
        lat.Add.Scatter(t, samples.Select(s => s.LatencyP50Ms).ToArray()).LegendText = "p50";
        lat.Add.Scatter(t, samples.Select(s => s.LatencyP99Ms).ToArray()).LegendText = "p99";
        lat.Title("request latency");
        lat.Axes.Left.Label.Text = "ms";
        lat.Axes.Bottom.Label.Text = "minutes";
        lat.ShowLegend(Alignment.MiddleRight);
        multi.SavePng(path, 900, 700);
    }

    /// <summary>Graph strategies: stacked ttft and first step (left), peak memory (right).</summary>
    public static void Graphs(IReadOnlyList<GraphsRow> rows, string path, string? banner = null)
    {
        bool second = rows.Any(r => r.SecondTtftMs is not null);
        var multi = new Multiplot();
        multi.AddPlots(second ? 3 : 2);
        var lat = multi.GetPlot(0);
        var mem = multi.GetPlot(1);
        var next = second ? multi.GetPlot(2) : null;
        var palette = new ScottPlot.Palettes.Category10();
        var ticks = new List<Tick>();
        for (int i = 0; i < rows.Count; i++)
        {
            var r = rows[i];
            lat.Add.Bar(new Bar { Position = i, ValueBase = 0, Value = r.TtftMs, FillColor = palette.GetColor(0) });
            lat.Add.Bar(new Bar { Position = i, ValueBase = r.TtftMs, Value = r.TtftMs + r.FirstStepMs, FillColor = palette.GetColor(1) });
            mem.Add.Bar(new Bar { Position = i, Value = r.PeakMb, FillColor = palette.GetColor(2) });
            if (next is not null)
            {
                double t2 = r.SecondTtftMs ?? 0;
                next.Add.Bar(new Bar { Position = i, ValueBase = 0, Value = t2, FillColor = palette.GetColor(0) });
                next.Add.Bar(new Bar { Position = i, ValueBase = t2, Value = t2 + (r.SecondFirstStepMs ?? 0), FillColor = palette.GetColor(1) });
            }

            ticks.Add(new Tick(i, r.Strategy));
        }

        foreach (var plot in next is null ? new[] { lat, mem } : new[] { lat, mem, next })
        {
            plot.Axes.Bottom.TickGenerator = new ScottPlot.TickGenerators.NumericManual([.. ticks]);
            plot.Axes.Margins(bottom: 0);
        }

        lat.Title(banner is null ? "TTFT (blue) + first verification step (orange)" : $"{banner}: TTFT + first step");
        next?.Title("next request (wide graph back): TTFT + first step");
        next?.Axes.Left.Label.Text = "ms";
        lat.Axes.Left.Label.Text = "ms";
        mem.Title("peak memory");
        mem.Axes.Left.Label.Text = "MB";
        multi.Layout = new ScottPlot.MultiplotLayouts.Columns();
        multi.SavePng(path, second ? 1500 : 1100, 450);
    }

    /// <summary>Grouped bars: one group per task, one bar per setting.</summary>
    public static void PaperTable(IReadOnlyList<PaperRow> rows, IReadOnlyList<string> settings, string[] tasks, Func<PaperRow, double> value, string yLabel, string title, string path)
    {
        var plot = new Plot();
        var palette = new ScottPlot.Palettes.Category10();
        double groupWidth = settings.Count + 1;
        for (int si = 0; si < settings.Count; si++)
        {
            var bars = new List<Bar>();
            for (int ti = 0; ti < tasks.Length; ti++)
            {
                if (rows.FirstOrDefault(r => r.Setting == settings[si] && r.Task == tasks[ti]) is { } r)
                {
                    bars.Add(new Bar { Position = (ti * groupWidth) + si, Value = value(r), FillColor = palette.GetColor(si) });
                }
            }

            var series = plot.Add.Bars(bars);
            series.LegendText = settings[si];
        }

        plot.Axes.Bottom.TickGenerator = new ScottPlot.TickGenerators.NumericManual(
            [.. tasks.Select((t, i) => new Tick((i * groupWidth) + ((settings.Count - 1) / 2.0), t))]);
        plot.Axes.Margins(bottom: 0);
        plot.Title(title);
        plot.Axes.Left.Label.Text = yLabel;
        plot.ShowLegend(Alignment.UpperRight);
        plot.SavePng(path, 1000, 500);
    }

    /// <summary>Aggregate tokens/s against concurrent sessions, per mode.</summary>
    public static void Sessions(IReadOnlyList<SessionsRow> rows, string path)
    {
        var plot = new Plot();
        bool both = rows.Select(r => r.Packed).Distinct().Count() > 1;
        bool bothCaches = rows.Select(r => r.PrefixCache).Distinct().Count() > 1;
        bool bothMixes = rows.Where(r => r.Packed).Select(r => r.MixedSteps).Distinct().Count() > 1;
        foreach (var (mode, packed, mixed, cache, budget) in rows.Select(r => (r.Mode, r.Packed, r.MixedSteps, r.PrefixCache, r.WidthBudget)).Distinct())
        {
            var pts = rows.Where(r => r.Mode == mode && r.Packed == packed && r.MixedSteps == mixed && r.PrefixCache == cache && r.WidthBudget == budget).OrderBy(r => r.Sessions).ToList();
            var sc = plot.Add.Scatter(pts.Select(p => (double)p.Sessions).ToArray(), pts.Select(p => p.AggregateTokensPerS).ToArray());
            sc.LegendText = BenchSessions.Label(pts[0]) + (both ? $" ({(packed ? bothMixes ? mixed ? "packed, mixed" : "packed, chunks alone" : "packed" : "one per run")})" : bothMixes ? (mixed ? " (mixed)" : " (chunks alone)") : "") + (bothCaches ? (cache ? ", prefix cache" : ", no prefix cache") : "");
            sc.LineWidth = 2;
            sc.MarkerSize = 7;
        }

        plot.Title("aggregate decode throughput under concurrent sessions");
        plot.Axes.Bottom.Label.Text = "concurrent sessions";
        plot.Axes.Left.Label.Text = "tokens/s (all sessions)";
        plot.Axes.Margins(bottom: 0);
        plot.ShowLegend(Alignment.LowerRight);
        plot.SavePng(path, 900, 500);
    }

    /// <summary>Tokens per device-second against sessions, one session per run and packed, with min-max whiskers.</summary>
    public static void Packed(IReadOnlyList<PackedRow> rows, string path)
    {
        var plot = new Plot();
        foreach (bool packed in new[] { false, true })
        {
            var pts = rows.Where(r => r.Packed == packed).OrderBy(r => r.Sessions).ToList();
            double[] xs = [.. pts.Select(p => (double)p.Sessions)];
            var sc = plot.Add.Scatter(xs, pts.Select(p => p.TokensPerDeviceSecond).ToArray());
            sc.LegendText = packed ? "packed: one run for all sessions" : "one session per run";
            sc.LineWidth = 2;
            sc.MarkerSize = 7;
            foreach (var spread in new[] { pts.Select(p => p.Min), pts.Select(p => p.Max) })
            {
                var marks = plot.Add.ScatterPoints(xs, [.. spread]);
                marks.Color = sc.Color;
                marks.MarkerShape = MarkerShape.HorizontalBar;
                marks.MarkerSize = 12;
            }
        }

        plot.Title("plain decoding of concurrent sessions: tokens per device-second (bars: min, max)");
        plot.Axes.Bottom.Label.Text = "concurrent sessions";
        plot.Axes.Left.Label.Text = "tokens per device-second (all sessions)";
        plot.Axes.Margins(bottom: 0);
        plot.ShowLegend(Alignment.UpperLeft);
        plot.SavePng(path, 900, 500);
    }

    /// <summary>Per-actor timeline: device steps, verifier steps and prepared drafts as bars over time (a window of the run).</summary>
    public static void Timeline(IReadOnlyList<(double Start, double End)> device, IReadOnlyList<(double Start, double End)> drafts, IReadOnlyList<(double Start, double End)> verifies, string path)
    {
        var plot = new Plot();
        // A readable window: 20 ms around the middle verification (decode steps; the middle device step
        // may fall in a run of prefill chunks).
        var anchor = verifies.Count > 0 ? verifies : device;
        double mid = anchor.Count == 0 ? 0 : anchor[anchor.Count / 2].Start, from = mid - 10, to = mid + 10;
        var palette = new ScottPlot.Palettes.Category10();
        foreach (var (row, spans, color, label) in new[] { (2.0, device, palette.GetColor(0), "device actor: step"), (1.0, verifies, palette.GetColor(2), "verifier actor: acceptance"), (0.0, drafts, palette.GetColor(1), "drafter actor: draft") })
        {
            bool first = true;
            foreach (var (s, e) in spans.Where(x => x.End >= from && x.Start <= to))
            {
                // Acceptance takes microseconds: drawn at least 0.1 ms wide, or it would not show.
                var r = plot.Add.Rectangle(Math.Max(s, from), Math.Min(Math.Max(e, s + 0.1), to), row - 0.35, row + 0.35);
                r.FillColor = color;
                r.LineWidth = 0;
                if (first)
                {
                    r.LegendText = label;
                    first = false;
                }
            }
        }

        plot.Axes.SetLimits(from, to, -0.8, 3.0);
        plot.Axes.Left.TickGenerator = new ScottPlot.TickGenerators.NumericManual([new Tick(2, "device"), new Tick(1, "verifier"), new Tick(0, "drafter")]);
        plot.Title("per-actor timeline (20 ms window; bars at least 0.1 ms wide)");
        plot.Axes.Bottom.Label.Text = "ms since start";
        plot.ShowLegend(Alignment.UpperRight);
        plot.SavePng(path, 1100, 380);
    }

    /// <summary>Each stream's inter-token gaps over time, with the newcomer's prefill (time 0 to its first token) shaded.</summary>
    public static void Rebalance(IReadOnlyList<List<(double At, double Ms)>> streams, double prefillEndMs, double newcomerEndMs, string path)
    {
        var plot = new Plot();
        var shade = plot.Add.HorizontalSpan(0, prefillEndMs);
        shade.FillColor = Colors.Orange.WithAlpha(0.2);
        shade.LegendText = "newcomer prefilling";
        if (newcomerEndMs > prefillEndMs)
        {
            var decoding = plot.Add.HorizontalSpan(prefillEndMs, newcomerEndMs);
            decoding.FillColor = Colors.Green.WithAlpha(0.15);
            decoding.LegendText = "newcomer decoding";
        }

        var palette = new ScottPlot.Palettes.Category10();
        for (int i = 0; i < streams.Count; i++)
        {
            var sc = plot.Add.Scatter(streams[i].Select(g => g.At).ToArray(), streams[i].Select(g => g.Ms).ToArray());
            sc.Color = palette.GetColor(i);
            sc.LineWidth = 1;
            sc.MarkerSize = 3;
            sc.LegendText = $"stream {i}";
        }

        plot.Title("inter-token gaps of the running streams");
        plot.Axes.Bottom.Label.Text = "ms since the long prompt arrived";
        plot.Axes.Left.Label.Text = "gap (ms)";
        plot.ShowLegend(Alignment.UpperRight);
        plot.SavePng(path, 1100, 420);
    }
}
