using Akka.Actor;
using CoordGen.Engine.Generation;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Scheduling;
using CoordGen.Engine.Speculative;
using CoordGen.Messages;
using static CoordGen.Messages.GenerationProtocol;
using static CoordGen.Messages.SupervisionProtocol;

namespace CoordGen.Actors.Device;

/// <summary>
/// Owns the accelerator: the compiled graphs (an <see cref="OrtModelRuntime"/>), every running request's
/// KV cache and batch assembly. Requests are interleaved step by step: each device step is one prefill
/// chunk, one decode step (a verified token tree, or one plain token) of one session, or one packed run of
/// several plain sessions, chosen by <see cref="StepPolicy"/>. Steps run off the mailbox thread, one at a
/// time. Its children do the CPU work beside the steps: the drafter (trees, from drafting state it owns),
/// the verifier (acceptance, sampling streams) and the calibrator. Tokens are queued per session and sent
/// to its session actor from the mailbox; a run with a window of tokens (<see cref="DeviceProtocol.DefaultStreamWindow"/>) not
/// yet acknowledged (its reader lags) is skipped until they are (backpressure that pauses only that
/// stream). A failure is a reply for that request, not a crash.
/// </summary>
public sealed partial class DeviceActor : ReceiveActor
{
    private readonly RuntimeKeeper _runtimes;
    private readonly IReadOnlySet<int> _stopTokens;
    private readonly RunQueues _queues;
    private readonly Dictionary<SessionRun, DeviceSession> _byId = [];

    // Runs as their sessions name them: the session actor and the attempt.
    private readonly Dictionary<(IActorRef Session, int Attempt), DeviceSession> _byAttempt = [];
    private readonly DeviceTimeline _timeline = new();
    private readonly int _interleavedChunkWidth;
    private readonly DeviceProfile? _emulate;
    private PackingMode _packing;
    private readonly bool _packTrees;
    private bool _mixedSteps;
    private readonly bool _mixedTrees;
    private bool _widthBudget = true;
    private readonly DevicePrefixCache _prefix;
    private readonly int _streamWindow;
    private OrtModelRuntime? _runtime;
    private Generator? _plain;
    private SpeculativeDecoder? _spec;
    private DeviceRoles? _roles;
    private bool _busy;
    private Task? _inflight;
    private long _runs;
    private int _sinceChunk;
    private long _holdSince;
    private long _chunkHoldSince;
    private bool _holdTimer;

    /// <param name="emulate">What-if pacing: every device step lasts at least what this accelerator
    /// profile gives for the step's graph width (the real step runs, then the device waits out the
    /// rest), so overlap and scheduling experiments see an NPU's step times. Null: real timings.</param>
    /// <param name="runtimes">Where the device borrows its runtime and gives it back when it stops, so a restarted device can take the same compiled graphs.</param>
    /// <param name="maxActiveSessions">Sessions holding a KV cache at once (the KV memory budget over one
    /// cache's bytes); later runs wait in admission order, resumed ones first. 0 = no limit.</param>
    /// <param name="packing">Whether plain decoding sessions ready together share one device run (a packed
    /// graph: each in its own slot against its own cache), instead of one run each.</param>
    /// <param name="packTrees">Whether speculative sessions' trees share packed runs too, at one width per run (always with <see cref="PackingMode.Always"/>; <see cref="Packing.Group"/>).</param>
    /// <param name="mixedSteps">Whether, with packing, sessions whose next step is one token ride in a prefill chunk's run (<see cref="Packing.Riders"/>, decision 0026).</param>
    /// <param name="mixedTrees">Whether, with <paramref name="mixedSteps"/> and <paramref name="packTrees"/>, speculative sessions' trees ride too when no plain session is ready, a chunk waiting a moment for them (decision 0029).</param>
    /// <param name="prefixCacheBudget">The KV memory budget a prefix cache shares with the sessions' caches
    /// (it holds at most this less the running sessions' caches, evicting least recently used blocks);
    /// 0 = no prefix cache. The cache lives and dies with this device.</param>
    /// <param name="streamWindow">Tokens of a run that may be unacknowledged by its session before the run pauses (0 = <see cref="DeviceProtocol.DefaultStreamWindow"/>).</param>
    public DeviceActor(RuntimeKeeper runtimes, IReadOnlySet<int> stopTokens, DeviceProfile? emulate = null, int interleavedChunkWidth = 0, int maxActiveSessions = 0, PackingMode packing = PackingMode.Off, bool packTrees = false, long prefixCacheBudget = 0, int streamWindow = 0, bool mixedSteps = true, bool mixedTrees = false)
    {
        _mixedSteps = mixedSteps;
        _mixedTrees = mixedTrees;
        _streamWindow = streamWindow > 0 ? streamWindow : DeviceProtocol.DefaultStreamWindow;
        _prefix = new DevicePrefixCache(prefixCacheBudget);
        _interleavedChunkWidth = interleavedChunkWidth;
        _packing = packing;
        _packTrees = packTrees || packing == PackingMode.Always;
        _queues = new RunQueues(maxActiveSessions);
        _runtimes = runtimes;
        _stopTokens = stopTokens;
        _emulate = emulate;
        Receive<DeviceProtocol.Run>(r => Admit(r, Sender));
        Receive<DeviceProtocol.ReleasePrefix>(r => _prefix.Release(r.Owner, r.ThroughGeneration));
        Receive<StepDone>(OnStepDone);
        Receive<HoldEnded>(_ =>
        {
            _holdTimer = false;
            Schedule();
        });
        Receive<Terminated>(t =>
        {
            foreach (var s in _byAttempt.Where(kv => kv.Key.Session.Equals(t.ActorRef)).Select(kv => kv.Value))
            {
                s.Cancel();
            }

            Schedule();
        });
        Receive<DeviceProtocol.CancelRun>(c => Named(c.Attempt, s => s.Cancel()));
        Receive<DeviceProtocol.Delivered>(d => Named(d.Attempt, s =>
        {
            s.Delivered(d.Count);
            s.Flush();
        }));
        Receive<DrafterProtocol.Proposal>(OnProposal);
        Receive<VerifierProtocol.Verified>(OnVerified);
        Receive<VerifierProtocol.VerifyFailed>(OnVerifyFailed);
        ReceiveDiagnostics();
    }

    /// <summary>A device whose runtime a restarted device borrows again (the runtime's owner disposes <paramref name="runtimes"/>).</summary>
    /// <param name="interleavedChunkWidth">Tokens per prefill chunk while other sessions decode
    /// (<see cref="StepPolicy.ChunkWidth"/>); 0 = always the runtime's widest graph.</param>
    public static Props Props(RuntimeKeeper runtimes, IReadOnlySet<int> stopTokens, DeviceProfile? emulate = null, int interleavedChunkWidth = 0, int maxActiveSessions = 0, PackingMode packing = PackingMode.Off, bool packTrees = false, long prefixCacheBudget = 0, int streamWindow = 0, bool mixedSteps = true, bool mixedTrees = false)
        => Akka.Actor.Props.Create(() => new DeviceActor(runtimes, stopTokens, emulate, interleavedChunkWidth, maxActiveSessions, packing, packTrees, prefixCacheBudget, streamWindow, mixedSteps, mixedTrees));

    /// <summary>A device that builds its own runtime and disposes it when it stops (each restart compiles again).</summary>
    public static Props Props(Func<OrtModelRuntime> createRuntime, IReadOnlySet<int> stopTokens, DeviceProfile? emulate = null, int interleavedChunkWidth = 0, int maxActiveSessions = 0, PackingMode packing = PackingMode.Off, bool packTrees = false, long prefixCacheBudget = 0, int streamWindow = 0, bool mixedSteps = true, bool mixedTrees = false)
        => Props(new RuntimeKeeper(createRuntime, reuse: false), stopTokens, emulate, interleavedChunkWidth, maxActiveSessions, packing, packTrees, prefixCacheBudget, streamWindow, mixedSteps, mixedTrees);

    protected override void PreStart()
    {
        _runtime = _runtimes.Borrow();
        _plain = new Generator(_runtime);
        _spec = new SpeculativeDecoder(_runtime);
        var drafter = Context.ActorOf(DrafterActor.Props(_runtime.Faults), "drafter");
        _roles = new DeviceRoles(Self, drafter, Context.ActorOf(CalibratorActor.Props(drafter), "calibrator"), Context.ActorOf(VerifierActor.Props(drafter), "verifier"));
    }

    // The drafter, verifier and calibrator answer every job, failures included; an exception that escapes
    // one of them loses the job it was on (a session would wait for it forever). So it escalates: the
    // device fails, its back-off supervisor starts a new one, and every request resumes from its
    // committed tokens.
    protected override SupervisorStrategy SupervisorStrategy() => new OneForOneStrategy(_ => Directive.Escalate);

    protected override void PostStop()
    {
        var sessions = _queues.All.ToList();

        // Stopped or crashed with requests on it: each is told the device is restarting, and its session
        // actor resumes it from the tokens it has committed after a pause (by then the back-off
        // supervisor knows this device is gone, so the retry is not forwarded to it).
        foreach (var s in sessions)
        {
            s.ReplyTo.Tell(new DeviceProtocol.Ended(s.Run.Attempt, Restarting: true));
        }

        // A step still running off the mailbox thread (the actor stopped or restarts mid-step) uses the
        // runtime and its session's cache: free them when it ends, never under it. The runtime goes back
        // to the keeper then too, for the next device (unless that step failed).
        void Release() => sessions.ForEach(s => s.Dispose());
        if (_inflight is { IsCompleted: false } step)
        {
            step.ContinueWith(_ => Release(), TaskScheduler.Default);
        }
        else
        {
            Release();
        }

        if (_runtime is { } runtime)
        {
            _runtimes.GiveBack(runtime, _inflight);
        }
    }

    private void Admit(DeviceProtocol.Run run, IActorRef replyTo)
    {
        var session = new DeviceSession(new SessionRun(run.Request.SessionId, ++_runs), run, replyTo, _roles!, _emulate, _streamWindow);
        _byId[session.Id] = session;
        _byAttempt[(replyTo, run.Attempt)] = session;

        // The session learns which device holds its attempt (it cancels here directly), and a session that
        // stops without its attempt ending has that attempt cancelled (DeathWatch, across nodes too).
        replyTo.Tell(new DeviceProtocol.Admitted(run.Attempt));
        Context.Watch(replyTo);
        session.Open();
        _queues.Admit(session);
        Schedule();
    }

    /// <summary>Applies a session's message to its run (an attempt this device does not hold is ignored), then schedules.</summary>
    private void Named(int attempt, Action<DeviceSession> apply)
    {
        if (_byAttempt.TryGetValue((Sender, attempt), out var s))
        {
            apply(s);
            Schedule();
        }
    }

    private void Schedule()
    {
        if (_busy)
        {
            return;
        }

        Retire();
        _prefix.BetweenSteps();
        _queues.StartWaiting();
        var (prefilling, decoding) = (_queues.Prefilling, _queues.Decoding);

        // Every decoding session counts, ready or not: one stream briefly waiting (for its tree or its
        // reader) must not bring the next chunk a step early, or another stream's gap holds two chunks.
        var runtime = _runtime!;
        var c = runtime.Config;
        long perSession = KvCache.BytesFor(c.NumLayers, c.NumKvHeads, c.HeadDim, runtime.Capacity, runtime.Kv);
        _prefix.TrimPool(runtime.CachePool, prefilling.Count + decoding.Count, perSession);
        int wide = runtime.Widths.Max(), interleaved = _interleavedChunkWidth > 0 ? _interleavedChunkWidth : wide;

        // The sessions that would ride in the next chunk's run (decision 0026), speculative ones' roots alone when riding
        // is priced below their trees (decision 0033); when they are every ready one and no speculative session's verdict
        // or tree is on its way (its tree would wait out the chunk; not so for roots riding without one), the chunk serves
        // the streams as a decode step would.
        int chunkWidth = StepPolicy.ChunkWidth(decoding.Count, wide, interleaved);
        var chunk = _mixedSteps && prefilling.Count > 0 ? prefilling[0] : null;
        var riders = chunk is not null ? StepPrices.ForChunk(_packing, _packTrees, _mixedTrees, runtime, chunk, decoding, chunkWidth) : null;
        bool carries = riders is not null && riders.Count - 1 == decoding.Count(s => s.Ready && !s.Cancellation.IsCancellationRequested) && !decoding.Any(s => s.Coming && !s.RootAloneRides);
        var snapshot = new QueueSnapshot(prefilling.Count, prefilling.Sum(s => s.PrefillTokensLeft), decoding.Count, decoding.Count(s => s.Ready),
            _sinceChunk, wide, interleaved, carries, _chunkHoldSince != 0);
        var choice = StepPolicy.Rebalance(snapshot);
        bool decode = choice == StepChoice.Decode;
        if (decode)
        {
            StepPrices.Price(_packing, _packTrees, runtime, decoding, null, 0); // before any width is read
        }

        // Both asked every time, so each resets its wait when it does not hold.
        var (decodeHold, chunkHold) = (Packing.Hold(_packing, _packTrees && decode, runtime, decoding, ref _holdSince),
            Packing.HoldChunk(_packing, _packTrees && _mixedSteps && _mixedTrees, runtime, choice.Prefill ? prefilling.FirstOrDefault() : null, decoding, chunkWidth, ref _chunkHoldSince));
        if ((decodeHold ?? chunkHold) is { } left)
        {
            if (!_holdTimer)
            {
                _holdTimer = true;
                Task.Delay(left).PipeTo(Self, success: () => HoldEnded.Instance);
            }

            return; // woken by the sessions on their way, or by the hold's end
        }

        _timeline.Decided(snapshot, choice);
        bool prefill = choice.Prefill;
        var pick = prefill ? prefilling[0] : decode ? _queues.NextDecode() : null;
        if (pick is null)
        {
            return; // woken by a tree, a verdict, an acknowledgement or a new run
        }

        _sinceChunk = prefill ? 0 : _sinceChunk + 1;
        if (prefill)
        {
            pick.ChunkWidth = choice.PrefillTokens;
            pick.PrefixRoom = _prefix.Room(prefilling.Count + decoding.Count, perSession);
        }

        int packWidth = 0;
        var group = prefill ? (_mixedSteps ? Packing.Riders(_packing, _packTrees && _mixedTrees, runtime, pick, decoding, chunkWidth, chosen: true, out packWidth) : null) : Packing.Group(_packing, _packTrees, runtime, pick, _queues.Decoding, out packWidth, _widthBudget, _timeline.DecidedWidth);
        _busy = true;
        foreach (var s in group ?? [pick])
        {
            s.Stepping = true;
        }

        pick.OthersDecoding = decoding.Count > (prefill ? 0 : 1); // a decode step's session is one of them
        var (plain, spec, stops, self, prefix) = (_plain!, _spec!, _stopTokens, Self, prefill ? _prefix.ForPrefill : null);
        double paceMs = _emulate?.StepMs(pick.StepWidth(runtime)) ?? 0;
        var step = Task.Run(() => DeviceSteps.Run(pick, group, packWidth, runtime, plain, spec, stops, prefix, paceMs));
        _inflight = step;
        step.PipeTo(self, success: t => new StepDone(pick, group, prefill, null, t.Start, t.End, t.Overran, t.RidersMs),
            failure: ex => new StepDone(pick, group, prefill, ex, 0, 0, false, 0));
    }

    private void OnStepDone(StepDone done)
    {
        _busy = false;
        _inflight = null;
        AnswerStatsAskers();
        _timeline.Step(done.Start, done.End, done.Prefill, done.Prefill ? 1 : done.Group?.Count ?? 1, done.Prefill ? (done.Group?.Count ?? 1) - 1 : 0, done.RidersMs);
        if (_emulate is not null && done.Error is null)
        {
            _timeline.Paced(done.Overran);
        }

        var error = done.Error is AggregateException { InnerException: { } inner } ? inner : done.Error;
        foreach (var s in done.Group ?? [done.Session])
        {
            s.Stepping = false;
            if ((error ?? s.StepFailure) is { } cause)
            {
                Finish(s, DeviceReplies.For(s.Request, cause));
            }
            else if (s.Verdict is not null)
            {
                // The verifier answered before the step's own completion arrived.
                ApplyVerdict(s);
            }
            else if (s.Decoding && _queues.StartDecoding(s) && s.FirstAdvance() is { } first)
            {
                _roles!.Drafter.Tell(first); // its first tree, from the first token on
            }
        }

        Schedule();
    }

    /// <summary>Flushes queued tokens; finishes sessions that are done (and flushed) or cancelled. Sessions being stepped wait for their step's end.</summary>
    private void Retire()
    {
        foreach (var s in _queues.All.Where(s => !s.Stepping).ToList())
        {
            s.Flush();
            if (s.Cancellation.IsCancellationRequested)
            {
                Finish(s, new GenerationFailed(s.Request.SessionId, FailureKind.Cancelled, "the request was cancelled by the caller"));
            }
            else if (s.Finished && s.PendingCount == 0)
            {
                Finish(s, s.Completed());
            }
        }
    }

    private void Finish(DeviceSession s, object reply)
    {
        _queues.Remove(s);
        _byId.Remove(s.Id);
        _byAttempt.Remove((s.ReplyTo, s.Run.Attempt));
        s.Close();
        s.ReplyTo.Tell(new DeviceProtocol.Ended(s.Run.Attempt, reply as GenerationCompleted, reply as GenerationFailed));
    }

    // The device's own message: a step's end, piped from its task.

    /// <summary>A decode step's wait for speculative sessions on their way has run out (<see cref="Packing.Hold"/>).</summary>
    private sealed class HoldEnded
    {
        public static readonly HoldEnded Instance = new();
    }

    /// <summary>A step ended: <paramref name="Session"/>'s, or a packed run of <paramref name="Group"/> (a prefill chunk's: the chunk's session and its riders); timestamps for the timeline, and of the step's time what riders are charged.</summary>
    private sealed record StepDone(DeviceSession Session, List<DeviceSession>? Group, bool Prefill, Exception? Error, long Start, long End, bool Overran, double RidersMs);
}
