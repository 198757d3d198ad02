using System.CommandLine;
using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Json.Serialization;
using CoordGen.Engine;
using CoordGen.Engine.Generation;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Speculative;
using CoordGen.Engine.Workloads;
using Spectre.Console;

namespace CoordGen.Host.Commands;

/// <summary>One cell group of <c>coordgen bench paper</c>: a setting on a task.</summary>
internal sealed record PaperRow
{
    [JsonPropertyName("table")] public required int Table { get; init; }
    [JsonPropertyName("setting")] public required string Setting { get; init; }
    [JsonPropertyName("task")] public required string Task { get; init; }
    [JsonPropertyName("ms_per_token")] public double MsPerToken { get; init; }
    [JsonPropertyName("acceptance")] public double Acceptance { get; init; }
    [JsonPropertyName("identical_to_plain")] public bool IdenticalToPlain { get; init; }
    [JsonPropertyName("tokens")] public long Tokens { get; init; }
}

/// <summary>
/// <c>coordgen bench paper</c>: the layouts of the paper's Table 3 (decode ms per token: plain, +G,
/// +SD, +G+SD, +G+SD with calibration and reuse) and Table 4 (acceptance ratios of PLD and SAM with
/// and without our additions) on coordgen-demo and the held-out workloads, side by side in one process.
/// </summary>
internal static class BenchPaper
{
    // Table 3: (label, method, verification width). "G" = decode on the narrow graph instead of the
    // prefill graph; without G every decode step runs the wide prefill graph, as an NPU that keeps one
    // graph for both phases must.
    private static readonly (string Label, string Method, bool Narrow)[] Table3 =
    [
        ("plain", "ar", false),
        ("+G", "ar", true),
        ("+SD", "sam", false),
        ("+G+SD", "sam", true),
        ("+G+SD+C+R (ours)", "sam+ours", true),
    ];

    private static readonly string[] Table4 = ["pld", "pld+ours", "sam", "sam+ours"];

    public static Command Create()
    {
        var model = CommonOptions.Model();
        var limit = new Option<int>("--limit") { Description = "Prompts per task.", DefaultValueFactory = _ => 12 };
        var wide = new Option<int>("--wide") { Description = "Prefill graph width (the single graph of the settings without G).", DefaultValueFactory = _ => 64 };
        var narrow = new Option<int>("--narrow") { Description = "Verification width of the narrow graph (with G).", DefaultValueFactory = _ => 8 };
        var json = new Option<FileInfo?>("--json") { Description = "Write the rows as JSON here too.", HelpName = "OUT.json" };
        var outDir = new Option<DirectoryInfo?>("--out") { Description = "Report folder (default docs/bench/ of the checkout).", HelpName = "DIR" };
        var cmd = new Command("paper", "Reproduces the layouts of the paper's Table 3 (ms per token: plain, +G, +SD, +G+SD, +calibration and reuse) and Table 4 (acceptance ratios of PLD and SAM with and without our additions) on the demo model and workloads, with plots.")
        {
            model, limit, wide, narrow, json, outDir,
        };
        cmd.SetAction(parse =>
        {
            int n = parse.GetValue(limit), g1 = parse.GetValue(wide), g2 = parse.GetValue(narrow);
            if (n < 1 || g2 < 2 || g1 < g2)
            {
                throw new ArgumentException("--limit must be positive and --wide at least --narrow (at least 2).");
            }

            var stamp = BenchStamp.Capture();
            var bundle = ConsoleUi.LoadModel(ModelLocator.Resolve(parse.GetValue(model)));
            using var rt = ConsoleUi.Status("compiling graphs", () =>
            {
                var r = new OrtModelRuntime(bundle.Weights, 2048, [1, g2, g1]);
                r.CompileAll();
                return r;
            });
            var spec = new SpeculativeDecoder(rt);
            var plainNarrow = new Generator(rt, 1);
            var plainWide = new Generator(rt, g1);
            var greedy = new SamplingOptions();
            var rows = new List<PaperRow>();
            string root = ModelLocator.RepoRoot();
            AnsiConsole.Progress().Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new ElapsedTimeColumn()).Start(ctx =>
            {
                foreach (string task in new[] { "summary", "rag", "ui", "reply" })
                {
                    var items = WorkloadItem.Load(Path.Combine(root, "workloads", task + ".jsonl")).Take(n).ToList();
                    var bar = ctx.AddTask($"{task} ({items.Count} prompts)", maxValue: items.Count);
                    var acc = new Dictionary<string, (double Ms, long Tokens, long Steps, bool Same)>();
                    void Add(string key, double ms, long tokens, long steps, bool same)
                    {
                        var a = acc.GetValueOrDefault(key, (0, 0, 0, true));
                        acc[key] = (a.Ms + ms, a.Tokens + tokens, a.Steps + steps, a.Same && same);
                    }

                    foreach (var item in items)
                    {
                        int[] prompt = bundle.Tokenizer.Encode(PromptTemplate.Render(item.Context, item.Prompt, bundle.HasRoleTokens));
                        using var pre = spec.Prefill(prompt, new CalibrationOptions());
                        GenerationResult Plain(Generator g)
                        {
                            using var cache = rt.CreateCache();
                            cache.CopyFrom(pre.Cache);
                            return g.Decode(cache, pre.LastLogits, prompt.Length, pre.PrefillMs, item.MaxTokens, greedy, bundle.StopTokens);
                        }

                        var reference = Plain(plainNarrow);
                        var wideAr = Plain(plainWide);
                        Add("3|plain", wideAr.Stats.DecodeMs, wideAr.Tokens.Count, wideAr.Tokens.Count, wideAr.Tokens.SequenceEqual(reference.Tokens));
                        Add("3|+G", reference.Stats.DecodeMs, reference.Tokens.Count, reference.Tokens.Count, true);
                        foreach (var (label, method, isNarrow) in Table3.Where(t => t.Method != "ar"))
                        {
                            var r = spec.Generate(pre, item.MaxTokens, greedy, bundle.StopTokens, SpeculationOptions.ForMethod(method, isNarrow ? g2 : g1));
                            Add("3|" + label, r.Stats.DecodeMs, r.Tokens.Count, r.Accounting.Steps, r.Tokens.SequenceEqual(reference.Tokens));
                        }

                        foreach (string method in Table4)
                        {
                            var r = spec.Generate(pre, item.MaxTokens, greedy, bundle.StopTokens, SpeculationOptions.ForMethod(method, g2));
                            Add("4|" + method, r.Stats.DecodeMs, r.Tokens.Count, r.Accounting.Steps, r.Tokens.SequenceEqual(reference.Tokens));
                        }

                        bar.Increment(1);
                    }

                    foreach (var (key, a) in acc)
                    {
                        var parts = key.Split('|');
                        rows.Add(new PaperRow
                        {
                            Table = int.Parse(parts[0], CultureInfo.InvariantCulture),
                            Setting = parts[1],
                            Task = task,
                            MsPerToken = Math.Round(a.Ms / Math.Max(1, a.Tokens), 3),
                            Acceptance = Math.Round((double)a.Tokens / Math.Max(1, a.Steps), 3),
                            IdenticalToPlain = a.Same,
                            Tokens = a.Tokens,
                        });
                    }
                }
            });
            Write(rows, stamp, n, g1, g2, parse.GetValue(outDir)?.FullName ?? Path.Combine(root, "docs", "bench"), parse.GetValue(json), bundle.Name);
            return rows.All(r => r.IdenticalToPlain) ? 0 : 1;
        });
        return cmd;
    }

    private static void Write(List<PaperRow> rows, BenchStamp stamp, int n, int g1, int g2, string dir, FileInfo? json, string model)
    {
        Directory.CreateDirectory(dir);
        string stem = ReportStem.For("paper", model);
        string text = JsonSerializer.Serialize(rows, new JsonSerializerOptions { WriteIndented = true });
        File.WriteAllText(Path.Combine(dir, stem + ".json"), text);
        if (json is not null)
        {
            File.WriteAllText(json.FullName, text);
        }

        string[] tasks = ["summary", "rag", "ui", "reply"];
        Plots.PaperTable(rows.Where(r => r.Table == 3).ToList(), [.. Table3.Select(t => t.Label)], tasks, r => r.MsPerToken, "decode ms per token (lower is better)", "Table 3 layout: ms per token", Path.Combine(dir, stem + "-table3.png"));
        Plots.PaperTable(rows.Where(r => r.Table == 4).ToList(), Table4, tasks, r => r.Acceptance, "tokens per verification step", "Table 4 layout: acceptance ratio", Path.Combine(dir, stem + "-table4.png"));
        var md = new StringBuilder();
        md.AppendLine(CultureInfo.InvariantCulture, $"# The paper's tables on {model} (`coordgen bench paper`)").AppendLine();
        md.AppendLine(stamp.ToMarkdown()).AppendLine();
        md.AppendLine(CultureInfo.InvariantCulture, $"First {n} held-out prompts per task, greedy, every setting decoding from the same prefill in one process; CPU execution provider. Wide graph W = {g1}, narrow verification graph W = {g2} (plain decoding without G runs its one token per step on the wide graph, as a single NPU graph for both phases would; with G it runs the width-1 graph; the switch itself is the subject of `bench graphs`).").AppendLine();
        md.AppendLine("## Table 3 layout: decode ms per token").AppendLine();
        Table(md, rows.Where(r => r.Table == 3).ToList(), [.. Table3.Select(t => t.Label)], tasks, r => r.MsPerToken.ToString("F3", CultureInfo.InvariantCulture));
        md.AppendLine().AppendLine(CultureInfo.InvariantCulture, $"![table 3]({stem}-table3.png)").AppendLine();
        md.AppendLine(CultureInfo.InvariantCulture, $"## Table 4 layout: acceptance ratio (tokens per verification step, W = {g2})").AppendLine();
        Table(md, rows.Where(r => r.Table == 4).ToList(), Table4, tasks, r => r.Acceptance.ToString("F2", CultureInfo.InvariantCulture));
        md.AppendLine().AppendLine(CultureInfo.InvariantCulture, $"![table 4]({stem}-table4.png)").AppendLine();
        md.AppendLine(CultureInfo.InvariantCulture, $"Every setting's greedy output equals plain greedy decoding token for token: {(rows.All(r => r.IdenticalToPlain) ? "yes" : "NO")}.");
        File.WriteAllText(Path.Combine(dir, stem + ".md"), md.ToString());
        ConsoleUi.Err.MarkupLineInterpolated($"[green]wrote {dir}/{stem}.md[/]");
    }

    private static void Table(StringBuilder md, List<PaperRow> rows, IReadOnlyList<string> settings, string[] tasks, Func<PaperRow, string> cell)
    {
        md.AppendLine("| setting | " + string.Join(" | ", tasks) + " |");
        md.AppendLine("|---|" + string.Concat(tasks.Select(_ => "---|")));
        foreach (string s in settings)
        {
            md.AppendLine($"| {s} | " + string.Join(" | ", tasks.Select(t => rows.FirstOrDefault(r => r.Setting == s && r.Task == t) is { } r ? cell(r) : "-")) + " |");
        }
    }
}
