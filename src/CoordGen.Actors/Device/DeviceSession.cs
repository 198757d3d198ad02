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
/// speculative one: KV cache, root, width, sampler position), and the tokens not yet sent to its session.
/// The device actor owns it. A device step works on it off the mailbox thread, and while that step
/// runs (<see cref="Stepping"/>) no message handler touches it; the step's completion message hands it
/// back. Its drafting state lives in the drafter actor, its sampling stream in the verifier.
/// </summary>
internal sealed partial class DeviceSession(SessionRun id, DeviceProtocol.Run run, IActorRef replyTo, DeviceRoles roles, DeviceProfile? emulate, int streamWindow) : IDisposable
{
    private readonly RunOutput _output = new(streamWindow);
    private readonly CancellationTokenSource _cancel = new();
    private readonly SamplingOptions _sampling = run.Request.Sampling.ToEngine();
    private SessionPrefill? _prefill;
    private SpeculativeSession? _spec;
    private PlainSession? _plain;
    private SpeculationOptions? _options;
    private bool _treeStep;

    // A tree that came before the verdict it follows (the verifier tells the drafter and the device at once).
    private DrafterProtocol.Proposal? _early;

    public SessionRun Id { get; } = id;

    public DeviceProtocol.Run Run { get; } = run;

    public DeviceProtocol.RunRequest Request => Run.Request;

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

    /// <summary>
    /// Tells a speculative session what a step of each width would cost it in a packed run (null: alone), and whether its
    /// root alone may ride in the next chunk's run without waiting for a tree (<see cref="SpeculativeSession.RootAloneWithoutTree"/>); between steps.
    /// </summary>
    public void PriceSharedSteps(IReadOnlyDictionary<int, double>? ms, bool rootAlone = false)
    {
        if (_spec is not null)
        {
            _spec.SharedStepMs = ms;
            _spec.RootAloneWithoutTree = rootAlone;
        }
    }

    /// <summary>The width of this speculative session's next step when it is a tree (0 otherwise): sessions whose next steps are trees can share a packed run.</summary>
    public int NextTreeWidth => _spec?.NextTreeWidth ?? 0;

    /// <summary>Whether this speculative session's cache has room for a tree of <paramref name="width"/> rows (a pack's width may exceed its own).</summary>
    public bool RoomForTree(int width) => _spec?.RoomForTree(width) ?? false;

    /// <summary>Expected tokens of this speculative session's next step as a tree of <paramref name="width"/> rows (1 for a plain session).</summary>
    public double ExpectedTokens(int width) => _spec?.ExpectedTokens(width) ?? 1;

    /// <summary>The KV bucket of this speculative session's next tree step.</summary>
    public int TreeBucket(int width) => _spec?.BucketFor(width) ?? 0;

    public bool Finished => (_spec?.Done ?? false) || (_plain?.Done ?? false);

    public int PendingCount => _output.Pending;

    /// <summary>Cancelled when the session says so (<see cref="DeviceProtocol.CancelRun"/>): the step under way stops at its next check.</summary>
    public CancellationToken Cancellation => _cancel.Token;

    /// <summary>The session cancelled this run (mailbox thread).</summary>
    public void Cancel() => _cancel.Cancel();

    /// <summary>The session acknowledged <paramref name="count"/> tokens: they left this run's window.</summary>
    public void Delivered(int count) => _output.Delivered(count);

    /// <summary>A device step of this session is running: nothing else touches it until the step's completion arrives.</summary>
    public bool Stepping { get; set; }

    /// <summary>The next step needs the drafter's tree, not here yet.</summary>
    public bool WaitingForTree => _spec is { NeedsProposal: true, RootAloneWithoutTree: false };

    /// <summary>Whether this speculative session's root alone may ride in the next chunk's run without its tree (decision 0033).</summary>
    public bool RootAloneRides => _spec?.RootAloneWithoutTree ?? false;

    /// <summary>Ready only because its root may ride without its tree (none offered yet).</summary>
    public bool ReadyWithoutTree => RootAloneRides && _spec!.NeedsProposal && Ready;

    /// <summary>The step whose verdict the session waits for; null when none.</summary>
    public int? AwaitingStep => _spec?.AwaitingStep;

    /// <summary>Its step has run and its rows are with the verifier: the verdict is on its way.</summary>
    public bool AwaitingVerdict => !Stepping && !Finished && AwaitingStep is not null;

    /// <summary>A verdict that arrived while the step's device run was still finishing.</summary>
    public TreeVerdict? Verdict { get; set; }

    /// <summary>A failure of this run's alone while its step was under way: the verifier could not verify it, or its own part of a mixed run failed (its options, its prompt, what follows its prefill); the run ends with it when the step ends.</summary>
    public Exception? StepFailure { get; set; }

    /// <summary>Other sessions were decoding when this step was scheduled (the calibrator then builds in slices).</summary>
    public bool OthersDecoding { get; set; }

    /// <summary>Prompt tokens not prefilled yet (all of them before its first chunk; 0 once it decodes).</summary>
    public int PrefillTokensLeft => Decoding ? 0 : _prefill?.Remaining ?? Request.Prompt.Count;

    /// <summary>Prompt tokens whose keys and values came from the prefix cache (known after the first prefill step).</summary>
    public int CachedTokens => _prefill?.CachedTokens ?? 0;

    /// <summary>
    /// Bytes the prefix cache may hold while this session prefills: the KV budget less every running
    /// session's cache, this one's included (set by the scheduler before a prefill step).
    /// </summary>
    public long PrefixRoom { get; set; }

    /// <summary>Tokens in this session's next prefill chunk, set by the scheduler (0 = the prefill width).</summary>
    public int ChunkWidth { get; set; }

    /// <summary>Ready for a device step: not finished, its tokens all sent with room in its window, no verdict or tree awaited.</summary>
    public bool Ready => !Finished && _output.Pending == 0 && _output.HasRoom && AwaitingStep is null && !WaitingForTree;

    /// <summary>A speculative session that will be ready as soon as its verdict or its next tree arrives (not one its reader holds back).</summary>
    public bool Coming => Speculative && !Finished && !Stepping && _output.Pending == 0 && _output.HasRoom && (AwaitingStep is not null || WaitingForTree);

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

    /// <summary>What this run's next solo step is, for its span and busy-time metric.</summary>
    internal string StepKind => Decoding ? (_spec is not null ? "device_run" : "decode") : "prefill_chunk";

    /// <summary>Of this run's last prefill step, the time its riders are charged (0 without riders).</summary>
    internal double LastRidersMs => _prefill?.LastRidersMs ?? 0;

    /// <summary>Tokens this run has produced so far.</summary>
    internal int Produced => (_spec?.Output.Count ?? 0) + (_plain?.Output.Count ?? 0);

    /// <summary>This session's input to a packed width-1 run: its plain session, or its speculative root alone.</summary>
    internal INarrowStep BeginPackedNarrow() => (INarrowStep?)_plain ?? _spec!.BeginNarrow();

    /// <summary>After a packed width-1 run: a speculative session's root row goes to the verifier.</summary>
    internal void EndPackedNarrow()
    {
        if (_spec is not null)
        {
            _treeStep = false;
            Verify(_spec.TakeNarrow(), 1);
        }
    }

    /// <summary>Tokens this plain session has produced so far (0 for a speculative one).</summary>
    internal int PlainTokens => _plain?.Output.Count ?? 0;

    /// <summary>This speculative session's half of a packed tree run.</summary>
    internal SpeculativeSession SpeculativeState => _spec!;

    /// <summary>After a packed tree run: this session's tree goes to the verifier.</summary>
    internal void VerifyPacked(TreeToVerify tree, int width)
    {
        _treeStep = tree.Tokens.Length > 0;
        Verify(tree, width);
    }

    // Acceptance runs on the verifier while the device moves on to other sessions.
    private void Verify(TreeToVerify tree, int outcomeWidth) =>
        roles.Verifier.Tell(new VerifierProtocol.Verify(Id, tree, Request.Sampling, outcomeWidth, Request.Trace), roles.Device);

    /// <summary>From the device step as it begins (off the mailbox thread): a speculative decoding run tells its drafter which step runs now, to draft the one after it meanwhile.</summary>
    internal void StepStarting()
    {
        if (Decoding && _spec is { } s)
        {
            roles.Drafter.Tell(new DrafterProtocol.StepStarted(Id, s.Steps + 1));
        }
    }

    /// <summary>This run's own step (off the mailbox thread): a prefill chunk, its tree to the verifier, or one plain token.</summary>
    /// <param name="prefix">The device's prefix cache (null: off); used on the first and last prefill steps only.</param>
    /// <param name="riders">Other sessions' steps that share this run's prefill chunk (a mixed run: width-1 steps, decision 0026, or trees, decision 0029); a prefill step only.</param>
    internal void Step(OrtModelRuntime runtime, Generator plain, SpeculativeDecoder spec, IReadOnlySet<int> stops, PrefixCache? prefix, IChunkRiders? riders = null)
    {
        if (riders is not null)
        {
            StepWithRiders(runtime, plain, spec, stops, prefix, riders);
            return;
        }

        Cancellation.ThrowIfCancellationRequested();
        if (_spec is not null)
        {
            var tree = _spec.BeginStep(Cancellation, ownRows: true);
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

        OpenPrefill(runtime, plain, spec, prefix);
        if (_prefill!.Step(runtime, plain, spec, prefix, ChunkWidth, PrefixRoom))
        {
            StartDecoding(plain, spec, stops, prefix);
        }
    }

    private bool Enqueue(int token)
    {
        _output.Add(token);
        return !Cancellation.IsCancellationRequested;
    }

    /// <summary>
    /// Sends queued tokens to the session while this run's window has room, or all of them once the run is
    /// finished, so its cache frees without waiting for the reader (mailbox thread, never while stepping).
    /// </summary>
    public void Flush()
    {
        if (!Stepping)
        {
            _output.Send(ReplyTo, roles.Device, Run.Attempt, all: Finished);
        }
    }

    /// <summary>The run's answer, once it is finished.</summary>
    public GenerationCompleted Completed() => DeviceReplies.Completed(Request, _plain?.Result(), _spec?.Result(), CachedTokens);

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
        _cancel.Dispose();
        _prefill?.Dispose(); // a prefill abandoned half way
        _plain?.Dispose();
        _spec?.Dispose();
    }
}

/// <summary>The device's children and itself, as its sessions address them.</summary>
internal sealed record DeviceRoles(IActorRef Device, IActorRef Drafter, IActorRef Calibrator, IActorRef Verifier);
