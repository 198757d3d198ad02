using System.Diagnostics;
using Akka.Actor;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Speculative;
using CoordGen.Messages;
using static CoordGen.Messages.DrafterProtocol;

namespace CoordGen.Actors.Device;

/// <summary>
/// The CPU drafter. It owns every speculative run's drafting state (a <see cref="SessionDrafter"/>: the
/// indexes over prompt and output, the calibrated index, the history cursor, draft reuse), touched by
/// this actor's thread alone. It indexes a prompt when the run is admitted (while the device prefills),
/// answers each <see cref="Advance"/> with the next step's tree, and then, while the device runs that
/// step, drafts the step after it for its most likely outcome, so that when that outcome happens the
/// answer is ready at once. Calibrated paths from the calibrator are indexed in short slices between
/// other messages, so one session's long index never holds back another's tree. A drafting failure
/// answers with an empty, degraded tree (the step verifies its root alone); it never leaves the device waiting.
/// </summary>
public sealed class DrafterActor : ReceiveActor
{
    private readonly IFaultInjector? _faults;
    private readonly Dictionary<SessionRun, Drafting> _runs = [];

    /// <summary>Symbols indexed per slice of a calibrated index (about a quarter of a millisecond).</summary>
    private const int SliceSymbols = 2048;

    public DrafterActor(IFaultInjector? faults)
    {
        _faults = faults;
        Receive<Open>(OnOpen);
        Receive<Advance>(OnAdvance);
        Receive<StepStarted>(OnStepStarted);
        Receive<Calibrated>(OnCalibrated);
        Receive<ContinueIndexing>(c => Index(c.Run));
        Receive<Close>(c => _runs.Remove(c.Run));
    }

    /// <param name="faults">Fault injection in drafting (<see cref="IFaultInjector.OnDraft"/>); null in production.</param>
    public static Props Props(IFaultInjector? faults = null) => Akka.Actor.Props.Create(() => new DrafterActor(faults));

    private void OnOpen(Open o)
    {
        long start = Stopwatch.GetTimestamp();
        var spec = SpeculationOptions.ForRequest(o.Method, o.Width, o.AdaptiveWidth, o.Context is not null);
        var drafting = new Drafting(new SessionDrafter(o.Prompt.AsSpan(), o.MaxTokens, spec, o.Context as HistoryStore, faults: _faults), o.Trace)
        {
            Work = [new Interval(start, Stopwatch.GetTimestamp())],
        };
        _runs[o.Run] = drafting;
    }

    private void OnAdvance(Advance a)
    {
        if (!_runs.TryGetValue(a.Run, out var d))
        {
            // Not opened here (this drafter restarted with its device): the device's run is gone too.
            Context.Parent.Tell(new Proposal(a.Run, a.Step + 1, DraftProposal.Empty with { Degraded = true }, false));
            return;
        }

        using var span = Telemetry.Source.StartActivity("coordgen.draft", ActivityKind.Internal, d.Trace);
        span?.SetTag("coordgen.session", a.Run.Session.Value);
        span?.SetTag("coordgen.step", a.Step + 1);
        long start = Stopwatch.GetTimestamp();
        DraftProposal tree;
        int aheadBefore = d.Drafter.AheadUsed;
        try
        {
            tree = d.Drafter.Advance(a.Outcome, a.Committed.AsSpan());
        }
        catch (Exception ex) when (ex is not OutOfMemoryException)
        {
            span?.SetStatus(ActivityStatusCode.Error, ex.Message);
            tree = DraftProposal.Empty with { Degraded = true };
        }

        long end = Stopwatch.GetTimestamp();
        span?.SetTag("coordgen.draft_nodes", tree.Count);
        Context.Parent.Tell(new Proposal(a.Run, a.Step + 1, tree, d.Drafter.AheadUsed > aheadBefore) { Work = [.. d.Work, new(start, end)] });
        d.Work = [];
        d.AheadFor = a.Step + 1;
    }

    // The device began the step this drafter proposed last: the step after it, for its likely outcome, while it runs.
    private void OnStepStarted(StepStarted s)
    {
        if (!_runs.TryGetValue(s.Run, out var d) || d.AheadFor != s.Step)
        {
            return; // closed, or a step already decided (its verdict's advance came first)
        }

        d.AheadFor = null;
        long start = Stopwatch.GetTimestamp();
        d.Drafter.PrepareAhead();
        d.Work = [.. d.Work, new Interval(start, Stopwatch.GetTimestamp())];
    }

    private void OnCalibrated(Calibrated c)
    {
        // The device opens a run before its prefill, and so before the calibrator can finish: an unknown
        // run has been closed already (it ended right after its prefill).
        if (!_runs.TryGetValue(c.Run, out var d))
        {
            return;
        }

        if (c.Paths is not { } paths)
        {
            d.Drafter.AttachCalibration(null);
            return;
        }

        d.Indexing = new CalibratedIndex.Indexer(paths);
        Index(c.Run);
    }

    // One slice of a run's calibrated index; the next slice queues behind the messages waiting now.
    private void Index(SessionRun run)
    {
        if (!_runs.TryGetValue(run, out var d) || d.Indexing is not { } indexer)
        {
            return; // closed meanwhile
        }

        long start = Stopwatch.GetTimestamp();
        try
        {
            if (indexer.Advance(SliceSymbols))
            {
                d.Indexing = null;
                d.Drafter.AttachCalibration(indexer.Result());
            }
            else
            {
                Self.Tell(new ContinueIndexing(run));
            }
        }
        catch (Exception ex) when (ex is not OutOfMemoryException)
        {
            d.Indexing = null;
            d.Drafter.AttachCalibration(null);
        }

        d.Work = [.. d.Work, new Interval(start, Stopwatch.GetTimestamp())];
    }

    /// <summary>One run's drafting state, its trace, and the drafter's work for it not yet reported.</summary>
    private sealed class Drafting(SessionDrafter drafter, ActivityContext trace)
    {
        public SessionDrafter Drafter { get; } = drafter;

        public ActivityContext Trace { get; } = trace;

        public Interval[] Work { get; set; } = [];

        /// <summary>The step whose start (<see cref="StepStarted"/>) triggers drafting ahead: the one proposed last; null once done.</summary>
        public int? AheadFor { get; set; }

        /// <summary>The calibrated index being built in slices; null when none is.</summary>
        public CalibratedIndex.Indexer? Indexing { get; set; }
    }

    /// <summary>The drafter's own: index the next slice of a run's calibrated paths.</summary>
    private sealed record ContinueIndexing(SessionRun Run);
}
