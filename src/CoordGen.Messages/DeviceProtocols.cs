using System.Collections.Immutable;
using System.Diagnostics;
using static CoordGen.Messages.GenerationProtocol;

namespace CoordGen.Messages;

/// <summary>An interval of one actor's work (Stopwatch timestamps), for overlap timelines.</summary>
public readonly record struct Interval(long Start, long End);

/// <summary>Session → device: the production protocol of the accelerator's owner.</summary>
public static class DeviceProtocol
{
    /// <summary>
    /// What the device needs of a request, as plain data: no channel and no cancellation token (tokens go
    /// back as <see cref="Tokens"/> messages and a cancellation comes as <see cref="CancelRun"/>), so a
    /// session and its device could live on different nodes.
    /// </summary>
    public sealed record RunRequest(SessionId SessionId, TokenSequence Prompt, int MaxTokens, Sampling Sampling, string Method, int Width,
        bool AdaptiveWidth = false, PrefixPin? KeepPrefix = null, ActivityContext Trace = default)
    {
        /// <summary>The device's part of a caller's request.</summary>
        public static RunRequest From(Generate g) => new(g.SessionId, g.Prompt, g.MaxTokens, g.Sampling, g.Method, g.Width, g.AdaptiveWidth, g.KeepPrefix, g.Trace);
    }

    /// <summary>
    /// Session → device: run attempt <paramref name="Attempt"/> of <paramref name="Request"/>, drafting also from
    /// <paramref name="Context"/> (a snapshot never mutated after it is published). <paramref name="Resumed"/>
    /// marks a run that continues a session after a fault: it is served first. The sender and the attempt
    /// name the run in every later message. The device sends the run's tokens as <see cref="Tokens"/>, then
    /// <see cref="Ended"/> (or, from the device's back-off supervisor while the device is down,
    /// <see cref="SupervisionProtocol.DeviceRestarting"/>). <c>Run</c> is the only message a session sends
    /// through the back-off supervisor; the others go to the device that sent <see cref="Admitted"/>.
    /// </summary>
    public sealed record Run(RunRequest Request, IContextSnapshot? Context, int Attempt = 1, bool Resumed = false);

    /// <summary>
    /// Device → session: attempt <paramref name="Attempt"/> is on this device (the sender), which takes
    /// <see cref="CancelRun"/> for it directly. A session answers the admission of an attempt it has
    /// superseded with <see cref="CancelRun"/>.
    /// </summary>
    public sealed record Admitted(int Attempt);

    /// <summary>Session → device (the one that sent <see cref="Admitted"/>): stop attempt <paramref name="Attempt"/> (the caller cancelled, or the session superseded it). It ends with <see cref="Ended"/> as a cancelled run; an attempt the device does not hold is ignored. A session that stops is watched: its runs are cancelled too.</summary>
    public sealed record CancelRun(int Attempt);

    /// <summary>
    /// Device → session: the next tokens of attempt <paramref name="Attempt"/>, in order. The device keeps at
    /// most a window of a run's tokens unacknowledged (<see cref="DefaultStreamWindow"/> unless configured); the session answers
    /// <see cref="Delivered"/> as they enter the caller's channel, so a reader that falls behind pauses only
    /// its own stream (backpressure without polling).
    /// </summary>
    public sealed record Tokens(int Attempt, ImmutableArray<GeneratedToken> Items);

    /// <summary>Session → device: <paramref name="Count"/> tokens of attempt <paramref name="Attempt"/> left the device's window (written to the caller's channel, or dropped because the attempt was superseded).</summary>
    public sealed record Delivered(int Attempt, int Count);

    /// <summary>
    /// Tokens of one run that may be on their way to its channel, unacknowledged, before the device pauses that
    /// run (decision 0022). 16 throttled 16 packed sessions on the 135M twin: acknowledgements came back that
    /// many steps late on this 2-core machine, and packs shrank to about 2 sessions.
    /// </summary>
    public const int DefaultStreamWindow = 64;

    /// <summary>
    /// Context stores → device: <paramref name="Owner"/>'s documents changed or were deleted, so the prefix
    /// blocks pinned for it at generations up to <paramref name="ThroughGeneration"/> become ordinary cache
    /// entries (evicted least recently used); later pins of those generations are ignored. No reply.
    /// </summary>
    public sealed record ReleasePrefix(string Owner, long ThroughGeneration);

    /// <summary>
    /// Device → session: attempt <paramref name="Attempt"/> ended: <paramref name="Completed"/>, or <paramref name="Failed"/>, or
    /// <paramref name="Restarting"/> (the device stopped with it; resume after a pause). The attempt number lets a
    /// session drop the answer of an attempt it has superseded.
    /// </summary>
    public sealed record Ended(int Attempt, GenerationCompleted? Completed = null, GenerationFailed? Failed = null, bool Restarting = false);
}

/// <summary>
/// Device ↔ drafter. The drafter owns each session's drafting state (the indexes over prompt and
/// output, the calibrated index, draft reuse) and answers every <see cref="Advance"/> with the next
/// step's tree; between the two it drafts ahead for the likely outcome of the step the device runs.
/// </summary>
public static class DrafterProtocol
{
    /// <summary>
    /// Device → drafter, when a speculative run is admitted (the drafter indexes the prompt while the device
    /// prefills it). <paramref name="Method"/>, <paramref name="Width"/> and <paramref name="AdaptiveWidth"/>
    /// are the request's (methods that calibrate get their paths from the calibrator later). No reply.
    /// </summary>
    public sealed record Open(SessionRun Run, ImmutableArray<int> Prompt, int MaxTokens, string Method, int Width, bool AdaptiveWidth, IContextSnapshot? Context, ActivityContext Trace = default);

    /// <summary>
    /// Device → drafter (the first token, after the prefill), verifier → drafter (each verified step):
    /// step <paramref name="Step"/> of the run is decided. <paramref name="Outcome"/> is what it verified (null
    /// when it verified no tree); <paramref name="Committed"/> the tokens it commits (a stop token among them
    /// ends the run, which is closed next). Answer, to the device: <see cref="Proposal"/> for step
    /// <paramref name="Step"/> + 1.
    /// </summary>
    public sealed record Advance(SessionRun Run, int Step, StepOutcome? Outcome, ImmutableArray<int> Committed);

    /// <summary>
    /// Drafter → device: the tree for step <paramref name="Step"/>. <paramref name="Ahead"/>: it was drafted ahead,
    /// while the device ran the step before. <see cref="Work"/>: the drafter's work for this run since its last
    /// proposal (for the overlap timeline).
    /// </summary>
    public sealed record Proposal(SessionRun Run, int Step, DraftProposal Tree, bool Ahead)
    {
        public ImmutableArray<Interval> Work { get; init; } = [];
    }

    /// <summary>
    /// Device → drafter, from the device step as it begins: step <paramref name="Step"/> of the run is running now. The
    /// drafter then drafts the step after it for its likely outcome (the tree drafted ahead), so that work overlaps the
    /// device's step rather than the moments before it starts. No reply.
    /// </summary>
    public sealed record StepStarted(SessionRun Run, int Step);

    /// <summary>Calibrator → drafter: the run's calibrated paths (null when calibration failed) and the calibrator's time on them.</summary>
    public sealed record Calibrated(SessionRun Run, CalibratedPaths? Paths, double Ms);

    /// <summary>Device → drafter: the run ended; drop its state.</summary>
    public sealed record Close(SessionRun Run);
}

/// <summary>Device ↔ verifier: acceptance of each verification step, off the device's thread.</summary>
public static class VerifierProtocol
{
    /// <summary>
    /// Device → verifier: the step <paramref name="Tree"/> of the run ran on the device; decide what it
    /// accepts under <paramref name="Sampling"/>. Reply: <see cref="Verified"/> or <see cref="VerifyFailed"/>;
    /// and, for a speculative run's step, the drafter gets the outcome at once
    /// (<see cref="DrafterProtocol.Advance"/>), so its next tree travels beside the verdict.
    /// <paramref name="OutcomeWidth"/>: the step's graph width (1: a plain step where a tree could have run;
    /// 0: a step that verified no tree, near the cache's capacity).
    /// </summary>
    public sealed record Verify(SessionRun Run, TreeToVerify Tree, Sampling Sampling, int OutcomeWidth, ActivityContext Trace = default);

    /// <summary>Verifier → device: the verdict for one step; <paramref name="Start"/>/<paramref name="End"/> (Stopwatch timestamps) for the overlap timeline.</summary>
    public sealed record Verified(SessionRun Run, TreeVerdict Verdict, long Start, long End);

    /// <summary>Verifier → device: the step could not be verified; the request fails with a retryable error.</summary>
    public sealed record VerifyFailed(SessionRun Run, int Step, string Reason);

    /// <summary>Device → verifier: the run ended; drop its sampling stream.</summary>
    public sealed record Forget(SessionRun Run);
}

/// <summary>Device → calibrator (paper §3.3): the prefill's top-k rows, gathered while the device moves on; the result goes to the drafter.</summary>
public static class CalibratorProtocol
{
    /// <summary>The top-k rows of one prefill chunk (a copy the calibrator owns), in order.</summary>
    public sealed record Chunk(SessionRun Run, TopRows Rows);

    /// <summary>
    /// The prefill of <paramref name="Prompt"/> is done: build the calibrated paths for <paramref name="Method"/> at
    /// <paramref name="Width"/> and send them to the drafter. <paramref name="Share"/>: other sessions are decoding,
    /// build in short slices so their steps keep the cores.
    /// </summary>
    public sealed record Finish(SessionRun Run, ImmutableArray<int> Prompt, string Method, int Width, bool Share, ActivityContext Trace = default);

    /// <summary>The run is gone; drop what was read for it.</summary>
    public sealed record Cancel(SessionRun Run);
}
