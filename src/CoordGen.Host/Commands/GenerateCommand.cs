using System.CommandLine;
using CoordGen.Engine;
using CoordGen.Engine.Generation;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Speculative;
using CoordGen.Engine.Tokenization;
using Spectre.Console;

namespace CoordGen.Host.Commands;

/// <summary><c>coordgen generate</c>: stream a completion for one prompt and report prefill and decode speed.</summary>
internal static class GenerateCommand
{
    public static Command Create()
    {
        var model = CommonOptions.Model();
        var prompt = new Option<string?>("--prompt", "-p") { Description = "The instruction or question. Default: a built-in summary request over a built-in context." };
        var context = new Option<FileInfo?>("--context", "-c") { Description = "A text file placed in the template's context section (a document, passages, chat history).", HelpName = "FILE" };
        var raw = new Option<bool>("--raw") { Description = "Feed the prompt as is, without the chat template." };
        var maxTokens = new Option<int>("--max-tokens", "-n") { Description = "Most tokens to generate; generation also stops at end-of-sequence.", DefaultValueFactory = _ => 128 };
        var temperature = new Option<float>("--temperature", "-t") { Description = "0 = greedy (deterministic); above 0 samples from the tempered distribution.", DefaultValueFactory = _ => 0f };
        var topK = new Option<int>("--top-k") { Description = "Sample only from the k most likely tokens; 0 = off.", DefaultValueFactory = _ => 0 };
        var topP = new Option<float>("--top-p") { Description = "Sample only from the smallest set with this much probability; 1 = off.", DefaultValueFactory = _ => 1f };
        var seed = new Option<int>("--seed", "-s") { Description = "Random seed for sampling: the same seed gives the same text.", DefaultValueFactory = _ => 0 };
        var capacity = CommonOptions.Capacity();
        var prefillWidth = CommonOptions.PrefillWidth();
        var threads = CommonOptions.Threads();
        var provider = CommonOptions.Provider();
        var qnnBackend = CommonOptions.QnnBackend();
        var qnnPerf = CommonOptions.QnnPerformanceMode();
        var qnnCache = CommonOptions.QnnContextCache();
        var method = new Option<string>("--method")
        {
            Description = "Decoding method: ar (plain), pld, sam, sam+history, pld+ours, sam+ours (ours = calibration + draft reuse + token trees). All give the same greedy text; speculative methods are faster.",
            DefaultValueFactory = _ => "sam+ours",
        };
        var width = new Option<int>("--width") { Description = "Verification width for speculative methods (tokens checked per step). 8 is the fastest on coordgen-demo (docs/bench/accept.md).", DefaultValueFactory = _ => 8 };
        var history = new Option<FileInfo?>("--history") { Description = "History store of past responses (created if missing, updated after the run); drafts from it with sam+history.", HelpName = "FILE" };

        var weights = CommonOptions.Weights();
        var cmd = new Command("generate", "Generate text for a prompt (and optional context file), streaming tokens as they are produced. Prints prefill and decode tokens/s at the end.")
        {
            model, prompt, context, raw, maxTokens, temperature, topK, topP, seed, capacity, prefillWidth, threads, provider, qnnBackend, qnnPerf, qnnCache, method, width, history, weights,
        };
        cmd.SetAction((parse, ct) =>
        {
            int cap = parse.GetValue(capacity), pw = parse.GetValue(prefillWidth);
            CommonOptions.Validate(cap, pw);
            int n = parse.GetValue(maxTokens);
            if (n < 1 || n > cap)
            {
                throw new ArgumentException($"--max-tokens must be between 1 and --capacity ({cap}); got {n}.");
            }

            var sampling = new SamplingOptions
            {
                Temperature = parse.GetValue(temperature),
                TopK = parse.GetValue(topK),
                TopP = parse.GetValue(topP),
                Seed = parse.GetValue(seed),
            };
            sampling.Validate();
            string? contextText = null;
            if (parse.GetValue(context) is { } file)
            {
                if (!file.Exists)
                {
                    throw new FileNotFoundException($"--context file '{file.FullName}' does not exist.");
                }

                contextText = File.ReadAllText(file.FullName);
            }

            string promptText = parse.GetValue(prompt) ?? "Summarize the document.";
            if (parse.GetValue(prompt) is null && contextText is null)
            {
                contextText = DefaultContext;
            }

            if (string.IsNullOrWhiteSpace(promptText))
            {
                throw new ArgumentException("--prompt is empty: give the model something to respond to.");
            }

            var bundle = ConsoleUi.LoadModel(ModelLocator.Resolve(parse.GetValue(model)));
            string text = parse.GetValue(raw) ? promptText : PromptTemplate.Render(contextText, promptText, bundle.HasRoleTokens);
            int[] ids = bundle.Tokenizer.Encode(text);
            string m = parse.GetValue(method)!;
            int w = parse.GetValue(width);
            var spec = m == "ar" ? null : SpeculationOptions.ForMethod(m, w);
            if (spec is not null && (w < 2 || w > 256))
            {
                throw new ArgumentException($"--width must be between 2 and 256 (got {w}).");
            }

            int[] widths = spec is null ? [1, pw] : [1, pw, w];
            using var runtime = ConsoleUi.Status("compiling graphs", () =>
            {
                var rt = new OrtModelRuntime(bundle.Weights, cap, widths, new RuntimeOptions
                {
                    IntraOpThreads = parse.GetValue(threads),
                    Provider = parse.GetValue(provider),
                    QnnBackendPath = parse.GetValue(qnnBackend),
                    QnnPerformanceMode = parse.GetValue(qnnPerf)!,
                    QnnContextCache = parse.GetValue(qnnCache)?.FullName,
                    Weights = parse.GetValue(weights),
                });
                rt.Prepare(Math.Min(cap, ids.Length + n + w));
                return rt;
            });
            var decoder = new StreamingDecoder(bundle.Tokenizer);
            bool Stream(int id)
            {
                Console.Out.Write(decoder.Push(id));
                Console.Out.Flush();
                return true;
            }

            GenerationStats s;
            string extra = "";
            if (spec is null)
            {
                s = new Generator(runtime).Generate(ids, n, sampling, bundle.StopTokens, Stream, ct).Stats;
            }
            else
            {
                var historyFile = parse.GetValue(history);
                var store = historyFile is null ? null : HistoryStore.Load(historyFile.FullName);
                var r = new SpeculativeDecoder(runtime).Generate(ids, n, sampling, bundle.StopTokens, spec, store, Stream, ct);
                s = r.Stats;
                var a = r.Accounting;
                extra = $"; {m} W={w}: {a.MeanAccepted:F2} tokens/step over {a.Steps} steps, accepted by source: " +
                    string.Join(", ", Enum.GetValues<DraftSource>().Select(x => $"{x.ToString().ToLowerInvariant()} {a.Accepted(x)}/{a.Proposed(x)}")) +
                    $", drafting {r.DraftMs / Math.Max(1, a.Steps):F3} ms/step";
                if (store is not null && historyFile is not null)
                {
                    store.Add(r.Tokens.ToArray());
                    store.Save(historyFile.FullName);
                }
            }

            Console.Out.WriteLine(decoder.Flush());
            ConsoleUi.Err.MarkupLineInterpolated(
                $"[grey]prompt {s.PromptTokens} tokens, prefill {s.PrefillTokensPerSecond:F1} tok/s ({s.PrefillMs:F0} ms); decode {s.GeneratedTokens} tokens, {s.DecodeTokensPerSecond:F1} tok/s; stop: {s.StopReason}{extra}[/]");
            return Task.FromResult(0);
        });
        return cmd;
    }

    private const string DefaultContext =
        "Title: The lighthouse keeper\nThe old lighthouse on the northern cape was kept by a single keeper for forty years. " +
        "Every evening the keeper climbed the narrow stairs, trimmed the wick and lit the great lamp, so that ships passing " +
        "the rocks at night could find the harbour. In the winter storms the keeper wrote in the logbook each hour, noting the " +
        "wind, the sea and every ship that passed. When the lamp was replaced by an electric light, the keeper stayed on to " +
        "tend the garden and to show visitors the logbooks, which are now kept in the town museum.";
}
