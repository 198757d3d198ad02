using System.CommandLine;
using CoordGen.Engine;
using CoordGen.Engine.Generation;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Speculative;
using CoordGen.Messages;
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
        var kv = CommonOptions.Kv();
        var warmUp = new Option<bool>("--warm-up")
        {
            Description = "Run two short requests first (plain and --method), so the timed request meets compiled .NET code and the tokens/s printed are the steady speed a server gives; false: this request pays the first-use compilation too (about 30-50 ms on the demo model). Default true.",
            DefaultValueFactory = _ => true,
        };
        var cmd = new Command("generate", "Generate text for a prompt (and optional context file), streaming tokens as they are produced. Prints prefill and decode tokens/s at the end.")
        {
            model, prompt, context, raw, maxTokens, temperature, topK, topP, seed, capacity, prefillWidth, threads, provider, qnnBackend, qnnPerf, qnnCache, method, width, history, weights, kv, warmUp,
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

            // The same actor runtime as the server, with one session: the device actor steps it, its drafter,
            // calibrator and verifier children do their parts, and the text streams from its channel.
            var options = new CoordGenOptions
            {
                Capacity = cap,
                PrefillWidth = pw,
                Threads = parse.GetValue(threads),
                Weights = parse.GetValue(weights),
                Kv = parse.GetValue(kv),
                Method = m,
                Width = spec is null ? 8 : w,
                AdaptiveWidth = false,
                MaxPending = 1,
                InterleavedChunkWidth = pw, // one session: no other stream's steps to interleave prefill chunks with
                PrefixCache = false, // one prompt: nothing to share, and the budget holds one session's cache only
                KvBudgetMb = (int)Math.Max(1, (KvCache.BytesFor(bundle.Config.NumLayers, bundle.Config.NumKvHeads, bundle.Config.HeadDim, cap, parse.GetValue(kv)) >> 20) + 1),
                PrepareSlots = Math.Min(cap, ids.Length + n + w),
                Provider = parse.GetValue(provider),
                QnnBackendPath = parse.GetValue(qnnBackend),
                QnnPerformanceMode = parse.GetValue(qnnPerf)!,
                QnnContextCache = parse.GetValue(qnnCache)?.FullName,
                WarmUp = parse.GetValue(warmUp),
            };
            if (ids.Length + 1 >= cap)
            {
                throw new PromptTooLongException(ids.Length, cap - 1);
            }

            using var service = ConsoleUi.Status(options.WarmUp ? "compiling graphs, warming up" : "compiling graphs", () => InferenceService.Start(bundle, options, actorLogLevel: "ERROR"));
            var historyFile = parse.GetValue(history);
            var store = historyFile is null ? null : HistoryStore.Load(historyFile.FullName);
            string? storeName = null;
            if (store is not null && spec is not null)
            {
                // Past responses become a context store the drafter retrieves from, as a server's requests use one.
                storeName = "history";
                service.AskAsync(new ContextStoreProtocol.CreateStore(storeName)).GetAwaiter().GetResult();
                foreach (var response in store.ResponseTokens)
                {
                    service.AskAsync(new ContextStoreProtocol.AddDocument(storeName, TokenSequence.From(response))).GetAwaiter().GetResult();
                }
            }

            var request = new InferenceRequest(ids, n, new GenerationProtocol.Sampling(sampling.Temperature, sampling.TopK, sampling.TopP, sampling.Seed), [], m, spec is null ? null : w, storeName);
            var o = service.StreamAsync(request, delta =>
            {
                Console.Out.Write(delta.Text);
                Console.Out.Flush();
                return Task.CompletedTask;
            }, ct).GetAwaiter().GetResult();

            string extra = "";
            if (o.Speculation is { } r)
            {
                extra = $"; {m} W={w}: {r.TokensPerStep:F2} tokens/step over {r.Steps} steps, accepted by source: " +
                    string.Join(", ", r.ProposedBySource.Keys.Order(StringComparer.Ordinal).Select(x => $"{x} {r.AcceptedBySource.GetValueOrDefault(x)}/{r.ProposedBySource[x]}")) +
                    $", drafting {r.DraftMs / Math.Max(1, r.Steps):F3} ms/step";
            }

            if (store is not null && historyFile is not null && spec is not null)
            {
                store.Add(bundle.Tokenizer.Encode(o.Text));
                store.Save(historyFile.FullName);
            }

            Console.Out.WriteLine();
            double prefillTps = o.PrefillMs > 0 ? o.PromptTokens / (o.PrefillMs / 1000) : 0;
            double decodeTps = o.DecodeMs > 0 ? o.CompletionTokens / (o.DecodeMs / 1000) : 0;
            ConsoleUi.Err.MarkupLineInterpolated(
                $"[grey]prompt {o.PromptTokens} tokens, prefill {prefillTps:F1} tok/s ({o.PrefillMs:F0} ms); decode {o.CompletionTokens} tokens, {decodeTps:F1} tok/s; stop: {o.FinishReason}{extra}[/]");
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
