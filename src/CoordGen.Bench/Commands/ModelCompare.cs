using System.CommandLine;
using System.Globalization;
using System.Text;
using System.Text.Json;
using CoordGen.Engine;
using CoordGen.Engine.Evaluation;
using CoordGen.Engine.Generation;
using CoordGen.Engine.Model;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Workloads;
using Spectre.Console;

namespace CoordGen.Host.Commands;

/// <summary>
/// <c>coordgen model compare</c>: does a model reproduce a reference model's greedy output on the
/// workloads? For a twin (<c>model inflate</c>) against its source; the report is
/// docs/bench/fidelity-&lt;model&gt;.md/.json.
/// </summary>
internal static class ModelCompare
{
    public static Command Create()
    {
        var model = CommonOptions.Model();
        var reference = new Option<string?>("--reference") { Description = "The reference model directory, always run in float32 (default: the same model when --weights is not f32, else the embedded models/coordgen-demo).", HelpName = "DIR" };
        var weights = CommonOptions.Weights();
        var workloads = new Option<string[]>("--workload", "-w") { Description = "Workload JSONL file(s). Default: workloads/{summary,rag,ui,reply}.jsonl (240 prompts).", AllowMultipleArgumentsPerToken = true };
        var limit = new Option<int>("--limit") { Description = "Prompts per workload (0 = all).", DefaultValueFactory = _ => 0 };
        var outDir = new Option<DirectoryInfo?>("--out") { Description = "Where to write the report (default: docs/bench/ of the checkout).", HelpName = "DIR" };
        var cmd = new Command("compare", "Check that a model reproduces a reference model's greedy output on the workloads (a twin against its source): the reference's greedy continuation is read by both models in wide chunks and every position's argmax, logits and distribution are compared. Reports the share of prompts and tokens identical, where and how near a tie each divergence was, mean KL and the largest logit difference.")
        {
            model, reference, workloads, limit, outDir, weights,
        };
        cmd.SetAction(parse =>
        {
            string root = ModelLocator.RepoRoot();
            var files = parse.GetValue(workloads) is { Length: > 0 } given ? given.ToList()
                : new[] { "summary", "rag", "ui", "reply" }.Select(t => Path.Combine(root, "workloads", t + ".jsonl")).ToList();
            var format = parse.GetValue(weights);
            var bundle = ConsoleUi.LoadModel(ModelLocator.Resolve(parse.GetValue(model)));
            var refBundle = parse.GetValue(reference) is { } r ? ConsoleUi.LoadModel(ModelLocator.Resolve(r))
                : format != WeightFormat.F32 ? bundle : ConsoleUi.LoadModel(ModelLocator.Resolve(null));
            if (bundle.Config.VocabSize != refBundle.Config.VocabSize)
            {
                throw new ArgumentException($"the two models have different vocabularies ({bundle.Config.VocabSize} and {refBundle.Config.VocabSize} tokens); compare a model with its own source.");
            }

            var items = files.SelectMany(f =>
            {
                var all = WorkloadItem.Load(f);
                return parse.GetValue(limit) > 0 ? all.Take(parse.GetValue(limit)) : all;
            }).ToList();
            const int capacity = 4096;
            using var refRt = new OrtModelRuntime(refBundle.Weights, capacity, [1, 64]);
            using var rt = new OrtModelRuntime(bundle.Weights, capacity, [1, 64], new RuntimeOptions { Weights = format });
            var refGen = new Generator(refRt);
            var gen = new Generator(rt);
            var rows = new List<Row>();
            AnsiConsole.Progress().Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn()).Start(ctx =>
            {
                var bar = ctx.AddTask($"{bundle.Name} ({WeightQuantizer.Name(format)}) against {refBundle.Name} (f32)", maxValue: items.Count);
                foreach (var item in items)
                {
                    int[] prompt = refBundle.Tokenizer.Encode(PromptTemplate.Render(item.Context, item.Prompt, refBundle.HasRoleTokens));
                    var tokens = refGen.Generate(prompt, item.MaxTokens, new SamplingOptions(), refBundle.StopTokens).Tokens;
                    var a = new List<float[]>(tokens.Count);
                    var b = new List<float[]>(tokens.Count);
                    double refLoss = 0, loss = 0;
                    Agreement.TeacherForced(refGen, refRt, prompt, tokens, (_, r) => a.Add(r.ToArray()), l => refLoss = l);
                    Agreement.TeacherForced(gen, rt, prompt, tokens, (_, r) => b.Add(r.ToArray()), l => loss = l);
                    rows.Add(new Row(item.Task, item.Id, prompt.Length, Agreement.Compare(a, b, tokens), refLoss, loss));
                    bar.Increment(1);
                }
            });

            var t = new Table().AddColumns("task", "prompts", "identical", "tokens identical", "mean KL (nats)", "largest logit diff");
            foreach (var g in rows.GroupBy(r => r.Task).Append(rows.GroupBy(_ => "all").Single()))
            {
                var s = Summary.Of(g.Key, g.ToList());
                t.AddRow(s.Task, $"{s.Prompts}", $"{s.IdenticalPrompts} ({s.IdenticalShare:P1})", $"{s.TokenShare:P2}", $"{s.MeanKl:E2}", $"{s.MaxRelativeLogitDiff:E2}");
            }

            AnsiConsole.Write(t);
            Write(parse.GetValue(outDir), bundle, refBundle, rows, parse.GetValue(limit), format);
            return 0;
        });
        return cmd;
    }

    /// <param name="ReferenceLoss">The reference's summed next-token loss over the prompt (held-out text), nats.</param>
    internal sealed record Row(string Task, string Id, int PromptTokens, PromptAgreement Agreement, double ReferenceLoss, double Loss);

    internal sealed record Summary(string Task, int Prompts, int IdenticalPrompts, double IdenticalShare, double TokenShare, double MeanKl, double MaxRelativeLogitDiff,
        double ReferenceLoss = 0, double Loss = 0)
    {
        /// <summary>Relative change of the held-out loss (per prompt token) against the reference.</summary>
        public double LossChange => ReferenceLoss == 0 ? 0 : (Loss / ReferenceLoss) - 1;

        public static Summary Of(string task, List<Row> rows)
        {
            int identical = rows.Count(r => r.Agreement.Identical);
            long tokens = rows.Sum(r => (long)r.Agreement.Tokens), same = rows.Sum(r => (long)r.Agreement.IdenticalTokens);
            double kl = tokens == 0 ? 0 : rows.Sum(r => r.Agreement.MeanKl * r.Agreement.Tokens) / tokens;
            long promptTokens = Math.Max(1, rows.Sum(r => (long)r.PromptTokens - 1));
            return new Summary(task, rows.Count, identical, (double)identical / Math.Max(1, rows.Count), tokens == 0 ? 1 : (double)same / tokens, kl,
                rows.Count == 0 ? 0 : rows.Max(r => r.Agreement.MaxRelativeLogitDiff), rows.Sum(r => r.ReferenceLoss) / promptTokens, rows.Sum(r => r.Loss) / promptTokens);
        }
    }

    private static void Write(DirectoryInfo? outDir, ModelBundle model, ModelBundle reference, List<Row> rows, int limit, WeightFormat format)
    {
        string suffix = format == WeightFormat.F32 ? "" : "-" + WeightQuantizer.Name(format);
        string dir = outDir?.FullName ?? Path.Combine(ModelLocator.RepoRoot(), "docs", "bench");
        Directory.CreateDirectory(dir);
        var stamp = BenchStamp.Capture();
        string name = $"fidelity-{model.Name}{suffix}";
        var summaries = rows.GroupBy(r => r.Task).Select(g => Summary.Of(g.Key, g.ToList())).Append(Summary.Of("all", rows)).ToList();
        var md = new StringBuilder();
        md.AppendLine(CultureInfo.InvariantCulture, $"# Fidelity of {model.Name} ({WeightQuantizer.Name(format)} weights) to {reference.Name} (float32)");
        md.AppendLine();
        md.AppendLine(stamp.ToMarkdown());
        md.AppendLine(CultureInfo.InvariantCulture, $"Command: `coordgen model compare --model {model.Directory} --reference {reference.Directory}{(format == WeightFormat.F32 ? "" : $" --weights {WeightQuantizer.Name(format)}")}{(limit > 0 ? $" --limit {limit}" : "")}`.");
        md.AppendLine();
        md.AppendLine(CultureInfo.InvariantCulture, $"The reference's greedy continuation of every workload prompt is read by both models ({model.Config.ParameterCount / 1e6:F1}M and {reference.Config.ParameterCount / 1e6:F1}M parameters) in chunks of 64; at each position the argmax, the logits and the next-token distribution are compared. A prompt is identical when every argmax agrees, which makes the model's greedy output the reference's token for token; tokens identical counts, per prompt, the tokens before the first divergence.");
        md.AppendLine();
        md.AppendLine("Held-out loss: mean next-token loss (nats) over the prompts' own tokens (documents never trained on), reference and model.");
        md.AppendLine();
        md.AppendLine("| task | prompts | identical | tokens identical | mean KL (nats) | largest relative logit diff | held-out loss (reference / model) | loss change |");
        md.AppendLine("|---|---|---|---|---|---|---|---|");
        foreach (var s in summaries)
        {
            md.AppendLine(CultureInfo.InvariantCulture, $"| {s.Task} | {s.Prompts} | {s.IdenticalPrompts} ({s.IdenticalShare:P1}) | {s.TokenShare:P2} | {s.MeanKl:E2} | {s.MaxRelativeLogitDiff:E2} | {s.ReferenceLoss:F4} / {s.Loss:F4} | {s.LossChange:+0.00%;-0.00%;0.00%} |");
        }

        var diverged = rows.Where(r => !r.Agreement.Identical).ToList();
        md.AppendLine();
        if (diverged.Count == 0)
        {
            md.AppendLine("No prompt diverged.");
        }
        else
        {
            md.AppendLine("Divergences (the reference's top-1 minus top-2 logit at that position says how near a tie it was):");
            md.AppendLine();
            md.AppendLine("| task | id | prompt tokens | output token | of | reference margin |");
            md.AppendLine("|---|---|---|---|---|---|");
            foreach (var r in diverged)
            {
                md.AppendLine(CultureInfo.InvariantCulture, $"| {r.Task} | {r.Id} | {r.PromptTokens} | {r.Agreement.FirstDivergence} | {r.Agreement.Tokens} | {r.Agreement.ReferenceMargin:F4} |");
            }
        }

        File.WriteAllText(Path.Combine(dir, name + ".md"), md.ToString());
        File.WriteAllText(Path.Combine(dir, name + ".json"), JsonSerializer.Serialize(new
        {
            stamp,
            model = model.Name,
            reference = reference.Name,
            weights = WeightQuantizer.Name(format),
            summary = summaries.Select(s => new { task = s.Task, prompts = s.Prompts, identical_prompts = s.IdenticalPrompts, identical_share = s.IdenticalShare, token_identical_share = s.TokenShare, mean_kl = s.MeanKl, max_relative_logit_diff = s.MaxRelativeLogitDiff, reference_loss = s.ReferenceLoss, loss = s.Loss, loss_change = s.LossChange }),
            prompts = rows.Select(r => new { task = r.Task, id = r.Id, prompt_tokens = r.PromptTokens, tokens = r.Agreement.Tokens, first_divergence = r.Agreement.FirstDivergence, reference_margin = r.Agreement.ReferenceMargin, mean_kl = r.Agreement.MeanKl, max_relative_logit_diff = r.Agreement.MaxRelativeLogitDiff }),
        }, new JsonSerializerOptions { WriteIndented = true }));
        ConsoleUi.Err.MarkupLineInterpolated($"[grey]wrote {Path.Combine(dir, name)}.md and .json[/]");
    }
}
