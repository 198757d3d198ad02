using System.Collections.Concurrent;
using System.Collections.Immutable;
using System.Diagnostics;
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
/// Owns the accelerator: the compiled graphs (an <see cref="OrtModelRuntime"/>) and every running
/// request's KV cache. Requests are interleaved step by step: each device step is one prefill chunk or
/// one decode step (a verified token tree, or one plain token) of one session, chosen by
/// <see cref="StepPolicy"/> (round-robin among decoding sessions, prefill chunks by queue depth).
/// Steps run off the mailbox thread, one at a time. Tokens are queued per session and written to its
/// channel from the mailbox; a session whose reader lags is skipped until its channel has room
/// (backpressure that pauses only that stream). A failure is a reply for that request, not a crash.
/// </summary>
public sealed class DeviceActor : ReceiveActor, IWithTimers
{
    /// <summary>When plain decoding sessions ready together share one device run.</summary>
    public enum PackingMode
    {
        /// <summary>Never: one session per run.</summary>
        Off,

        /// <summary>When the runtime's recent step times say a packed run costs clearly less per session (<c>CoordGenOptions.PackedSteps</c>).</summary>
        WhenItPays,

        /// <summary>Whenever two or more are ready (tests of the mechanism; graphs compile on first use).</summary>
        Always,
    }

    private readonly RuntimeKeeper _runtimes;
    private readonly IReadOnlySet<int> _stopTokens;
    private readonly List<Active> _prefilling = [];
    private readonly List<Active> _decoding = [];

    // Admitted runs waiting for room under the KV memory budget: they hold no cache until they start.
    private readonly List<Active> _waiting = [];
    private readonly int _maxActive;
    private OrtModelRuntime? _runtime;
    private Generator? _plain;
    private SpeculativeDecoder? _spec;
    private bool _busy;
    private Task? _inflight;
    private int _next;
    private int _sinceChunk;
    private IActorRef _drafter = ActorRefs.Nobody;
    private IActorRef _calibrator = ActorRefs.Nobody;
    private IActorRef _verifier = ActorRefs.Nobody;
    private Active? _lastStepped;
    private readonly List<(long Start, long End)> _deviceIntervals = [];
    private readonly List<(long Start, long End)> _draftIntervals = [];
    private readonly List<(long Start, long End)> _verifyIntervals = [];
    private double _inlineDraftMs;
    private double _prefillMs;
    private double _decodeMs;
    private readonly int _interleavedChunkWidth;
    private PackingMode _packing;
    private const int MaxIntervals = 200_000;

    private readonly DeviceProfile? _emulate;
    private int _paced;
    private int _overran;

    /// <param name="emulate">What-if pacing: every device step lasts at least what this accelerator
    /// profile gives for the step's graph width (the real step runs, then the device waits out the
    /// rest), so overlap and scheduling experiments see an NPU's step times. Null: real timings.</param>
    /// <param name="runtimes">Where the device borrows its runtime and gives it back when it stops, so a restarted device can take the same compiled graphs.</param>
    /// <param name="maxActiveSessions">Sessions holding a KV cache at once (the KV memory budget over one
    /// cache's bytes); later runs wait in admission order, resumed ones first. 0 = no limit.</param>
    /// <param name="packing">Whether plain decoding sessions ready together share one device run (a packed
    /// graph: each in its own slot against its own cache), instead of one run each.</param>
    public DeviceActor(RuntimeKeeper runtimes, IReadOnlySet<int> stopTokens, DeviceProfile? emulate = null, int interleavedChunkWidth = 0, int maxActiveSessions = 0, PackingMode packing = PackingMode.Off)
    {
        _interleavedChunkWidth = interleavedChunkWidth;
        _packing = packing;
        _maxActive = maxActiveSessions;
        _runtimes = runtimes;
        _stopTokens = stopTokens;
        _emulate = emulate;
        Receive<Generate>(g => Admit(new DeviceRun(g, null), Sender));
        Receive<DeviceRun>(r => Admit(r, Sender));
        Receive<StepDone>(OnStepDone);
        Receive<CancellationNoticed>(_ => Schedule());
        Receive<RoomFreed>(r =>
        {
            // No room will come (the channel was completed, the attempt superseded or cancelled): stay parked;
            // Retire removes a cancelled session at the next Schedule.
            r.Session.AwaitingRoom = !r.HasRoom;
            if (r.HasRoom)
            {
                r.Session.Flush();
            }

            Schedule();
        });
        Receive<GetQueues>(_ => Sender.Tell(new Queues(_prefilling.Count, _decoding.Count) { Waiting = _waiting.Count }));
        Receive<Drafted>(OnDrafted);
        Receive<Verified>(OnVerified);
        Receive<VerifyFailed>(OnVerifyFailed);
        Receive<Calibrated>(c =>
        {
            if (c.Key is Active a && (_decoding.Contains(a) || _prefilling.Contains(a)))
            {
                a.OfferCalibration(c);
            }
        });
        Receive<Crash>(_ => throw new InjectedFaultException(FaultKind.DeviceException, "injected: the device actor crashed"));
        Receive<DiagnosticsProtocol.SetPackedSteps>(p => _packing = p.Packed ? PackingMode.WhenItPays : PackingMode.Off);
        Receive<GetOverlap>(_ => Sender.Tell(new Overlap([.. _deviceIntervals], [.. _draftIntervals], _inlineDraftMs) { Verifies = [.. _verifyIntervals], Paced = _paced, Overran = _overran, PrefillMs = _prefillMs, DecodeMs = _decodeMs }));
    }

    public ITimerScheduler Timers { get; set; } = null!;

    /// <summary>A device whose runtime a restarted device borrows again (the runtime's owner disposes <paramref name="runtimes"/>).</summary>
    /// <param name="interleavedChunkWidth">Tokens per prefill chunk while other sessions decode
    /// (<see cref="StepPolicy.ChunkWidth"/>); 0 = always the runtime's widest graph.</param>
    public static Props Props(RuntimeKeeper runtimes, IReadOnlySet<int> stopTokens, DeviceProfile? emulate = null, int interleavedChunkWidth = 0, int maxActiveSessions = 0, PackingMode packing = PackingMode.Off)
        => Akka.Actor.Props.Create(() => new DeviceActor(runtimes, stopTokens, emulate, interleavedChunkWidth, maxActiveSessions, packing));

    /// <summary>A device that builds its own runtime and disposes it when it stops (each restart compiles again).</summary>
    public static Props Props(Func<OrtModelRuntime> createRuntime, IReadOnlySet<int> stopTokens, DeviceProfile? emulate = null, int interleavedChunkWidth = 0, int maxActiveSessions = 0, PackingMode packing = PackingMode.Off)
        => Props(new RuntimeKeeper(createRuntime, reuse: false), stopTokens, emulate, interleavedChunkWidth, maxActiveSessions, packing);

    protected override void PreStart()
    {
        _drafter = Context.ActorOf(DrafterActor.Props(), "drafter");
        _calibrator = Context.ActorOf(CalibratorActor.Props(), "calibrator");
        _verifier = Context.ActorOf(VerifierActor.Props(), "verifier");
        _runtime = _runtimes.Borrow();
        _plain = new Generator(_runtime);
        _spec = new SpeculativeDecoder(_runtime);
    }

    // The drafter, verifier and calibrator answer every job, failures included; an exception that escapes
    // one of them loses the job it was on (a session would wait for it forever). So it escalates: the
    // device fails, its back-off supervisor starts a new one, and every request resumes from its
    // committed tokens.
    protected override SupervisorStrategy SupervisorStrategy() => new OneForOneStrategy(_ => Directive.Escalate);

    protected override void PostStop()
    {
        var actives = _prefilling.Concat(_decoding).Concat(_waiting).ToList();

        // Stopped or crashed with requests on it: each is told the device is restarting, and its session
        // actor resumes it from the tokens it has committed after a pause (by then the back-off
        // supervisor knows this device is gone, so the retry is not forwarded to it).
        foreach (var a in actives)
        {
            a.ReplyTo.Tell(DeviceRestarting.Instance);
        }

        void Release()
        {
            foreach (var a in actives)
            {
                a.Dispose();
            }
        }

        // A step still running off the mailbox thread (the actor stopped or restarts mid-step) uses the
        // runtime and its session's cache: free them when it ends, never under it. The runtime goes back
        // to the keeper then too, for the next device (unless that step failed).
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

    private void Admit(DeviceRun run, IActorRef replyTo)
    {
        var active = new Active(run, replyTo, _calibrator, _drafter, _verifier, Self, _emulate);

        // A caller's cancellation wakes the device (the run may be waiting, or parked on a full channel).
        active.CancellationWake = run.Request.Cancellation.Register(static device => ((IActorRef)device!).Tell(CancellationNoticed.Instance), Self);

        // Runs resuming a session after a fault go first (their callers have waited already), in the
        // waiting line as in the prefill queue.
        // While others wait, a newcomer waits behind them even if a cache has just freed.
        if (_maxActive > 0 && (_waiting.Count > 0 || _prefilling.Count + _decoding.Count >= _maxActive))
        {
            Telemetry.QueueDepth.Add(1, new KeyValuePair<string, object?>("phase", "waiting"));
            Enqueue(_waiting, active);
        }
        else
        {
            Telemetry.QueueDepth.Add(1, new KeyValuePair<string, object?>("phase", "prefill"));
            Enqueue(_prefilling, active);
        }

        Schedule();
    }

    private static void Enqueue(List<Active> queue, Active active)
    {
        if (active.Run.Resumed)
        {
            queue.Insert(queue.Count(a => a.Run.Resumed), active);
        }
        else
        {
            queue.Add(active);
        }
    }

    /// <summary>Starts waiting runs while the KV memory budget has room (a finished session frees its cache).</summary>
    private void StartWaiting()
    {
        while (_waiting.Count > 0 && (_maxActive <= 0 || _prefilling.Count + _decoding.Count < _maxActive))
        {
            var a = _waiting[0];
            _waiting.RemoveAt(0);
            Telemetry.QueueDepth.Add(-1, new KeyValuePair<string, object?>("phase", "waiting"));
            Telemetry.QueueDepth.Add(1, new KeyValuePair<string, object?>("phase", "prefill"));
            Enqueue(_prefilling, a);
        }
    }

    private void Schedule()
    {
        if (_busy)
        {
            return;
        }

        Retire();
        StartWaiting();
        Active? pick = null;
        bool prefill = false;
        // Every decoding session counts, ready or not: one stream briefly waiting (for its drafter or its
        // reader) must not bring the next chunk a step early, or another stream's gap holds two chunks.
        if (StepPolicy.PrefillNext(_prefilling.Count, _decoding.Count, _sinceChunk) && _prefilling.Count > 0)
        {
            pick = _prefilling[0];
            prefill = true;
        }
        else
        {
            pick = StepPolicy.NextDecode(_decoding, ref _next, Ready);
            if (pick is null && _prefilling.Count > 0)
            {
                pick = _prefilling[0];
                prefill = true;
            }
        }

        if (pick is null)
        {
            // Streams whose readers are behind (their channels full) wake the device when their channel has
            // room again, or when their request is cancelled: backpressure by awaiting the channel, no polling.
            // Streams waiting for a draft or a verdict are woken by Drafted / Verified.
            foreach (var a in _decoding)
            {
                if (a.PendingCount > 0 && !a.AwaitingRoom)
                {
                    a.AwaitingRoom = true;
                    var session = a;
                    a.Run.Request.Output.WaitToWriteAsync(a.Run.Request.Cancellation).AsTask()
                        .ContinueWith(t => (object)new RoomFreed(session, t.IsCompletedSuccessfully && t.Result), CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default)
                        .PipeTo(Self);
                }
            }

            return;
        }

        _sinceChunk = prefill ? 0 : _sinceChunk + 1;
        if (prefill)
        {
            int wide = _runtime!.Widths.Max();
            pick.ChunkWidth = StepPolicy.ChunkWidth(_decoding.Count, wide, _interleavedChunkWidth > 0 ? _interleavedChunkWidth : wide);
        }

        // Packed steps: every other plain decoding session ready now rides in the same device run.
        List<Active>? group = null;
        if (_packing != PackingMode.Off && !prefill && pick.PlainDecoding)
        {
            group = [pick, .. _decoding.Where(a => a != pick && a.PlainDecoding && !a.Stepping && Ready(a) && !a.Run.Request.Cancellation.IsCancellationRequested).Take(OrtModelRuntime.PackedSlotCounts[^1] - 1)];
            if (group.Count == 1 || (_packing == PackingMode.WhenItPays && !PackingPays(group)))
            {
                group = null;
            }
        }

        _busy = true;
        pick.Stepping = true;
        foreach (var a in group ?? [])
        {
            a.Stepping = true;
        }

        pick.OthersDecoding = _decoding.Count > (prefill ? 0 : 1); // a decode step's session is one of them
        var self = Self;
        var runtime = _runtime!;
        var plain = _plain!;
        var spec = _spec!;
        var stops = _stopTokens;
        var target = pick;
        var draftJob = DraftJobFor(target);
        var drafter = _drafter;
        double paceMs = _emulate?.StepMs(target.StepWidth(runtime)) ?? 0;
        var step = Task.Run(() =>
            {
                long start = System.Diagnostics.Stopwatch.GetTimestamp();

                // The drafter starts once the device step is under way, so the draft runs during it.
                if (draftJob is not null)
                {
                    drafter.Tell(draftJob, self);
                }

                double inline = 0;
                if (group is null)
                {
                    inline = target.StepOnce(runtime, plain, spec, stops);
                }
                else
                {
                    Active.StepPacked(group);
                }

                bool overran = false;
                if (paceMs > 0)
                {
                    double left = paceMs - System.Diagnostics.Stopwatch.GetElapsedTime(start).TotalMilliseconds;
                    overran = left < 0;
                    if (left > 0)
                    {
                        Thread.Sleep(TimeSpan.FromMilliseconds(left));
                    }
                }

                return (start, System.Diagnostics.Stopwatch.GetTimestamp(), inline, overran);
            });
        _inflight = step;
        step.PipeTo(self, success: t => new StepDone(target, null, t.Item1, t.Item2, t.Item3) { Overran = t.Item4, Prefill = prefill, Group = group },
            failure: ex => new StepDone(target, ex, 0, 0, 0) { Group = group });
    }

    /// <summary>
    /// Packing pays when a packed run costs clearly less per session than a plain run (<see cref="StepPolicy.PackPays"/>): on a model whose steps are
    /// bound by reading its weights, several sessions' rows cost little more than one; on a tiny model bound
    /// by compute and per-operator overhead they may cost more. Decided from the runtime's recent run times
    /// (<see cref="OrtModelRuntime.PackedCostRatio"/>: in the pack's KV bucket, else in the buckets measured so
    /// far); until a slot count is measured at all it packs, to learn, but only onto a graph already compiled (<see cref="OrtModelRuntime.PackedReady"/>
    /// compiles the others in the background): a compile never stalls a step.
    /// </summary>
    private bool PackingPays(List<Active> group)
    {
        int bucket = group.Max(a => a.PlainBucket);
        double? plainMs = _runtime!.RecentRunMs(1, bucket);

        // Steps too short to gain are never packed: no graph compiles for them either.
        if (!StepPolicy.PackPays(null, group.Count, plainMs) || !_runtime.PackedReady(group.Count, 1, bucket))
        {
            return false;
        }

        // Learned per slot count, in this bucket or (until it is measured here) in the others.
        return StepPolicy.PackPays(_runtime.PackedCostRatio(OrtModelRuntime.PackedSlots(group.Count), bucket), group.Count, plainMs);
    }

    /// <summary>
    /// While the device steps <paramref name="busy"/>, the drafter prepares the session that stepped just
    /// before it: in round-robin order that session's turn is furthest away, so its tree is ready long
    /// before it is needed and no one waits for the drafter.
    /// </summary>
    private DraftJob? DraftJobFor(Active busy)
    {
        var candidate = _lastStepped is { CanDraft: true } last && last != busy ? last : null;

        // Any decoding session but the one stepping: while a prefill chunk runs, that includes the
        // session whose decode step comes next.
        for (int i = _decoding.Count - 1; candidate is null && i >= (busy.Decoding ? 1 : 0); i--)
        {
            var a = _decoding[(_next + i) % _decoding.Count];
            if (a != busy && a.CanDraft)
            {
                candidate = a;
            }
        }

        if (candidate is null)
        {
            return null;
        }

        candidate.DraftPending = true;
        return new DraftJob(candidate, candidate.PrepareDraft) { Trace = candidate.Run.Request.Trace, Session = candidate.Run.Request.SessionId };
    }

    private void OnDrafted(Drafted d)
    {
        if (d.Prepared && _draftIntervals.Count < MaxIntervals)
        {
            _draftIntervals.Add((d.Start, d.End));
        }

        if (d.Key is Active a)
        {
            a.DraftPending = false;
            a.DraftReady = d.Prepared;
            Schedule();
        }
    }

    private void OnStepDone(StepDone done)
    {
        _busy = false;
        _inflight = null;
        if (_emulate is not null && done.Error is null)
        {
            _paced++;
            _overran += done.Overran ? 1 : 0;
        }

        if (done.Group is { } group)
        {
            OnPackedStepDone(done, group);
            return;
        }

        var a = done.Active;
        a.Stepping = false;
        a.DraftReady = false;
        _lastStepped = a;
        _inlineDraftMs += done.InlineDraftMs;
        if (done.End != 0)
        {
            double ms = System.Diagnostics.Stopwatch.GetElapsedTime(done.Start, done.End).TotalMilliseconds;
            if (done.Prefill)
            {
                _prefillMs += ms;
            }
            else
            {
                _decodeMs += ms;
            }
        }

        if (done.End != 0 && _deviceIntervals.Count < MaxIntervals)
        {
            _deviceIntervals.Add((done.Start, done.End));
        }

        if (done.Error is { } ex)
        {
            var cause = ex is AggregateException { InnerException: { } inner } ? inner : ex;
            Finish(a, Failure(a.Run.Request, cause), cause);
        }
        else if (a.Verdict is not null)
        {
            // The verifier answered before the step's own completion arrived.
            ApplyVerdict(a);
        }
        else if (a.Decoding && _prefilling.Remove(a))
        {
            _decoding.Add(a);
            Telemetry.QueueDepth.Add(-1, new KeyValuePair<string, object?>("phase", "prefill"));
            Telemetry.QueueDepth.Add(1, new KeyValuePair<string, object?>("phase", "decode"));
        }

        Schedule();
    }

    // A packed step of plain sessions: each flushes its token, or fails alone (its session resumes).
    private void OnPackedStepDone(StepDone done, List<Active> group)
    {
        if (done.End != 0)
        {
            _decodeMs += System.Diagnostics.Stopwatch.GetElapsedTime(done.Start, done.End).TotalMilliseconds;
            if (_deviceIntervals.Count < MaxIntervals)
            {
                _deviceIntervals.Add((done.Start, done.End));
            }
        }

        var cause = done.Error is AggregateException { InnerException: { } inner } ? inner : done.Error;
        foreach (var a in group)
        {
            a.Stepping = false;
            _lastStepped = a;
            if (cause is not null && _decoding.Contains(a))
            {
                Finish(a, Failure(a.Run.Request, cause), cause);
            }
        }

        Schedule();
    }

    private void OnVerified(Verified v)
    {
        if (v.Key is not Active a || !_decoding.Contains(a) || a.AwaitingStep != v.Verdict.Step)
        {
            return; // stale: the session ended (cancelled, failed) or the verdict is for another step
        }

        if (v.End != 0 && _verifyIntervals.Count < MaxIntervals)
        {
            _verifyIntervals.Add((v.Start, v.End));
        }

        a.Verdict = v.Verdict;
        if (!a.Stepping)
        {
            ApplyVerdict(a);
            if (_busy && a.CanDraft && _decoding.Contains(a))
            {
                // The device runs another session's step: draft this one's next tree meanwhile (when the
                // step that just ended was followed at once by another, no job could take it then).
                a.DraftPending = true;
                _drafter.Tell(new DraftJob(a, a.PrepareDraft) { Trace = a.Run.Request.Trace, Session = a.Run.Request.SessionId });
            }

            Schedule();
        }
    }

    private void ApplyVerdict(Active a)
    {
        try
        {
            a.ApplyVerdict();
            a.Flush(); // its tokens to its channel now, so it can be drafted (and stepped) again at once
        }
        catch (Exception ex) when (ex is not OutOfMemoryException)
        {
            Finish(a, Failure(a.Run.Request, ex), ex);
        }
    }

    private void OnVerifyFailed(VerifyFailed f)
    {
        if (f.Key is Active a && _decoding.Contains(a) && a.AwaitingStep == f.Step)
        {
            var ex = new VerifierFailedException($"the verifier could not verify step {f.Step}: {f.Reason}");
            Finish(a, Failure(a.Run.Request, ex), ex);
            Schedule();
        }
    }

    /// <summary>Flushes queued tokens; finishes sessions that are done (and flushed) or cancelled.</summary>
    private void Retire()
    {
        // Backwards, so Finish can remove the current entry; no list is allocated per step.
        for (int i = _decoding.Count - 1; i >= 0; i--)
        {
            var a = _decoding[i];
            a.Flush();
            if (a.Run.Request.Cancellation.IsCancellationRequested)
            {
                Finish(a, new GenerationFailed(a.Run.Request.SessionId, FailureKind.Cancelled, "the request was cancelled by the caller"));
            }
            else if (a.Finished && a.PendingCount == 0)
            {
                Finish(a, a.Completed());
            }
        }

        for (int i = _prefilling.Count - 1; i >= 0; i--)
        {
            var a = _prefilling[i];
            if (a.Run.Request.Cancellation.IsCancellationRequested)
            {
                Finish(a, new GenerationFailed(a.Run.Request.SessionId, FailureKind.Cancelled, "the request was cancelled by the caller"));
            }
        }

        for (int i = _waiting.Count - 1; i >= 0; i--)
        {
            var a = _waiting[i];
            if (a.Run.Request.Cancellation.IsCancellationRequested)
            {
                Finish(a, new GenerationFailed(a.Run.Request.SessionId, FailureKind.Cancelled, "the request was cancelled by the caller"));
            }
        }
    }

    private static bool Ready(Active a) => !a.Finished && a.PendingCount == 0 && !a.DraftPending && a.AwaitingStep is null;

    private void Finish(Active a, object reply, Exception? cause = null)
    {
        if (_prefilling.Remove(a))
        {
            Telemetry.QueueDepth.Add(-1, new KeyValuePair<string, object?>("phase", "prefill"));
        }

        if (_waiting.Remove(a))
        {
            Telemetry.QueueDepth.Add(-1, new KeyValuePair<string, object?>("phase", "waiting"));
        }

        if (StepPolicy.Remove(_decoding, a, ref _next))
        {
            Telemetry.QueueDepth.Add(-1, new KeyValuePair<string, object?>("phase", "decode"));
        }

        a.Dispose();
        _verifier.Tell(new ForgetSession(a));
        if (reply is GenerationFailed f)
        {
            a.Run.Request.Output.TryComplete(cause ?? (f.Kind == FailureKind.Cancelled ? new OperationCanceledException(f.Detail) : new InvalidOperationException(f.Detail)));
        }
        else
        {
            a.Run.Request.Output.TryComplete();
        }

        a.ReplyTo.Tell(reply);
    }

    private static GenerationFailed Failure(Generate r, Exception ex) => ex switch
    {
        OperationCanceledException => new GenerationFailed(r.SessionId, FailureKind.Cancelled, "the request was cancelled by the caller"),
        PromptTooLongException => new GenerationFailed(r.SessionId, FailureKind.CapacityExceeded, ex.Message),
        ArgumentException => new GenerationFailed(r.SessionId, FailureKind.InvalidRequest, ex.Message),
        VerifierFailedException => new GenerationFailed(r.SessionId, FailureKind.DeviceFault, $"{ex.Message}. The request can be retried."),
        _ => new GenerationFailed(r.SessionId, FailureKind.DeviceFault, $"the device failed: {ex.Message}. The request can be retried."),
    };

    /// <summary>The verifier answered <see cref="VerifyFailed"/> for a session's step.</summary>
    private sealed class VerifierFailedException(string message) : Exception(message);

    /// <summary>Fault injection: the device actor throws while handling this (a crash its supervisor handles).</summary>
    public sealed class Crash
    {
        public static readonly Crash Instance = new();
    }

    /// <summary>Ask for the queue depths. Reply: <see cref="Queues"/>.</summary>
    public sealed record GetQueues;

    public sealed record Queues(int Prefilling, int Decoding)
    {
        /// <summary>Admitted runs waiting for room under the KV memory budget.</summary>
        public int Waiting { get; init; }
    }

    private sealed record StepDone(Active Active, Exception? Error, long Start, long End, double InlineDraftMs)
    {
        /// <summary>Paced by a device profile, and the real step took longer than the profile's time.</summary>
        public bool Overran { get; init; }

        /// <summary>A prefill chunk (else a decode step).</summary>
        public bool Prefill { get; init; }

        /// <summary>A packed step: these plain sessions (<see cref="Active"/> among them) shared the run.</summary>
        public List<Active>? Group { get; init; }
    }

    /// <summary>Ask for the timeline of device steps and prepared drafts (Stopwatch timestamps). Reply: <see cref="Overlap"/>.</summary>
    public sealed record GetOverlap;

    /// <summary>Device step and drafter intervals, and drafting done inline in device steps (not hidden).</summary>
    /// <remarks><see cref="Paced"/>: steps paced by a device profile; <see cref="Overran"/>: those whose real compute took longer than the profile allowed.</remarks>
    public sealed record Overlap(IReadOnlyList<(long Start, long End)> Device, IReadOnlyList<(long Start, long End)> Drafts, double InlineDraftMs)
    {
        public int Paced { get; init; }

        /// <summary>The verifier actor's steps (acceptance of one verified tree each).</summary>
        public IReadOnlyList<(long Start, long End)> Verifies { get; init; } = [];

        public int Overran { get; init; }

        /// <summary>Device time in prefill chunks since the device started (ms).</summary>
        public double PrefillMs { get; init; }

        /// <summary>Device time in decode steps since the device started (ms).</summary>
        public double DecodeMs { get; init; }
    }

    /// <summary>A request's cancellation token fired: retire it at the next Schedule.</summary>
    private sealed class CancellationNoticed
    {
        public static readonly CancellationNoticed Instance = new();
    }

    /// <summary>A stream's channel has room again (or never will: <paramref name="HasRoom"/> false).</summary>
    private sealed record RoomFreed(Active Session, bool HasRoom);

    /// <summary>One request on the device: its prefill, then its decode session, and the tokens not yet in its channel.</summary>
    private sealed class Active(DeviceRun run, IActorRef replyTo, IActorRef calibrator, IActorRef drafter, IActorRef verifier, IActorRef device, DeviceProfile? emulate) : IDisposable
    {
        private readonly ConcurrentQueue<GeneratedToken> _pending = new();
        private TokenLogprob? _logprob;
        private Calibrated? _calibration;
        private bool _calibrating;
        private PrefillSession? _prefill;
        private Func<Prefilled>? _finishPrefill;

        /// <summary>Other sessions were decoding when this step was scheduled (the calibrator then builds in slices).</summary>
        public bool OthersDecoding { get; set; }
        private KvCache? _plainCache;
        private SpeculativeSession? _specSession;
        private PlainSession? _plainSession;
        private SpeculationOptions? _options;
        private SamplingOptions? _sampling;
        private bool _treeStep;

        public DeviceRun Run { get; } = run;

        public IActorRef ReplyTo { get; } = replyTo;

        public bool Decoding => _specSession is not null || _plainSession is not null;

        /// <summary>Decoding plainly (method ar): it can share a packed device run with other such sessions.</summary>
        public bool PlainDecoding => _plainSession is { Done: false };

        /// <summary>The KV bucket of this plain session's next step.</summary>
        public int PlainBucket => _plainSession?.NextStepBucket ?? 0;

        public bool Finished => (_specSession?.Done ?? false) || (_plainSession?.Done ?? false);

        public int PendingCount => _pending.Count;

        /// <summary>The device waits for this stream's channel to have room (its reader is behind).</summary>
        public bool AwaitingRoom { get; set; }

        /// <summary>The registration that tells the device when this request is cancelled; disposed with the run.</summary>
        public CancellationTokenRegistration CancellationWake { get; set; }

        /// <summary>Handed to the drafter and not back yet: the device must not step it meanwhile (mailbox thread only).</summary>
        public bool DraftPending { get; set; }

        /// <summary>Its next tree is prepared (mailbox thread only).</summary>
        public bool DraftReady { get; set; }

        public bool CanDraft => _specSession is { Done: false, AwaitingStep: null } && !Stepping && !DraftReady && !DraftPending && _pending.IsEmpty;

        /// <summary>A device step of this session is running (mailbox thread only).</summary>
        public bool Stepping { get; set; }

        /// <summary>The step whose verdict the session waits for; null when none (read only while it is not stepping).</summary>
        public int? AwaitingStep => _specSession?.AwaitingStep;

        /// <summary>A verdict that arrived while the step's device run was still finishing (mailbox thread only).</summary>
        public TreeVerdict? Verdict { get; set; }

        /// <summary>Ends the session's step with its verdict: keeps the accepted keys/values, emits the tokens (mailbox thread).</summary>
        public void ApplyVerdict()
        {
            var v = Verdict!;
            Verdict = null;
            int before = _specSession!.Output.Count;
            _specSession.Apply(v);
            int emitted = _specSession.Output.Count - before;
            if (emitted > 0)
            {
                Telemetry.Tokens.Add(emitted, new KeyValuePair<string, object?>("method", Run.Request.Method));
            }

            if (_treeStep)
            {
                Telemetry.AcceptedLength.Record(v.Emitted.Length);
            }
        }

        public bool PrepareDraft()
        {
            AttachCalibration();
            return _specSession?.PrepareDraft() ?? false;
        }

        /// <summary>The calibrator's index arrived (mailbox thread): it joins at this session's next step or draft.</summary>
        public void OfferCalibration(Calibrated c) => Interlocked.Exchange(ref _calibration, c);

        /// <summary>On the thread that owns the session now (a device step or a draft job).</summary>
        private void AttachCalibration()
        {
            if (_specSession is not null && Interlocked.Exchange(ref _calibration, null) is { } c)
            {
                _calibrating = false;
                _specSession.AttachCalibration(c.Index, c.Ms);
            }
        }

        /// <summary>The graph width the next step runs on: the verification width, one plain token, or the wide prefill graph.</summary>
        public int StepWidth(OrtModelRuntime runtime) =>
            _specSession is not null ? _options!.Width : _plainSession is not null ? 1 : ChunkWidth > 0 ? ChunkWidth : runtime.Widths.Max();

        /// <summary>Tokens in this session's next prefill chunk, set by the scheduler (0 = the prefill width).</summary>
        public int ChunkWidth { get; set; }

        /// <summary>One device step, traced: a span per step (child of the caller's trace) and busy-time metrics.</summary>
        public double StepOnce(OrtModelRuntime runtime, Generator plain, SpeculativeDecoder spec, IReadOnlySet<int> stops)
        {
            double inlineBefore = _specSession?.InlineDraftMs ?? 0;
            string kind = Decoding ? (_specSession is not null ? "device_run" : "decode") : "prefill_chunk";
            using var span = Telemetry.Source.StartActivity($"coordgen.{kind}", ActivityKind.Internal, Run.Request.Trace);
            span?.SetTag("coordgen.session", Run.Request.SessionId);
            span?.SetTag("coordgen.method", Run.Request.Method);
            long t0 = System.Diagnostics.Stopwatch.GetTimestamp();
            int before = (_specSession?.Output.Count ?? 0) + (_plainSession?.Output.Count ?? 0);
            try
            {
                StepCore(runtime, plain, spec, stops);
            }
            catch (Exception ex)
            {
                span?.SetStatus(ActivityStatusCode.Error, ex.Message);
                throw;
            }
            finally
            {
                double ms = System.Diagnostics.Stopwatch.GetElapsedTime(t0).TotalMilliseconds;
                Telemetry.DeviceBusy.Add(ms / 1000, new KeyValuePair<string, object?>("step", kind));
                int emitted = (_specSession?.Output.Count ?? 0) + (_plainSession?.Output.Count ?? 0) - before;
                if (emitted > 0)
                {
                    Telemetry.Tokens.Add(emitted, new KeyValuePair<string, object?>("method", Run.Request.Method));
                    span?.SetTag("coordgen.tokens", emitted);
                }
            }

            return kind == "device_run" ? (_specSession?.InlineDraftMs ?? 0) - inlineBefore : 0;
        }

        /// <summary>One packed device run for several plain sessions (off the mailbox thread, like <see cref="StepOnce"/>): traced as one span, each session's tokens counted under its method.</summary>
        public static void StepPacked(IReadOnlyList<Active> group)
        {
            using var span = Telemetry.Source.StartActivity("coordgen.decode_packed", ActivityKind.Internal, group[0].Run.Request.Trace);
            span?.SetTag("coordgen.sessions", group.Count);
            span?.SetTag("coordgen.session_ids", string.Join(',', group.Select(a => a.Run.Request.SessionId)));
            long t0 = System.Diagnostics.Stopwatch.GetTimestamp();
            int before = group.Sum(a => a._plainSession!.Output.Count);
            try
            {
                PlainSession.StepPacked([.. group.Select(a => a._plainSession!)]);
            }
            catch (Exception ex)
            {
                span?.SetStatus(ActivityStatusCode.Error, ex.Message);
                throw;
            }
            finally
            {
                Telemetry.DeviceBusy.Add(System.Diagnostics.Stopwatch.GetElapsedTime(t0).TotalSeconds, new KeyValuePair<string, object?>("step", "decode_packed"));
                Telemetry.Tokens.Add(group.Sum(a => a._plainSession!.Output.Count) - before, new KeyValuePair<string, object?>("method", "ar"));
            }
        }

        private void StepCore(OrtModelRuntime runtime, Generator plain, SpeculativeDecoder spec, IReadOnlySet<int> stops)
        {
            var r = Run.Request;
            r.Cancellation.ThrowIfCancellationRequested();
            if (_specSession is not null)
            {
                AttachCalibration();
                var tree = _specSession.BeginStep(r.Cancellation, ownRows: true);
                _treeStep = tree is { Tokens.Length: > 0 };
                if (tree is not null)
                {
                    // Acceptance runs on the verifier while the device moves on to other sessions.
                    verifier.Tell(new VerifyTree(this, tree, _sampling!, r.Trace) { Session = r.SessionId }, device);

                    // ONNX Runtime's threads may hold both cores; give the verifier's worker this core
                    // now, or its message can wait for the next scheduler tick (measured: the verdict's
                    // round trip while another step runs fell from 1.4-1.7 ms to 0.02-0.03 ms at the median).
                    Thread.Yield();
                }

                return;
            }

            if (_plainSession is not null)
            {
                _plainSession.Step();
                return;
            }

            var sampling = _sampling ??= new SamplingOptions { Temperature = r.Sampling.Temperature, TopK = r.Sampling.TopK, TopP = r.Sampling.TopP, Seed = r.Sampling.Seed, Offset = r.Sampling.Offset, Logprobs = r.Sampling.Logprobs };
            if (_prefill is null)
            {
                sampling.Validate();
                if (r.MaxTokens < 1)
                {
                    throw new ArgumentException($"max tokens must be at least 1 (got {r.MaxTokens}).");
                }

                int[] prompt = [.. r.Prompt.Tokens];
                if (r.Method == "ar")
                {
                    _plainCache = runtime.CreateCache();
                    _prefill = plain.BeginPrefill(_plainCache, prompt);
                }
                else
                {
                    _options = SpeculationOptions.ForMethod(r.Method, r.Width) with { AdaptiveWidth = r.AdaptiveWidth, WidthCostMs = emulate is null ? null : emulate.StepMs };
                    if (Run.Store is not null)
                    {
                        _options = _options with { UseHistory = true };
                    }

                    // Calibration runs on the calibrator actor: each chunk's top-k rows go there as the device moves on.
                    var cal = _options.Calibration;
                    var self = this;
                    (_prefill, _finishPrefill) = spec.BeginPrefill(prompt, _options.UseCalibration ? cal : null,
                        rows => calibrator.Tell(new CalibrateChunk(self, rows, cal), device));
                }
            }

            if (!_prefill.Step(ChunkWidth))
            {
                return;
            }

            if (_plainCache is not null)
            {
                var cache = _plainCache;
                _plainCache = null;
                _plainSession = plain.StartDecode(cache, _prefill.LastLogits, r.Prompt.Count, _prefill.ElapsedMs, r.MaxTokens, sampling, stops, Enqueue, KeepLogprob);
            }
            else
            {
                using var pre = _finishPrefill!();
                _specSession = spec.Start(pre, r.MaxTokens, sampling, stops, _options!, Run.Store, Enqueue, adoptCache: true, onLogprobs: KeepLogprob);
                _specSession.DuringVerify = work => drafter.Tell(new PreDraftJob(work), device);
                if (pre.CalibrationDeferred)
                {
                    _calibrating = true;
                    calibrator.Tell(new CalibrateFinish(this, r.SessionId, pre.Prompt, _options!.Calibration, r.Trace) { Share = OthersDecoding }, device);
                }
                else if (pre.CalibrationFailed)
                {
                    calibrator.Tell(new CalibrateCancel(this), device);
                }
            }
        }

        // The session reports a token's log-probabilities just before the token (on the same thread).
        private void KeepLogprob(TokenLogprobs lp) =>
            _logprob = new TokenLogprob(lp.Logprob, [.. lp.Top.Select(t => new TokenAlternative(t.Token, t.Logprob))]);

        private bool Enqueue(int token)
        {
            _pending.Enqueue(new GeneratedToken(token, _logprob));
            _logprob = null;
            return !Run.Request.Cancellation.IsCancellationRequested;
        }

        /// <summary>Moves queued tokens into the channel while it has room (mailbox thread only).</summary>
        public void Flush()
        {
            while (_pending.TryPeek(out var t) && Run.Request.Output.TryWrite(t))
            {
                _pending.TryDequeue(out _);
            }
        }

        public object Completed()
        {
            var r = Run.Request;
            if (_plainSession is not null)
            {
                var p = _plainSession.Result();
                return new GenerationCompleted(r.SessionId, TokenSequence.From(p.Tokens), p.Stats.StopReason, p.Stats.PrefillMs, p.Stats.DecodeMs, null);
            }

            var s = _specSession!.Result();
            var a = s.Accounting;
            var sources = Enum.GetValues<DraftSource>();
            var report = new SpeculationReport(r.Method, r.Width, a.Steps, a.MeanAccepted,
                sources.ToImmutableDictionary(x => x.ToString().ToLowerInvariant(), a.Proposed),
                sources.ToImmutableDictionary(x => x.ToString().ToLowerInvariant(), a.Accepted),
                s.DraftMs);
            return new GenerationCompleted(r.SessionId, TokenSequence.From(s.Tokens), s.Stats.StopReason, s.Stats.PrefillMs, s.Stats.DecodeMs, report);
        }

        public void Dispose()
        {
            CancellationWake.Dispose();
            if (_calibrating || (_prefill is { Done: false } && _options is { UseCalibration: true }))
            {
                calibrator.Tell(new CalibrateCancel(this), device);
            }

            _plainCache?.Dispose();
            _plainSession?.Dispose();
            _specSession?.Dispose();
            if (_specSession is null && _finishPrefill is not null && _prefill is { Done: false })
            {
                // A prefill abandoned half way: release its cache.
                _finishPrefill().Dispose();
            }
        }
    }
}

/// <summary>
/// Supervisor → device: run <paramref name="Request"/>, drafting also from <paramref name="Store"/> (a
/// snapshot never mutated after it is published, so the device may read it while the store actor
/// builds the next one). <paramref name="Resumed"/> marks a run that continues a session after a fault:
/// it is served first.
/// </summary>
public sealed record DeviceRun(Generate Request, HistoryStore? Store, bool Resumed = false);
