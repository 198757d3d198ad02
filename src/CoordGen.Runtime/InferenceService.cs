using System.Diagnostics;
using System.Threading.Channels;
using Akka.Actor;
using Akka.Configuration;
using CoordGen.Actors.Device;
using CoordGen.Actors.Supervision;
using CoordGen.Engine;
using CoordGen.Engine.Model;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Tokenization;
using CoordGen.Messages;
using static CoordGen.Messages.GenerationProtocol;

namespace CoordGen;

/// <summary>One generation request as the edge (HTTP, IChatClient) hands it to the runtime.</summary>
public sealed record InferenceRequest(
    int[] Prompt,
    int MaxTokens,
    Sampling Sampling,
    IReadOnlyList<string> Stop,
    string? Method = null,
    int? Width = null,
    string? ContextStore = null)
{
    /// <summary>The prompt starts with an in-prompt context store's documents, which the device keeps prefilled (see <see cref="InferenceService.StoreContextAsync"/>).</summary>
    public PrefixPin? KeepPrefix { get; init; }
}

/// <summary>
/// An in-prompt context store's documents as a prompt carries them: <see cref="Text"/> (the documents,
/// one per line) goes first in the prompt's context section, and <see cref="Generation"/> tells the
/// device which version of the store the prefilled rows it keeps belong to.
/// </summary>
public sealed record StoreContext(string Name, long Generation, int Documents, string Text)
{
    /// <summary>The pin a request whose prompt starts with <paramref name="prefixTokens"/> tokens of these documents asks for.</summary>
    public PrefixPin Pin(int prefixTokens) => new(Name, Generation, prefixTokens);
}

/// <summary>What came of a request: the text, why it ended, token counts and speculation statistics.</summary>
public sealed record InferenceOutcome(string Text, string FinishReason, int PromptTokens, int CompletionTokens, double PrefillMs, double DecodeMs, SpeculationReport? Speculation)
{
    /// <summary>From the request reaching the runtime to its first token (null when none came).</summary>
    public double? TimeToFirstTokenMs { get; init; }

    /// <summary>From the request reaching the runtime to its end.</summary>
    public double DurationMs { get; init; }

    /// <summary>Prompt tokens whose keys and values came from the prefix cache (OpenAI's <c>usage.prompt_tokens_details.cached_tokens</c>).</summary>
    public int CachedTokens { get; init; }

    /// <summary>Device attempts the request took: 1, or more when it resumed after faults (a watchdog ending a hung run included).</summary>
    public int Attempts { get; init; } = 1;

    /// <summary>
    /// Every generated token's log-probabilities when <see cref="Sampling.Logprobs"/> asked for them (null
    /// otherwise): one per token counted in <see cref="CompletionTokens"/>, the tokens of a matched stop sequence included.
    /// </summary>
    public IReadOnlyList<LogprobEntry>? Logprobs { get; init; }
}

/// <summary>
/// One request as it ended, whatever the ending: the request log's line and the generation metrics are
/// made from it. <see cref="Outcome"/>: ok, cancelled, or the failure (overloaded, device_fault, ...).
/// </summary>
public sealed record RequestRecord(string Id, string Outcome, int PromptTokens, int CachedTokens, int CompletionTokens, double? TimeToFirstTokenMs, double DurationMs, double? QueueWaitMs, double? TokensPerStep);

/// <summary>
/// The loaded model behind an actor system: a <see cref="GenerationSupervisor"/> with its device and
/// context-store actors. Turns token streams into text (stop sequences applied) and actor failures into
/// <see cref="ApiException"/>s. Shared by the HTTP server and the in-process <see cref="CoordGenChatClient"/>.
/// </summary>
public sealed class InferenceService : IAsyncDisposable, IDisposable
{
    private readonly ActorSystem _system;
    private long _next;

    private readonly RuntimeKeeper _runtimes;
    private int _running;
    private readonly CancellationTokenSource _stopping = new();

    private InferenceService(ModelBundle bundle, CoordGenOptions settings, ActorSystem system, IActorRef supervisor, RuntimeKeeper runtimes)
    {
        Bundle = bundle;
        Settings = settings;
        _system = system;
        Supervisor = supervisor;
        _runtimes = runtimes;
        var c = bundle.Config;
        SessionCacheBytes = KvCache.BytesFor(c.NumLayers, c.NumKvHeads, c.HeadDim, settings.Capacity, settings.Kv);
        MaxActive = MaxActiveSessions(bundle, settings);
        RequestMetrics.Observe(this);
    }

    /// <summary>Raised once per <see cref="RunAsync"/>, as the request ends (success, refusal, failure or cancellation).</summary>
    public event Action<RequestRecord>? RequestFinished;

    /// <summary>Bytes of one session's KV cache at the configured capacity.</summary>
    public long SessionCacheBytes { get; }

    /// <summary>Sessions whose caches fit the KV budget together.</summary>
    public int MaxActive { get; }

    /// <summary>KV cache bytes held now: one cache per request being generated, at most <see cref="MaxActive"/>.</summary>
    public long KvBytesInUse => Math.Min(Volatile.Read(ref _running), MaxActive) * SessionCacheBytes;

    /// <summary>The KV budget in bytes.</summary>
    public long KvBudgetBytes => Settings.KvBudgetMb * 1024L * 1024L;

    /// <summary>Runtimes built so far and device restarts that took the kept one instead (see <see cref="RuntimeKeeper"/>).</summary>
    public (int Built, int Reused) RuntimeStarts => (_runtimes.Built, _runtimes.Reused);

    /// <summary>Device runs the step watchdog has ended (hung runs, injected ones among them).</summary>
    public int WatchdogTerminations => _runtimes.WatchdogTerminations;

    public ModelBundle Bundle { get; }

    public CoordGenOptions Settings { get; }

    public IActorRef Supervisor { get; }

    public string ModelName => Bundle.Name;

    /// <summary>Loads the model named by <paramref name="options"/> (or the embedded default) and starts the runtime on it.</summary>
    public static InferenceService Start(CoordGenOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        var problems = options.Problems();
        if (problems.Count > 0)
        {
            throw new ArgumentException("invalid CoordGen options: " + string.Join(" ", problems));
        }

        return Start(ModelBundle.Load(options.ResolveModelDirectory()), options);
    }

    /// <summary>Completes when the runtime's actor system has stopped (after disposal).</summary>
    public Task Terminated => _system.WhenTerminated;

    /// <summary>Starts the runtime on a loaded model.</summary>
    /// <param name="bundle">The model: weights, tokenizer and configuration.</param>
    /// <param name="settings">Runtime options (checked: an invalid one throws <see cref="ArgumentException"/> saying what to change).</param>
    /// <param name="actorLogLevel">Akka.NET's log level (DEBUG, INFO, WARNING, ERROR).</param>
    /// <param name="faults">Fault hooks for every runtime the device creates (<c>bench faults</c> only).</param>
    /// <param name="maxAttempts">Device attempts per request before it fails (resumes after device faults).</param>
    public static InferenceService Start(ModelBundle bundle, CoordGenOptions settings, IFaultInjector? faults = null, int maxAttempts = 5, string actorLogLevel = "WARNING")
    {
        var problems = settings.Problems();
        if (problems.Count > 0)
        {
            throw new ArgumentException("invalid settings: " + string.Join(" ", problems));
        }

        int maxActive = MaxActiveSessions(bundle, settings);

        // Fault injection asked for in the options (an app's own fault tests, `coordgen serve --faults`):
        // requests resume after every fault, as often as it takes.
        FaultPlan? plan = null;
        if (faults is null && !string.IsNullOrWhiteSpace(settings.Faults))
        {
            faults = plan = FaultSpec.Parse(settings.Faults).NewPlan();
            maxAttempts = Math.Max(maxAttempts, 100_000);
        }

        var config = ConfigurationFactory.ParseString($"akka {{ loglevel = {actorLogLevel}, stdout-loglevel = {actorLogLevel}, log-dead-letters = off, log-dead-letters-during-shutdown = off }}");
        var system = ActorSystem.Create("coordgen", config);
        // Width 4 as well for adaptive width: a session whose drafts are rarely long verifies on it.
        // And the interleaved chunk width: prefill chunks between other sessions' decode steps run on it.
        int[] widths = [.. new[] { 1, settings.AdaptiveWidth ? 4 : 1, settings.PrefillWidth, settings.Width }.Where(w => w <= settings.Width || w == settings.PrefillWidth || w == 1).Append(settings.EffectiveChunkWidth).Distinct()];
        OrtModelRuntime NewRuntime()
        {
            var rt = new OrtModelRuntime(bundle.Weights, settings.Capacity, widths, new RuntimeOptions
            {
                IntraOpThreads = settings.EffectiveThreads,
                Weights = settings.Weights,
                Kv = settings.Kv,
                // Ended sessions' caches kept for the next ones (decision 0030): never more than the budget's sessions,
                // and they yield to the prefix cache's blocks (the device trims them between steps).
                KvPool = settings.KvPool ? Math.Min(maxActive, 1024) : 0,
                PackedGroupQuery = settings.PackedGroupQuery,
                StepWatchdog = TimeSpan.FromMilliseconds(settings.StepWatchdogMs),
                Provider = settings.Provider,
                QnnBackendPath = settings.QnnBackendPath,
                QnnPerformanceMode = settings.QnnPerformanceMode,
                QnnContextCache = settings.QnnContextCache,
            })
            { Faults = faults };
            try
            {
                int warm = settings.PrecompileAll ? settings.Capacity : Math.Max(Math.Min(settings.Capacity, OrtModelRuntime.SmallestBucket), Math.Min(settings.Capacity, settings.PrepareSlots));
                rt.Prepare(warm);
                if (settings.PackedSteps && settings.PrecompileAll)
                {
                    rt.PreparePacked(settings.Capacity, trees: settings.PackedTrees);
                    if (settings.MixedSteps)
                    {
                        rt.PrepareMixed(settings.EffectiveChunkWidth);
                        foreach (int w in settings.PackedTrees && settings.MixedTrees ? widths.Where(w => w >= 2 && w <= Math.Min(settings.Width, OrtModelRuntime.MaxTreeWidth)) : [])
                        {
                            rt.PrepareMixed(settings.EffectiveChunkWidth, w); // trees riding in chunks (decision 0029)
                        }
                    }
                }
            }
            catch
            {
                rt.Dispose();
                throw;
            }

            return rt;
        }

        // The first runtime is built here, so a model or provider that cannot run fails the start with its
        // own message (not a device that keeps restarting); the device borrows it when it starts.
        OrtModelRuntime? first;
        try
        {
            first = NewRuntime();
        }
        catch
        {
            system.Terminate().Wait(TimeSpan.FromSeconds(10));
            throw;
        }

        var emulate = string.IsNullOrEmpty(settings.DeviceProfile) ? null : CoordGen.Engine.Scheduling.DeviceProfile.Load(settings.DeviceProfile);
        // The runtime outlives device-actor restarts: a restarted device takes the same compiled graphs.
        var runtimes = new RuntimeKeeper(() => Interlocked.Exchange(ref first, null) ?? NewRuntime(), reuse: settings.KeepRuntimeAcrossRestarts);
        var device = DeviceActor.Props(runtimes, bundle.StopTokens, emulate, settings.EffectiveChunkWidth, maxActive, settings.PackedSteps ? PackingMode.WhenItPays : PackingMode.Off, packTrees: settings.PackedTrees,
            mixedSteps: settings.MixedSteps, mixedTrees: settings.MixedTrees, prefixCacheBudget: settings.PrefixCache ? settings.KvBudgetMb * 1024L * 1024L : 0);
        var supervisor = system.ActorOf(GenerationSupervisor.Props(device, settings.MaxPending, maxAttempts), "generation");
        var service = new InferenceService(bundle, settings, system, supervisor, runtimes) { Faults = plan };
        if (settings.WarmUp && faults is null)
        {
            try
            {
                // On a pool thread: a caller with a single-threaded synchronization context (a UI thread)
                // blocking here must not be the thread the warm-up's continuations wait for.
                Task.Run(service.WarmUpAsync).GetAwaiter().GetResult();
            }
            catch (Exception ex)
            {
                service.Dispose();
                throw new InvalidOperationException($"the start-up warm-up request failed: {ex.Message} The model or device cannot generate as configured; fix that, or set WarmUp = false (--warm-up false) to start without it.", ex);
            }
        }

        if (plan is not null)
        {
            // Session kills and device-actor crashes strike actors, not the runtime's hooks: when the plan arms
            // one, the supervisor delivers it.
            plan.ActorFaultArmed += kind =>
            {
                if (kind == FaultKind.SessionKill && plan.TryTakeSessionKill())
                {
                    supervisor.Tell(DiagnosticsProtocol.KillRandomSession.Instance);
                }
                else if (kind == FaultKind.DeviceActorCrash && plan.TryTakeDeviceActorCrash())
                {
                    supervisor.Tell(DiagnosticsProtocol.CrashDevice.Instance);
                }
            };
        }

        return service;
    }

    /// <summary>
    /// Two short greedy requests through the actors, plain and with the default method (<see cref="CoordGenOptions.WarmUp"/>):
    /// every .NET method of prefill, calibration, drafting, verification and streaming is compiled before the
    /// first real request. The prompt repeats itself, so drafts are found and trees verified. The prefix cache
    /// is emptied after, so the first request finds it as it would have.
    /// </summary>
    private async Task WarmUpAsync()
    {
        const string Text = "The keeper climbed the narrow stairs and lit the great lamp for the ships. ";
        string prompt = PromptTemplate.Render(string.Concat(Enumerable.Repeat(Text, 4)), "Repeat the text.", Bundle.HasRoleTokens);
        int[] ids = Bundle.Tokenizer.Encode(prompt);
        const int MaxTokens = 16;
        if (ids.Length + MaxTokens + Settings.Width + 1 >= Settings.Capacity)
        {
            return; // a capacity this small has nothing to warm that a first request would not
        }

        // Bounded: a device that hangs with the step watchdog off must not hold the start forever.
        using var limit = new CancellationTokenSource(TimeSpan.FromMinutes(2));
        foreach (string method in new[] { "ar", Settings.Method }.Distinct())
        {
            await StreamAsync(new InferenceRequest(ids, MaxTokens, new Sampling(0, 0, 1, 0), [], method), _ => Task.CompletedTask, limit.Token);
        }

        var device = await SelectDevice();
        device.Tell(new DiagnosticsProtocol.SetPrefixCache(Settings.PrefixCache));
    }

    /// <summary>The fault plan running because <see cref="CoordGenOptions.Faults"/> asked for one (null when off): what it has injected so far.</summary>
    public FaultPlan? Faults { get; private init; }

    /// <summary>
    /// Sessions whose KV caches fit the budget together (each is sized for the full capacity). The device
    /// runs that many at once; admitted requests beyond them wait in line.
    /// </summary>
    public static int MaxActiveSessions(ModelBundle bundle, CoordGenOptions settings)
    {
        var c = bundle.Config;
        long perSession = KvCache.BytesFor(c.NumLayers, c.NumKvHeads, c.HeadDim, settings.Capacity, settings.Kv);
        long budget = settings.KvBudgetMb * 1024L * 1024L;
        if (perSession > budget)
        {
            throw new ArgumentException(string.Create(System.Globalization.CultureInfo.InvariantCulture,
                $"invalid settings: KvBudgetMb ({settings.KvBudgetMb} MiB) does not hold one session: its KV cache at Capacity {settings.Capacity} takes {perSession / (1024.0 * 1024.0):F1} MiB; raise --kv-budget-mb or lower --capacity."));
        }

        return (int)Math.Min(int.MaxValue, budget / perSession);
    }

    public int[] Encode(string text) => Bundle.Tokenizer.Encode(text);

    /// <summary>
    /// The documents of <paramref name="store"/> when it is an in-prompt store holding any (null when
    /// <paramref name="store"/> is null, or the store feeds drafting only, or is empty); a 404 naming what
    /// to do when it does not exist.
    /// </summary>
    public async Task<StoreContext?> StoreContextAsync(string? store)
    {
        if (store is null)
        {
            return null;
        }

        return await AskAsync(new ContextStoreProtocol.GetPromptDocuments(store)) switch
        {
            ContextStoreProtocol.PromptDocuments { InPrompt: false } or ContextStoreProtocol.PromptDocuments { Documents.Length: 0 } => null,
            ContextStoreProtocol.PromptDocuments d => ToContext(d),
            ContextStoreProtocol.StoreMissing m => throw StoreMissing(m.Name),
            var other => throw UnexpectedStoreReply(other),
        };
    }

    private StoreContext ToContext(ContextStoreProtocol.PromptDocuments d) =>
        new(d.Name, d.Generation, d.Documents.Length, string.Join("\n", d.Documents.Select(t => Bundle.Tokenizer.Decode(t.Tokens))));

    private static ApiException UnexpectedStoreReply(object reply) =>
        new(500, $"unexpected reply {reply.GetType().Name} from the context store actor; please report this.");

    /// <summary>The error for a context store that does not exist.</summary>
    public static ApiException StoreMissing(string name, string param = "context_store") =>
        new(404, $"context store '{name}' does not exist; create it with POST /v1/context_stores {{\"name\": \"{name}\"}} (GET /v1/context_stores lists those that do).", param, "context_store_not_found");

    /// <summary>Tokens of the context an in-prompt store's documents must leave free for a question and its answer.</summary>
    public const int StoreRoom = 64;

    /// <summary>
    /// The pin a request whose <paramref name="prompt"/> opens with <paramref name="store"/>'s documents
    /// rendered as <paramref name="prefixText"/> asks for: as many tokens as the prompt shares with the
    /// prefix tokenized alone (the tokenizer may merge the prefix's last newline with what follows).
    /// </summary>
    public PrefixPin? PinFor(StoreContext? store, string prefixText, int[] prompt)
    {
        if (store is null)
        {
            return null;
        }

        int[] prefix = Encode(prefixText);
        return store.Pin(prefix.AsSpan().CommonPrefixLength(prompt));
    }

    /// <summary>What <see cref="PrefillStoreAsync"/> did: the prompt it prefilled, how much came from the cache, and how long it took.</summary>
    public sealed record StorePrefill(string Name, int Documents, int PromptTokens, int CachedTokens, double PrefillMs, bool PrefixCache);

    /// <summary>
    /// Prefills an in-prompt store's documents now, as the start of a request's prompt would be, so the
    /// device holds their keys and values (pinned for the store) before the first request that names it.
    /// With the cache already holding them this costs a lookup. Refused with a 400 for a store that feeds
    /// drafting only or holds no documents, or whose documents do not fit the context.
    /// </summary>
    public async Task<StorePrefill> PrefillStoreAsync(string name, CancellationToken cancellation)
    {
        var store = await AskAsync(new ContextStoreProtocol.GetPromptDocuments(name)) switch
        {
            ContextStoreProtocol.PromptDocuments { InPrompt: false } => throw ApiException.BadRequest($"context store '{name}' feeds drafting only, so its documents are in no prompt and there is nothing to prefill; to put them in prompts, delete it (DELETE /v1/context_stores/{name}) and create it again with \"in_prompt\": true.", "name"),
            ContextStoreProtocol.PromptDocuments { Documents.Length: 0 } => throw ApiException.BadRequest($"context store '{name}' holds no documents yet; add one with POST /v1/context_stores/{name}/documents, then prefill.", "name"),
            ContextStoreProtocol.PromptDocuments d => ToContext(d),
            ContextStoreProtocol.StoreMissing => throw StoreMissing(name, "name"),
            var other => throw UnexpectedStoreReply(other),
        };
        string prefix = PromptTemplate.ContextPrefix(store.Text, Bundle.HasRoleTokens);
        int[] prompt = Encode(prefix);
        if (prompt.Length > Settings.Capacity - StoreRoom)
        {
            throw new ApiException(400, $"the documents of context store '{name}' take {prompt.Length} tokens, which leaves less than {StoreRoom} of the model's {Settings.Capacity}-token context for a question and its answer; delete the store and add fewer or shorter documents, or restart with a larger --capacity.", "name", "context_length_exceeded");
        }

        var outcome = await RunAsync(new InferenceRequest(prompt, 1, new Sampling(), [], ContextStore: name) { KeepPrefix = store.Pin(prompt.Length) }, _ => Task.CompletedTask, cancellation);
        return new StorePrefill(name, store.Documents, prompt.Length, outcome.CachedTokens, outcome.PrefillMs, Settings.PrefixCache && Settings.KvBudgetMb > 0);
    }

    /// <summary>Checks that a prompt and its output fit the context capacity; the error says what to change.</summary>
    public int ResolveMaxTokens(int promptTokens, int? requested)
    {
        int cap = Settings.Capacity;
        if (promptTokens == 0)
        {
            throw ApiException.BadRequest("the prompt is empty: send at least one non-empty message.", "messages");
        }

        if (promptTokens >= cap)
        {
            throw new ApiException(400, $"the prompt has {promptTokens} tokens but the context holds {cap}; shorten the prompt or context (or restart the server with a larger --capacity).", "messages", "context_length_exceeded");
        }

        if (requested is { } n)
        {
            if (n < 1)
            {
                throw ApiException.BadRequest($"max_tokens must be at least 1 (got {n}).", "max_tokens");
            }

            if ((long)promptTokens + n > cap)
            {
                throw new ApiException(400, $"the prompt has {promptTokens} tokens and max_tokens is {n}, but the context holds {cap}; lower max_tokens to at most {cap - promptTokens} or shorten the prompt.", "max_tokens", "context_length_exceeded");
            }

            return n;
        }

        return cap - promptTokens;
    }

    /// <summary>Runs a request, calling <paramref name="onText"/> with each piece of text as it is decoded.</summary>
    public Task<InferenceOutcome> RunAsync(InferenceRequest request, Func<string, Task> onText, CancellationToken cancellation)
    {
        ArgumentNullException.ThrowIfNull(onText);
        return StreamAsync(request, d => d.Text.Length > 0 ? onText(d.Text) : Task.CompletedTask, cancellation);
    }

    /// <summary>
    /// Runs a request, calling <paramref name="onDelta"/> with each piece of text as it is decoded and the
    /// log-probabilities of its tokens (when <see cref="Sampling.Logprobs"/> asks for them).
    /// </summary>
    public async Task<InferenceOutcome> StreamAsync(InferenceRequest request, Func<TextDelta, Task> onDelta, CancellationToken cancellation)
    {
        ArgumentNullException.ThrowIfNull(request);
        ArgumentNullException.ThrowIfNull(onDelta);
        ObjectDisposedException.ThrowIf(IsDisposed, this);
        var progress = new RequestProgress($"req-{Interlocked.Increment(ref _next)}");
        string outcome = "ok";
        Interlocked.Increment(ref _running);
        try
        {
            return await RunCoreAsync(request, onDelta, progress, cancellation);
        }
        catch (ApiException ex)
        {
            outcome = ex.Code ?? ex.Status.ToString(System.Globalization.CultureInfo.InvariantCulture);
            throw;
        }
        catch (OperationCanceledException)
        {
            outcome = "cancelled";
            throw;
        }
        catch (Exception)
        {
            outcome = "error";
            throw;
        }
        finally
        {
            Interlocked.Decrement(ref _running);
            double duration = progress.ElapsedMs;
            var done = progress.Completed;
            var record = new RequestRecord(progress.Id, outcome, request.Prompt.Length, Math.Min(done?.CachedTokens ?? 0, request.Prompt.Length), progress.Produced, progress.TimeToFirstTokenMs, duration,
                done is null ? null : Math.Max(0, duration - done.PrefillMs - done.DecodeMs), done?.Speculation?.TokensPerStep);
            RequestMetrics.Record(record, ModelName);
            RequestFinished?.Invoke(record);
        }
    }

    /// <summary>What a running request has produced so far, read by <see cref="RunAsync"/> however the request ends.</summary>
    private sealed class RequestProgress(string id)
    {
        private readonly long _started = Stopwatch.GetTimestamp();
        private long _firstToken;

        public string Id { get; } = id;

        /// <summary>Tokens read from the channel (or, once completed, the device's count).</summary>
        public int Produced { get; set; }

        public GenerationCompleted? Completed { get; set; }

        public double ElapsedMs => Stopwatch.GetElapsedTime(_started).TotalMilliseconds;

        public double? TimeToFirstTokenMs => _firstToken == 0 ? null : Stopwatch.GetElapsedTime(_started, _firstToken).TotalMilliseconds;

        public void TokenRead()
        {
            if (Produced++ == 0)
            {
                _firstToken = Stopwatch.GetTimestamp();
            }
        }
    }

    private async Task<InferenceOutcome> RunCoreAsync(InferenceRequest request, Func<TextDelta, Task> onDelta, RequestProgress progress, CancellationToken cancellation)
    {
        var channel = Channel.CreateBounded<GeneratedToken>(new BoundedChannelOptions(64) { SingleReader = true, SingleWriter = true });
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(cancellation);
        // A GenAI-convention span for the whole request; device step spans are its children.
        using var span = Actors.Telemetry.Source.StartActivity($"text_completion {ModelName}", System.Diagnostics.ActivityKind.Internal);
        span?.SetTag("gen_ai.operation.name", "text_completion");
        span?.SetTag("gen_ai.request.model", ModelName);
        span?.SetTag("gen_ai.request.max_tokens", request.MaxTokens);
        span?.SetTag("gen_ai.request.temperature", request.Sampling.Temperature);
        var message = new Generate(new SessionId(progress.Id), TokenSequence.From(request.Prompt), request.MaxTokens, request.Sampling,
            request.Method ?? Settings.Method, request.Width ?? Settings.Width, request.ContextStore, channel.Writer, cts.Token)
        {
            Trace = span?.Context ?? default,
            AdaptiveWidth = Settings.AdaptiveWidth,
            KeepPrefix = request.KeepPrefix,
        };

        // Disposal ends a request still running: its actors are gone and would never answer.
        var replyTask = Supervisor.Ask<object>(message, Timeout.InfiniteTimeSpan, _stopping.Token);
        var decoder = new StreamingDecoder(Bundle.Tokenizer);
        var filter = new StopSequenceFilter(request.Stop);
        var text = new System.Text.StringBuilder();
        List<LogprobEntry>? logprobs = request.Sampling.Logprobs is null ? null : [];
        int reported = 0; // log-probabilities handed out with a piece so far
        async Task Deliver(string piece, bool last)
        {
            text.Append(piece);
            var entries = logprobs is null ? [] : logprobs[reported..];
            reported = logprobs?.Count ?? 0;
            if (piece.Length > 0 || (last && entries.Count > 0))
            {
                await onDelta(new TextDelta(piece, entries));
            }
        }

        try
        {
            await foreach (var token in channel.Reader.ReadAllAsync(_stopping.Token))
            {
                progress.TokenRead();
                if (logprobs is not null && token.Logprob is { } lp)
                {
                    logprobs.Add(LogprobEntry.From(Bundle.Tokenizer, token.Id, lp, decoder.Length));
                }

                string piece = filter.Push(decoder.Push(token.Id));
                if (piece.Length > 0 || filter.Stopped)
                {
                    await Deliver(piece, last: filter.Stopped);
                }

                if (filter.Stopped)
                {
                    await cts.CancelAsync();
                    break;
                }
            }
        }
        catch (Exception) when (!cancellation.IsCancellationRequested)
        {
            // The channel was completed with the failure; the supervisor's reply says what it was.
        }
        catch (Exception)
        {
            await cts.CancelAsync();
        }

        object reply;
        try
        {
            reply = await replyTask;
        }
        catch (OperationCanceledException) when (_stopping.IsCancellationRequested)
        {
            throw new ObjectDisposedException(nameof(InferenceService), "the runtime was disposed while this request ran.");
        }

        cancellation.ThrowIfCancellationRequested();
        if (!filter.Stopped)
        {
            await Deliver(filter.Push(decoder.Flush()) + filter.Flush(), last: true);
        }

        switch (reply)
        {
            case GenerationCompleted done:
                progress.Completed = done;
                progress.Produced = done.Tokens.Count;
                RequestMetrics.Record(done, request.Prompt.Length);
                span?.SetTag("gen_ai.usage.input_tokens", request.Prompt.Length);
                span?.SetTag("gen_ai.usage.output_tokens", done.Tokens.Count);
                return new InferenceOutcome(text.ToString(), filter.Stopped || done.StopReason == "stop" ? "stop" : "length",
                    request.Prompt.Length, done.Tokens.Count, done.PrefillMs, done.DecodeMs, done.Speculation)
                {
                    TimeToFirstTokenMs = progress.TimeToFirstTokenMs, DurationMs = progress.ElapsedMs, Attempts = done.Attempts, Logprobs = logprobs,
                    CachedTokens = Math.Min(done.CachedTokens, request.Prompt.Length), // a resumed run's prompt holds its committed tokens too
                };
            case GenerationFailed { Kind: FailureKind.Cancelled } when filter.Stopped:
                RequestMetrics.GeneratedTokens.Add(progress.Produced);
                return new InferenceOutcome(text.ToString(), "stop", request.Prompt.Length, progress.Produced, 0, 0, null)
                { TimeToFirstTokenMs = progress.TimeToFirstTokenMs, DurationMs = progress.ElapsedMs, Logprobs = logprobs };
            case GenerationFailed failed:
                throw ToApi(failed);
            default:
                throw new ApiException(500, $"unexpected reply {reply.GetType().Name} from the runtime; please report this.");
        }
    }

    private static ApiException ToApi(GenerationFailed f) => f.Kind switch
    {
        FailureKind.Overloaded => new ApiException(429, f.Detail, code: "server_busy", retryAfterSeconds: Math.Max(1, f.RetryAfterSeconds)),
        FailureKind.CapacityExceeded => new ApiException(400, f.Detail, "messages", "context_length_exceeded"),
        FailureKind.InvalidRequest => ApiException.BadRequest(f.Detail),
        FailureKind.UnknownContextStore => new ApiException(404, f.Detail, "context_store", "context_store_not_found"),
        FailureKind.Cancelled => new ApiException(499, f.Detail, code: "cancelled"),
        _ => new ApiException(500, f.Detail, code: "device_fault"),
    };

    /// <summary>The device actor (for benchmarks that read its timeline).</summary>
    public Task<IActorRef> SelectDevice() => Supervisor.Ask<IActorRef>(DiagnosticsProtocol.GetDevice.Instance, TimeSpan.FromSeconds(10));

    public Task<object> AskAsync(object message) => Supervisor.Ask<object>(message, TimeSpan.FromSeconds(30));

    /// <summary>True once <see cref="DisposeAsync"/> has begun.</summary>
    public bool IsDisposed { get; private set; }

    /// <summary>Stops the actors, then disposes the compiled graphs.</summary>
    public void Dispose() => DisposeAsync().AsTask().GetAwaiter().GetResult();

    public async ValueTask DisposeAsync()
    {
        if (IsDisposed)
        {
            return;
        }

        IsDisposed = true;
        RequestMetrics.Forget(this);
        await _stopping.CancelAsync();
        await _system.Terminate();
        _runtimes.Dispose();
    }
}
