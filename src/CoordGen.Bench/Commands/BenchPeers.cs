using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.Json;
using CoordGen.Engine.Generation;
using CoordGen.Engine.Model;
using CoordGen.Engine.Onnx;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Speculative;
using Spectre.Console;
using Oga = Microsoft.ML.OnnxRuntimeGenAI;

namespace CoordGen.Host.Commands;

/// <summary>
/// <c>coordgen bench peers</c>: plain greedy decoding of the same checkpoint in ONNX Runtime GenAI's C# API
/// (from a folder written by <see cref="GenAiExport"/>) against our <c>ar</c> and <c>sam+ours</c>, same prompts,
/// same process, engines taking turns prompt by prompt: prefill and decode tokens/s, and token identity.
/// </summary>
internal static class BenchPeers
{
    public static Command Create()
    {
        var model = CommonOptions.Model();
        var workloads = new Option<string[]>("--workload", "-w") { Description = "Workload JSONL file(s). Default: workloads/{summary,rag,ui,reply}.jsonl.", AllowMultipleArgumentsPerToken = true };
        var limit = new Option<int>("--limit") { Description = "Prompts per workload.", DefaultValueFactory = _ => 3 };
        var threads = CommonOptions.Threads();
        var outDir = new Option<DirectoryInfo?>("--out") { Description = "Report folder (default docs/bench/ of the checkout).", HelpName = "DIR" };
        var cmd = new Command("peers", "Plain greedy decoding of the same checkpoint in ONNX Runtime GenAI (its C# API, over a folder exported by `coordgen model export --format ort-genai`) against our plain (ar) and speculative (sam+ours, adaptive width) decoding, same prompts, same process: prefill and decode tokens/s, and whether the outputs are identical.")
        {
            model, workloads, limit, threads, outDir,
        };
        cmd.SetAction(parse =>
        {
            string root = ModelLocator.RepoRoot();
            var files = parse.GetValue(workloads) is { Length: > 0 } given ? given.ToList()
                : new[] { "summary", "rag", "ui", "reply" }.Select(t => Path.Combine(root, "workloads", t + ".jsonl")).ToList();
            var bundle = ConsoleUi.LoadModel(ModelLocator.Resolve(parse.GetValue(model)));
            int n = parse.GetValue(threads) > 0 ? parse.GetValue(threads) : Environment.ProcessorCount;
            var prompts = BenchStreams.Prompts(bundle, Math.Max(1, parse.GetValue(limit)), files);
            int capacity = OrtModelRuntime.CapacityBuckets(4096).First(b => b >= prompts.Max(p => p.Tokens.Length + p.MaxTokens + 64));
            string export = Directory.CreateTempSubdirectory("coordgen-ort-genai-").FullName;
            try
            {
                ConsoleUi.Status("exporting the model for ONNX Runtime GenAI", () =>
                {
                    GenAiExport.Write(bundle.Weights, export, capacity, n, bundle.StopTokens);
                    return 0;
                });
                using var rt = ConsoleUi.Status("compiling our graphs", () =>
                {
                    var r = new OrtModelRuntime(bundle.Weights, capacity, [1, 4, 8, 64], new RuntimeOptions { IntraOpThreads = parse.GetValue(threads) });
                    r.CompileAll();
                    return r;
                });
                var rows = Run(bundle, rt, export, prompts);
                Report(rows, bundle, parse.GetValue(outDir), parse.GetValue(limit), n);
            }
            finally
            {
                Directory.Delete(export, recursive: true);
            }

            return 0;
        });
        return cmd;
    }

    internal sealed record EngineRun(string Engine, int Prompt, int PromptTokens, int[] Tokens, double PrefillMs, double DecodeMs);

    private static List<EngineRun> Run(ModelBundle bundle, OrtModelRuntime rt, string export, List<(int[] Tokens, int MaxTokens)> prompts)
    {
        var runs = new List<EngineRun>();
        var plain = new Generator(rt);
        var spec = new SpeculativeDecoder(rt);
        var greedy = new SamplingOptions();
        var stops = bundle.StopTokens;
        using var oga = new Oga.OgaHandle();
        using var config = new Oga.Config(export);
        config.ClearProviders();
        using var genai = new Oga.Model(config);
        AnsiConsole.Progress().Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn()).Start(ctx =>
        {
            var bar = ctx.AddTask("prompts x engines", maxValue: prompts.Count);
            for (int i = 0; i < prompts.Count; i++)
            {
                var (prompt, max) = prompts[i];
                var engines = new (string Name, Func<EngineRun> Run)[]
                {
                    ("ort-genai", () => RunGenAi(genai, i, prompt, max, stops)),
                    ("ar", () =>
                    {
                        var r = plain.Generate(prompt, max, greedy, stops);
                        return new EngineRun("ar", i, prompt.Length, [.. r.Tokens], r.Stats.PrefillMs, r.Stats.DecodeMs);
                    }),
                    ("sam+ours", () =>
                    {
                        using var pre = spec.Prefill(prompt, new CalibrationOptions());
                        var r = spec.Generate(pre, max, greedy, stops, SpeculationOptions.ForMethod("sam+ours", 8) with { AdaptiveWidth = true });
                        return new EngineRun("sam+ours", i, prompt.Length, [.. r.Tokens], pre.PrefillMs, r.Stats.DecodeMs);
                    }),
                };

                // The engines take turns, starting with a different one each prompt: the machine's drift lands on all.
                for (int k = 0; k < engines.Length; k++)
                {
                    runs.Add(engines[(i + k) % engines.Length].Run());
                }

                bar.Increment(1);
            }
        });
        return runs;
    }

    private static EngineRun RunGenAi(Oga.Model model, int index, int[] prompt, int maxTokens, IReadOnlySet<int> stops)
    {
        using var p = new Oga.GeneratorParams(model);
        p.SetSearchOption("max_length", prompt.Length + maxTokens);
        p.SetSearchOption("do_sample", false);
        using var g = new Oga.Generator(model, p);
        long t0 = Stopwatch.GetTimestamp();
        g.AppendTokens(prompt);
        double prefill = Stopwatch.GetElapsedTime(t0).TotalMilliseconds;
        long t1 = Stopwatch.GetTimestamp();
        while (!g.IsDone())
        {
            g.GenerateNextToken();
        }

        double decode = Stopwatch.GetElapsedTime(t1).TotalMilliseconds;
        var all = g.GetSequence(0).ToArray();
        var output = all.Skip(prompt.Length).TakeWhile(t => !stops.Contains(t)).ToArray();
        return new EngineRun("ort-genai", index, prompt.Length, output, prefill, decode);
    }

    private static void Report(List<EngineRun> runs, ModelBundle bundle, DirectoryInfo? outDir, int limit, int threads)
    {
        string dir = outDir?.FullName ?? Path.Combine(ModelLocator.RepoRoot(), "docs", "bench");
        Directory.CreateDirectory(dir);
        var stamp = BenchStamp.Capture();
        string stem = ReportStem.For("peers", bundle.Name);
        var reference = runs.Where(r => r.Engine == "ar").ToDictionary(r => r.Prompt);
        var engines = new[] { "ort-genai", "ar", "sam+ours" };
        var summary = engines.Select(e =>
        {
            var mine = runs.Where(r => r.Engine == e).ToList();
            long promptTokens = mine.Sum(r => (long)r.PromptTokens), tokens = mine.Sum(r => (long)r.Tokens.Length);
            return new
            {
                engine = e,
                prompts = mine.Count,
                prefill_tokens_per_s = promptTokens / (mine.Sum(r => r.PrefillMs) / 1000),
                decode_tokens_per_s = tokens / (mine.Sum(r => r.DecodeMs) / 1000),
                identical_to_ar = mine.Count(r => r.Tokens.SequenceEqual(reference[r.Prompt].Tokens)),
                tokens,
            };
        }).ToList();
        double genaiDecode = summary[0].decode_tokens_per_s, genaiPrefill = summary[0].prefill_tokens_per_s;
        var md = new StringBuilder();
        md.AppendLine(CultureInfo.InvariantCulture, $"# Peers: ONNX Runtime GenAI and CoordGen on {bundle.Name}");
        md.AppendLine();
        md.AppendLine(stamp.ToMarkdown());
        md.AppendLine(CultureInfo.InvariantCulture, $"Command: `coordgen bench peers{(bundle.Name == "coordgen-demo" ? "" : $" --model {bundle.Directory}")} --limit {limit}`. The same checkpoint ({bundle.Config.ParameterCount / 1e6:F1}M parameters, float32) in ONNX Runtime GenAI 0.20.0's C# API (greedy, over the folder `coordgen model export --format ort-genai` writes: one graph with dynamic lengths, past + new keys concatenated per step, {threads} intra-op threads) and in CoordGen (static-shape graphs), the engines taking turns prompt by prompt in one process. Decode tokens/s counts generated tokens over the time after the prompt's prefill.");
        md.AppendLine();
        md.AppendLine("| engine | prompts | prefill tok/s | decode tok/s | decode vs ort-genai | outputs identical to our ar |");
        md.AppendLine("|---|---|---|---|---|---|");
        foreach (var s in summary)
        {
            md.AppendLine(CultureInfo.InvariantCulture, $"| {s.engine} | {s.prompts} | {s.prefill_tokens_per_s:F0} | {s.decode_tokens_per_s:F1} | {s.decode_tokens_per_s / genaiDecode:F2}x | {s.identical_to_ar} of {s.prompts} |");
        }

        md.AppendLine();
        md.AppendLine(CultureInfo.InvariantCulture, $"Prefill: ours / ort-genai = {summary[1].prefill_tokens_per_s / genaiPrefill:F2}x.");
        File.WriteAllText(Path.Combine(dir, stem + ".md"), md.ToString());
        File.WriteAllText(Path.Combine(dir, stem + ".json"), JsonSerializer.Serialize(new { stamp, model = bundle.Name, threads, engines = summary, runs = runs.Select(r => new { engine = r.Engine, prompt = r.Prompt, prompt_tokens = r.PromptTokens, tokens = r.Tokens.Length, prefill_ms = r.PrefillMs, decode_ms = r.DecodeMs }) }, new JsonSerializerOptions { WriteIndented = true }));
        var t = new Table().AddColumns("engine", "prefill tok/s", "decode tok/s", "vs ort-genai", "identical to ar");
        foreach (var s in summary)
        {
            t.AddRow(s.engine, s.prefill_tokens_per_s.ToString("F0", CultureInfo.InvariantCulture), s.decode_tokens_per_s.ToString("F1", CultureInfo.InvariantCulture),
                (s.decode_tokens_per_s / genaiDecode).ToString("F2", CultureInfo.InvariantCulture) + "x", $"{s.identical_to_ar} of {s.prompts}");
        }

        AnsiConsole.Write(t);
        ConsoleUi.Err.MarkupLineInterpolated($"[grey]wrote {Path.Combine(dir, stem)}.md and .json[/]");
    }
}
