using System.CommandLine;
using System.Globalization;
using System.Text;
using System.Text.Json;
using CoordGen.Engine;
using CoordGen.Engine.Generation;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Workloads;
using Spectre.Console;

namespace CoordGen.Host.Commands;

/// <summary>
/// <c>coordgen model evaluate</c>: greedy outputs on held-out workloads, the share of output token
/// 4-grams that occur in the context (copying with drift), and one sample per task, for model cards.
/// </summary>
internal static class ModelEvaluate
{
    public static Command Create()
    {
        var model = CommonOptions.Model();
        var workloads = new Option<string[]>("--workload", "-w") { Description = "Workload JSONL file(s). Default: workloads/{summary,rag,ui,reply}.jsonl.", AllowMultipleArgumentsPerToken = true };
        var limit = new Option<int>("--limit") { Description = "Prompts per workload (0 = all).", DefaultValueFactory = _ => 0 };
        var output = new Option<FileInfo?>("--out") { Description = "Markdown report (default: <model>/evaluation.md); JSON is written beside it.", HelpName = "FILE.md" };
        var cmd = new Command("evaluate", "Greedy outputs on held-out workloads: share of output 4-grams found in the context per task (copying with drift), and a sample per task.")
        {
            model, workloads, limit, output,
        };
        cmd.SetAction(parse =>
        {
            string root = ModelLocator.RepoRoot();
            var files = parse.GetValue(workloads) is { Length: > 0 } given ? given.ToList()
                : new[] { "summary", "rag", "ui", "reply" }.Select(t => Path.Combine(root, "workloads", t + ".jsonl")).ToList();
            string dir = ModelLocator.Resolve(parse.GetValue(model));
            var bundle = ConsoleUi.LoadModel(dir);
            using var rt = ConsoleUi.Status("compiling graphs", () => new OrtModelRuntime(bundle.Weights, 2048, [1, 64]));
            var gen = new Generator(rt);
            var results = new List<TaskResult>();
            AnsiConsole.Progress().Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn()).Start(ctx =>
            {
                foreach (var f in files)
                {
                    var items = WorkloadItem.Load(f);
                    if (parse.GetValue(limit) > 0)
                    {
                        items = items.Take(parse.GetValue(limit)).ToList();
                    }

                    var bar = ctx.AddTask(Path.GetFileNameWithoutExtension(f), maxValue: items.Count);
                    long found = 0, total = 0, tokens = 0, stopped = 0;
                    var perPrompt = new List<double>();
                    string? sample = null, samplePrompt = null, sampleContext = null;
                    foreach (var item in items)
                    {
                        int[] ctxIds = bundle.Tokenizer.Encode(item.Context);
                        int[] prompt = bundle.Tokenizer.Encode(PromptTemplate.Render(item.Context, item.Prompt, bundle.HasRoleTokens));
                        var r = gen.Generate(prompt, item.MaxTokens, new SamplingOptions(), bundle.StopTokens);
                        var (f4, t4) = CopyShare(ctxIds, r.Tokens);
                        found += f4;
                        total += t4;
                        tokens += r.Tokens.Count;
                        stopped += r.Stats.StopReason == "stop" ? 1 : 0;
                        if (t4 > 0)
                        {
                            perPrompt.Add((double)f4 / t4);
                        }

                        if (sample is null)
                        {
                            sample = bundle.Tokenizer.Decode(r.Tokens);
                            samplePrompt = item.Prompt;
                            sampleContext = item.Context;
                        }

                        bar.Increment(1);
                    }

                    perPrompt.Sort();
                    results.Add(new TaskResult(items.FirstOrDefault()?.Task ?? Path.GetFileNameWithoutExtension(f), items.Count, total == 0 ? 0 : (double)found / total,
                        perPrompt.Count == 0 ? 0 : perPrompt[perPrompt.Count / 2], (double)tokens / Math.Max(1, items.Count), (double)stopped / Math.Max(1, items.Count),
                        sampleContext ?? "", samplePrompt ?? "", sample ?? ""));
                }
            });

            var t = new Table().AddColumns("task", "prompts", "4-grams in context", "median per prompt", "mean output tokens", "ended with <|end|>");
            foreach (var r in results)
            {
                t.AddRow(r.Task, r.Prompts.ToString(CultureInfo.InvariantCulture), r.CopyShare.ToString("P1", CultureInfo.InvariantCulture),
                    r.MedianCopyShare.ToString("P1", CultureInfo.InvariantCulture), r.MeanTokens.ToString("F1", CultureInfo.InvariantCulture), r.StoppedShare.ToString("P0", CultureInfo.InvariantCulture));
            }

            AnsiConsole.Write(t);
            string md = parse.GetValue(output)?.FullName ?? Path.Combine(dir, "evaluation.md");
            Write(md, results, bundle.Name, parse.GetValue(limit));
            ConsoleUi.Err.MarkupLineInterpolated($"[grey]wrote {md} and {Path.ChangeExtension(md, ".json")}[/]");
            return 0;
        });
        return cmd;
    }

    internal sealed record TaskResult(string Task, int Prompts, double CopyShare, double MedianCopyShare, double MeanTokens, double StoppedShare, string SampleContext, string SamplePrompt, string Sample);

    /// <summary>Output token 4-grams that occur anywhere in the context, and the number of output 4-grams.</summary>
    internal static (long Found, long Total) CopyShare(IReadOnlyList<int> context, IReadOnlyList<int> output)
    {
        var grams = new HashSet<(int, int, int, int)>();
        for (int i = 0; i + 3 < context.Count; i++)
        {
            grams.Add((context[i], context[i + 1], context[i + 2], context[i + 3]));
        }

        long found = 0, total = 0;
        for (int i = 0; i + 3 < output.Count; i++)
        {
            total++;
            if (grams.Contains((output[i], output[i + 1], output[i + 2], output[i + 3])))
            {
                found++;
            }
        }

        return (found, total);
    }

    private static void Write(string path, List<TaskResult> results, string model, int limit)
    {
        var stamp = BenchStamp.Capture();
        var sb = new StringBuilder();
        sb.AppendLine(CultureInfo.InvariantCulture, $"# Held-out evaluation: {model}");
        sb.AppendLine();
        sb.AppendLine(stamp.ToMarkdown());
        sb.AppendLine(CultureInfo.InvariantCulture, $"Command: `coordgen model evaluate{(limit > 0 ? $" --limit {limit}" : "")}`. Greedy decoding on workloads/*.jsonl (held-out documents, never trained on).");
        sb.AppendLine();
        sb.AppendLine("Copy share: the share of the output's token 4-grams that occur anywhere in the context (pooled over prompts; the median per prompt beside it).");
        sb.AppendLine();
        sb.AppendLine("| task | prompts | 4-grams in context | median per prompt | mean output tokens | ended with `<|end|>` |");
        sb.AppendLine("|---|---|---|---|---|---|");
        foreach (var r in results)
        {
            sb.AppendLine(CultureInfo.InvariantCulture, $"| {r.Task} | {r.Prompts} | {r.CopyShare:P1} | {r.MedianCopyShare:P1} | {r.MeanTokens:F1} | {r.StoppedShare:P0} |");
        }

        sb.AppendLine();
        sb.AppendLine("## Greedy samples (first prompt of each workload)");
        foreach (var r in results)
        {
            string ctx = r.SampleContext.Length > 700 ? r.SampleContext[..700] + " [...]" : r.SampleContext;
            sb.AppendLine();
            sb.AppendLine(CultureInfo.InvariantCulture, $"### {r.Task}");
            sb.AppendLine();
            sb.AppendLine("Context (truncated):");
            sb.AppendLine();
            sb.AppendLine("```text");
            sb.AppendLine(ctx);
            sb.AppendLine("```");
            sb.AppendLine();
            sb.AppendLine(CultureInfo.InvariantCulture, $"Prompt: {r.SamplePrompt}");
            sb.AppendLine();
            sb.AppendLine("Output:");
            sb.AppendLine();
            sb.AppendLine("```text");
            sb.AppendLine(r.Sample);
            sb.AppendLine("```");
        }

        File.WriteAllText(path, sb.ToString());
        File.WriteAllText(Path.ChangeExtension(path, ".json"), JsonSerializer.Serialize(new
        {
            stamp,
            model,
            tasks = results.Select(r => new { task = r.Task, prompts = r.Prompts, copy_share = r.CopyShare, median_copy_share = r.MedianCopyShare, mean_tokens = r.MeanTokens, ended_share = r.StoppedShare }),
        }, new JsonSerializerOptions { WriteIndented = true }));
    }
}
