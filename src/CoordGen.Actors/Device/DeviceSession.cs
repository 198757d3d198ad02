using System.Collections.Immutable;
using System.Diagnostics;
using Akka.Actor;
using CoordGen.Engine.Generation;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Scheduling;
using CoordGen.Engine.Speculative;
using CoordGen.Messages;
using static CoordGen.Messages.GenerationProtocol;

namespace CoordGen.Actors.Device;

/// <summary>
/// One run on the device: its prefill, then its decode session (plain, or the device's half of a
/// speculative one: KV cache, root, width, sampler position), and the tokens not yet in its channel.
/// The device actor owns it. A device step works on it off the mailbox thread, and while that step
/// runs (<see cref="Stepping"/>) no message handler touches it; the step's completion message hands it
/// back. Its drafting state lives in the drafter actor, its sampling stream in the verifier.
/// </summary>
internal sealed class DeviceSession(SessionRun id, DeviceProtocol.Run run, IActorRef replyTo, DeviceRoles roles, DeviceProfile? emulate) : IDisposable
{
    private readonly Queue<GeneratedToken> _pending = new();
    private readonly SamplingOptions _sampling = run.Request.Sampling.ToEngine();
    private TokenLogprob? _logprob;
    private PrefillSession? _prefill;
    private Func<Prefilled>? _finishPrefill;
    private KvCache? _plainCache;
    private SpeculativeSession? _spec;
    private PlainSession? _plain;
    private SpeculationOptions? _options;
    private bool _treeStep;

    // The calibration rows of the prompt's positions, kept for the prefix cache (null when not calibrating).
    private List<TopRows>? _promptRows;

    // A tree that came before the verdict it follows (the verifier tells the drafter and the device at once).
    private DrafterProtocol.Proposal? _early;

    public SessionRun Id { get; } = id;

    public DeviceProtocol.Run Run { get; } = run;

    public Generate Request => Run.Request;

    public IActorRef ReplyTo { get; } = replyTo;

    public bool Speculative => Request.Method != "ar";

    public bool Decoding => _spec is not null || _plain is not null;

    /// <summary>Decoding plainly (method ar): it can share a packed device run with other such sessions.</summary>
    public bool PlainDecoding => _plain is { Done: false };

    /// <summary>
    /// The next step is one token on the width-1 graph: plain decoding, or a speculative step that verifies its
    /// root alone. Such steps of several sessions share one packed run.
    /// </summary>
    public bool NarrowPackable => PlainDecoding || (_spec?.NextStepNarrow ?? false);

    /// <summary>The KV bucket of this session's next width-1 step.</summary>
    public int NarrowBucket => _plain?.NextStepBucket ?? _spec?.BucketFor(1) ?? 0;

    /// <summary>Tells a speculative session what a width-1 step would cost it in a packed run (null: alone); between steps.</summary>
    public void PriceNarrowStep(double? ms)
    {
        if (_spec is not null)
        {
            _spec.NarrowCostMs = ms;
        }
    }

    /// <summary>The width of this speculative session's next step when it is a tree (0 otherwise): sessions whose next trees have one width can share a packed run.</summary>
    public int NextTreeWidth => _spec?.NextTreeWidth ?? 0;

    /// <summary>The KV bucket of this speculative session's next tree step.</summary>
    public int TreeBucket(int width) => _spec?.BucketFor(width) ?? 0;

    public bool Finished => (_spec?.Done ?? false) || (_plain?.Done ?? false);

    public int PendingCount => _pending.Count;

    /// <summary>The device waits for this stream's channel to have room (its reader is behind).</summary>
    public bool AwaitingRoom { get; set; }

    /// <summary>The registration that tells the device when this request is cancelled; disposed with the run.</summary>
    public CancellationTokenRegistration CancellationWake { get; set; }

    /// <summary>A device step of this session is running: nothing else touches it until the step's completion arrives.</summary>
    public bool Stepping { get; set; }

    /// <summary>The next step needs the drafter's tree, not here yet.</summary>
    public bool WaitingForTree => _spec?.NeedsProposal ?? false;

    /// <summary>The step whose verdict the session waits for; null when none.</summary>
    public int? AwaitingStep => _spec?.AwaitingStep;

    /// <summary>A verdict that arrived while the step's device run was still finishing.</summary>
    public TreeVerdict? Verdict { get; set; }

    /// <summary>The verifier could not verify the step, and said so while the step's device run was still finishing.</summary>
    public Exception? VerifyFailure { get; set; }

    /// <summary>Other sessions were decoding when this step was scheduled (the calibrator then builds in slices).</summary>
    public bool OthersDecoding { get; set; }

    /// <summary>Prompt tokens not prefilled yet (all of them before its first chunk; 0 once it decodes).</summary>
    public int PrefillTokensLeft => Decoding ? 0 : _prefill?.Remaining ?? Request.Prompt.Count;

    /// <summary>Prompt tokens whose keys and values came from the prefix cache (known after the first prefill step).</summary>
    public int CachedTokens { get; private set; }

    /// <summary>
    /// Bytes the prefix cache may hold while this session prefills: the KV budget less every running
    /// session's cache, this one's included (set by the scheduler before a prefill step).
    /// </summary>
    public long PrefixRoom { get; set; }

    /// <summary>Tokens in this session's next prefill chunk, set by the scheduler (0 = the prefill width).</summary>
    public int ChunkWidth { get; set; }

    /// <summary>Ready for a device step: not finished, its tokens all in its channel, no verdict or tree awaited.</summary>
    public bool Ready => !Finished && _pending.Count == 0 && AwaitingStep is null && !WaitingForTree;

    /// <summary>A speculative run is admitted: the drafter indexes its prompt while the device prefills it.</summary>
    public void Open()
    {
        if (!Speculative)
        {
            return;
        }

        var r = Request;
        _options = SpeculationOptions.ForRequest(r.Method, r.Width, r.AdaptiveWidth, Run.Context is not null) with { WidthCostMs = emulate is null ? null : emulate.StepMs };
        roles.Drafter.Tell(new DrafterProtocol.Open(Id, r.Prompt.Tokens, r.MaxTokens, r.Method, r.Width, r.AdaptiveWidth, Run.Context, r.Trace), roles.Device);
    }

    /// <summary>
    /// The drafter's tree for the next step: taken if this session waits for it, kept if it came before the
    /// verdict it follows (the verifier tells the drafter and the device at once), else stale and dropped.
    /// </summary>
    public void Offer(DrafterProtocol.Proposal p)
    {
        if (Stepping || _spec?.AwaitingStep is not null)
        {
            _early = p; // its step is still running, or its verdict is still on the way: taken after the verdict
            return;
        }

        if (_spec is { } s && p.Step == s.Steps + 1 && s.NeedsProposal)
        {
            s.Offer(p.Tree);
        }
    }

    /// <summary>The first token's advance for the drafter (after the prefill), or null when nothing will be drafted.</summary>
    public DrafterProtocol.Advance? FirstAdvance()
    {
        if (_spec is null || _spec.Done)
        {
            return null;
        }

        var (outcome, committed) = _spec.TakeAdvance();
        return new DrafterProtocol.Advance(Id, _spec.Steps, outcome, [.. committed]);
    }

    /// <summary>The graph width the next step runs on: the verification width, one plain token, or the wide prefill graph.</summary>
    public int StepWidth(OrtModelRuntime runtime) =>
        _spec is not null ? _options!.Width : _plain is not null ? 1 : ChunkWidth > 0 ? ChunkWidth : runtime.Widths.Max();

    /// <summary>Ends the session's step with its verdict: keeps the accepted keys/values, emits the tokens (mailbox thread).</summary>
    public void ApplyVerdict()
    {
        var v = Verdict!;
        Verdict = null;
        int before = _spec!.Output.Count;
        _spec.Apply(v);
        _spec.TakeAdvance(); // the verifier told the drafter already
        if (_early is { } early)
        {
            _early = null;
            Offer(early);
        }

        int emitted = _spec.Output.Count - before;
        if (emitted > 0)
        {
            Telemetry.Tokens.Add(emitted, new KeyValuePair<string, object?>("method", Request.Method));
        }

        if (_treeStep)
        {
            Telemetry.AcceptedLength.Record(v.Emitted.Length);
        }
    }

    /// <summary>One device step (off the mailbox thread), traced: a span per step (child of the caller's trace) and busy-time metrics.</summary>
    /// <param name="prefix">The device's prefix cache (null: off); used on the first and last prefill steps only.</param>
    public void StepOnce(OrtModelRuntime runtime, Generator plain, SpeculativeDecoder spec, IReadOnlySet<int> stops, PrefixCache? prefix)
    {
        string kind = Decoding ? (_spec is not null ? "device_run" : "decode") : "prefill_chunk";
        using var span = Telemetry.Source.StartActivity($"coordgen.{kind}", ActivityKind.Internal, Request.Trace);
        span?.SetTag("coordgen.session", Request.SessionId.Value);
        span?.SetTag("coordgen.method", Request.Method);
        long t0 = Stopwatch.GetTimestamp();
        int before = (_spec?.Output.Count ?? 0) + (_plain?.Output.Count ?? 0);
        try
        {
            StepCore(runtime, plain, spec, stops, prefix);
        }
        catch (Exception ex)
        {
            span?.SetStatus(ActivityStatusCode.Error, ex.Message);
            throw;
        }
        finally
        {
            Telemetry.DeviceBusy.Add(Stopwatch.GetElapsedTime(t0).TotalSeconds, new KeyValuePair<string, object?>("step", kind));
            int emitted = (_spec?.Output.Count ?? 0) + (_plain?.Output.Count ?? 0) - before;
            if (emitted > 0)
            {
                Telemetry.Tokens.Add(emitted, new KeyValuePair<string, object?>("method", Request.Method));
                span?.SetTag("coordgen.tokens", emitted);
            }
        }
    }

    /// <summary>
    /// One device step off the mailbox thread: <paramref name="pick"/>'s own step, or a packed run of
    /// <paramref name="group"/> (plain when <paramref name="packWidth"/> is 1, else trees of that width);
    /// with <paramref name="paceMs"/> &gt; 0 the step is held until that long has passed (what-if pacing).
    /// Returns its Stopwatch timestamps and whether it overran the pace.
    /// </summary>
    public static (long Start, long End, bool Overran) RunStep(DeviceSession pick, List<DeviceSession>? group, int packWidth, OrtModelRuntime runtime,
        Generator plain, SpeculativeDecoder spec, IReadOnlySet<int> stops, PrefixCache? prefix, double paceMs)
    {
        long start = Stopwatch.GetTimestamp();
        if (group is null)
        {
            pick.StepOnce(runtime, plain, spec, stops, prefix);
        }
        else if (packWidth == 1)
        {
            StepPacked(group, runtime);
        }
        else
        {
            StepPackedTrees(group, packWidth);
        }

        double left = paceMs - Stopwatch.GetElapsedTime(start).TotalMilliseconds;
        if (paceMs > 0 && left > 0)
        {
            Thread.Sleep(TimeSpan.FromMilliseconds(left));
        }

        return (start, Stopwatch.GetTimestamp(), paceMs > 0 && left < 0);
    }

    /// <summary>One packed device run for several plain sessions (off the mailbox thread, like <see cref="StepOnce"/>): traced as one span, each session's tokens counted under its method.</summary>
    public static void StepPacked(IReadOnlyList<DeviceSession> group, OrtModelRuntime runtime)
    {
        using var span = Telemetry.Source.StartActivity("coordgen.decode_packed", ActivityKind.Internal, group[0].Request.Trace);
        span?.SetTag("coordgen.sessions", group.Count);
        span?.SetTag("coordgen.session_ids", string.Join(',', group.Select(a => a.Request.SessionId.Value)));
        long t0 = Stopwatch.GetTimestamp();
        int before = group.Sum(a => a._plain?.Output.Count ?? 0);
        try
        {
            // Plain sessions' next tokens and speculative sessions' root-alone steps, each in its own slot.
            NarrowSteps.RunPacked(runtime, [.. group.Select(a => a._plain ?? a._spec!.BeginNarrow())]);
            foreach (var a in group.Where(a => a._spec is not null))
            {
                a._treeStep = false;
                a.Verify(a._spec!.TakeNarrow(), 1);
            }
        }
        catch (Exception ex)
        {
            span?.SetStatus(ActivityStatusCode.Error, ex.Message);
            throw;
        }
        finally
        {
            Telemetry.DeviceBusy.Add(Stopwatch.GetElapsedTime(t0).TotalSeconds, new KeyValuePair<string, object?>("step", "decode_packed"));
            Telemetry.Tokens.Add(group.Sum(a => a._plain?.Output.Count ?? 0) - before, new KeyValuePair<string, object?>("method", "ar"));
        }
    }

    /// <summary>
    /// One packed device run for several speculative sessions' trees of one width (off the mailbox thread):
    /// each tree in its own slot against its own cache, then each to the verifier, as <see cref="StepOnce"/> does for one.
    /// </summary>
    public static void StepPackedTrees(IReadOnlyList<DeviceSession> group, int width)
    {
        using var span = Telemetry.Source.StartActivity("coordgen.device_run_packed", ActivityKind.Internal, group[0].Request.Trace);
        span?.SetTag("coordgen.sessions", group.Count);
        span?.SetTag("coordgen.width", width);
        span?.SetTag("coordgen.session_ids", string.Join(',', group.Select(a => a.Request.SessionId.Value)));
        long t0 = Stopwatch.GetTimestamp();
        try
        {
            var trees = SpeculativeSession.BeginPacked([.. group.Select(a => a._spec!)], width, ownRows: true);
            for (int i = 0; i < group.Count; i++)
            {
                group[i]._treeStep = trees[i].Tokens.Length > 0;
                group[i].Verify(trees[i], width);
            }

            Thread.Yield(); // as in StepOnce: the verifier's worker gets this core now
        }
        catch (Exception ex)
        {
            span?.SetStatus(ActivityStatusCode.Error, ex.Message);
            throw;
        }
        finally
        {
            Telemetry.DeviceBusy.Add(Stopwatch.GetElapsedTime(t0).TotalSeconds, new KeyValuePair<string, object?>("step", "device_run_packed"));
        }
    }

    // Acceptance runs on the verifier while the device moves on to other sessions.
    private void Verify(TreeToVerify tree, int outcomeWidth) =>
        roles.Verifier.Tell(new VerifierProtocol.Verify(Id, tree, Request.Sampling, outcomeWidth, Request.Trace), roles.Device);

    private void StepCore(OrtModelRuntime runtime, Generator plain, SpeculativeDecoder spec, IReadOnlySet<int> stops, PrefixCache? prefix)
    {
        var r = Request;
        r.Cancellation.ThrowIfCancellationRequested();
        if (_spec is not null)
        {
            var tree = _spec.BeginStep(r.Cancellation, ownRows: true);
            _treeStep = tree is { Tokens.Length: > 0 };
            if (tree is not null)
            {
                Verify(tree, _spec.PendingOutcomeWidth);

                // ONNX Runtime's threads may hold both cores; give the verifier's worker this core
                // now, or its message can wait for the next scheduler tick (measured: the verdict's
                // round trip while another step runs fell from 1.4-1.7 ms to 0.02-0.03 ms at the median).
                Thread.Yield();
            }

            return;
        }

        if (_plain is not null)
        {
            _plain.Step();
            return;
        }

        if (_prefill is null)
        {
            _sampling.Validate();
            if (r.MaxTokens < 1)
            {
                throw new ArgumentException($"max tokens must be at least 1 (got {r.MaxTokens}).");
            }

            int[] prompt = [.. r.Prompt.Tokens];
            bool calibrating = Speculative && _options!.UseCalibration;

            // Look up first (it marks the chain used), copy the hit into the new cache (below), and only then
            // yield the room this session's cache takes: a trim never frees a block before it is copied.
            var hit = prefix?.Lookup(prompt, calibrating ? _options!.Calibration.TopK : 0);
            CachedTokens = hit?.Tokens ?? 0;
            PrefixMetrics(CachedTokens, prompt.Length - CachedTokens);
            if (!Speculative)
            {
                _plainCache = runtime.CreateCache();
                hit?.CopyInto(_plainCache);
                _prefill = plain.BeginPrefill(_plainCache, prompt[CachedTokens..]);
            }
            else
            {
                // Calibration runs on the calibrator actor: each chunk's top-k rows go there as the device
                // moves on (a cached prefix's rows first), and are kept for the prefix cache.
                var cal = _options!.Calibration;
                var self = Id;
                _promptRows = calibrating && prefix is not null ? [] : null;
                (_prefill, _finishPrefill) = spec.BeginPrefill(prompt, calibrating ? cal : null, rows =>
                {
                    _promptRows?.Add(rows);
                    roles.Calibrator.Tell(new CalibratorProtocol.Chunk(self, rows), roles.Device);
                }, hit);
            }

            Trimmed(prefix, () => prefix!.Trim(PrefixRoom));
        }

        if (!_prefill.Step(ChunkWidth))
        {
            return;
        }

        if (_plainCache is not null)
        {
            Remember(prefix, _plainCache, null);
            var cache = _plainCache;
            _plainCache = null;
            _plain = plain.StartDecode(cache, _prefill.LastLogits, r.Prompt.Count, _prefill.ElapsedMs, r.MaxTokens, _sampling, stops, Enqueue, KeepLogprob);
        }
        else
        {
            using var pre = _finishPrefill!();
            Remember(prefix, pre.Cache, pre.CalibrationFailed ? null : _promptRows);
            _promptRows = null;
            _spec = spec.Start(pre, r.MaxTokens, _sampling, stops, _options!, null, Enqueue, adoptCache: true, onLogprobs: KeepLogprob, externalDrafter: true);
            if (pre.CalibrationDeferred)
            {
                roles.Calibrator.Tell(new CalibratorProtocol.Finish(Id, [.. pre.Prompt], r.Method, r.Width, OthersDecoding, r.Trace), roles.Device);
            }
            else if (pre.CalibrationFailed)
            {
                // It failed during the prefill: the drafter goes on without it.
                roles.Calibrator.Tell(new CalibratorProtocol.Cancel(Id), roles.Device);
                roles.Drafter.Tell(new DrafterProtocol.Calibrated(Id, null, 0), roles.Device);
            }
        }
    }

    /// <summary>
    /// The prompt's whole blocks go into the prefix cache, before decoding writes past them, and those of a
    /// context store's documents are pinned for the store (<see cref="Generate.KeepPrefix"/>). The cache is
    /// an optimisation: if keeping them fails (memory), the request goes on without (the cache stays
    /// consistent: a block enters whole or not at all).
    /// </summary>
    private void Remember(PrefixCache? prefix, KvCache cache, List<TopRows>? rows)
    {
        if (prefix is null)
        {
            return;
        }

        try
        {
            int[] prompt = [.. Request.Prompt.Tokens];
            Trimmed(prefix, () => prefix.Insert(prompt, cache, rows is { Count: > 0 } ? PrefixCache.Join(rows) : null, PrefixRoom));
            if (Request.KeepPrefix is { } pin)
            {
                prefix.Pin(pin.Owner, pin.Generation, prompt, pin.Tokens);
                Telemetry.PrefixPinnedBlocks = prefix.PinnedBlocks;
            }
        }
        catch (Exception ex) when (ex is not OperationCanceledException)
        {
            Telemetry.Source.StartActivity("coordgen.prefix_cache_insert_failed", ActivityKind.Internal, Request.Trace)?.SetStatus(ActivityStatusCode.Error, ex.Message).Dispose();
        }
    }

    /// <summary>Runs a change to the prefix cache and reports the blocks it evicted and the bytes it holds.</summary>
    private static void Trimmed(PrefixCache? prefix, Action change)
    {
        if (prefix is null)
        {
            return;
        }

        long evicted = prefix.Evictions;
        change();
        Telemetry.PrefixEvictions.Add(prefix.Evictions - evicted);
        Telemetry.PrefixBytes = prefix.Bytes;
        Telemetry.PrefixPinnedBlocks = prefix.PinnedBlocks;
    }

    private static void PrefixMetrics(int cached, int prefilled)
    {
        Telemetry.PrefixLookups.Add(1, new KeyValuePair<string, object?>("result", cached > 0 ? "hit" : "miss"));
        Telemetry.PrefixTokens.Add(cached, new KeyValuePair<string, object?>("source", "cache"));
        Telemetry.PrefixTokens.Add(prefilled, new KeyValuePair<string, object?>("source", "prefill"));
    }

    // The session reports a token's log-probabilities just before the token (on the same thread).
    private void KeepLogprob(TokenLogprobs lp) =>
        _logprob = new TokenLogprob(lp.Logprob, [.. lp.Top.Select(t => new TokenAlternative(t.Token, t.Logprob))]);

    private bool Enqueue(int token)
    {
        _pending.Enqueue(new GeneratedToken(token, _logprob));
        _logprob = null;
        return !Request.Cancellation.IsCancellationRequested;
    }

    /// <summary>Moves queued tokens into the channel while it has room (mailbox thread, never while stepping).</summary>
    public void Flush()
    {
        while (!Stepping && _pending.TryPeek(out var t) && Request.Output.TryWrite(t))
        {
            _pending.Dequeue();
        }
    }

    public GenerationCompleted Completed()
    {
        var r = Request;
        if (_plain is not null)
        {
            var p = _plain.Result();
            return new GenerationCompleted(r.SessionId, TokenSequence.From(p.Tokens), p.Stats.StopReason, p.Stats.PrefillMs, p.Stats.DecodeMs, null) { CachedTokens = CachedTokens };
        }

        var s = _spec!.Result();
        var a = s.Accounting;
        var sources = Enum.GetValues<DraftSource>();
        var report = new SpeculationReport(r.Method, r.Width, a.Steps, a.MeanAccepted,
            sources.ToImmutableDictionary(x => x.ToString().ToLowerInvariant(), a.Proposed),
            sources.ToImmutableDictionary(x => x.ToString().ToLowerInvariant(), a.Accepted),
            s.DraftMs);
        return new GenerationCompleted(r.SessionId, TokenSequence.From(s.Tokens), s.Stats.StopReason, s.Stats.PrefillMs, s.Stats.DecodeMs, report) { CachedTokens = CachedTokens };
    }

    /// <summary>The run ended: tells the drafter, the verifier and the calibrator it is gone, and releases its cache.</summary>
    public void Close()
    {
        if (Speculative)
        {
            roles.Drafter.Tell(new DrafterProtocol.Close(Id), roles.Device);
            roles.Verifier.Tell(new VerifierProtocol.Forget(Id), roles.Device);
            if (_options is { UseCalibration: true })
            {
                // Whatever the calibrator still holds for this run (chunks, or a build under way) is dropped.
                roles.Calibrator.Tell(new CalibratorProtocol.Cancel(Id), roles.Device);
            }
        }

        Dispose();
    }

    /// <summary>Releases the cache (the device stopping: its children stop with it).</summary>
    public void Dispose()
    {
        CancellationWake.Dispose();
        _plainCache?.Dispose();
        _plain?.Dispose();
        _spec?.Dispose();
        if (_spec is null && _finishPrefill is not null && _prefill is { Done: false })
        {
            // A prefill abandoned half way: release its cache.
            _finishPrefill().Dispose();
        }
    }
}

/// <summary>The device's children and itself, as its sessions address them.</summary>
internal sealed record DeviceRoles(IActorRef Device, IActorRef Drafter, IActorRef Calibrator, IActorRef Verifier);
