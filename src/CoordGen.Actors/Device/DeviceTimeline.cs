using CoordGen.Messages;

namespace CoordGen.Actors.Device;

/// <summary>What the device records for overlap reports: device steps, the drafter's and the verifier's work, time per phase.</summary>
internal sealed class DeviceTimeline
{
    private const int MaxIntervals = 200_000;
    private readonly List<Interval> _device = [];
    private readonly List<Interval> _drafts = [];
    private readonly List<Interval> _verifies = [];
    private double _prefillMs;
    private double _decodeMs;
    private int _paced;
    private int _overran;
    private int _ahead;

    private int _decodeRuns;
    private int _decodeSessionSteps;

    /// <param name="sessions">Sessions the run stepped (a packed run: several).</param>
    /// <param name="riders">A prefill chunk's riders (decode steps in the same run, decision 0026): the run counts as a
    /// decode run of them too, and <paramref name="ridersMs"/> of its time is decode time, the rest prefill time.</param>
    public void Step(long start, long end, bool prefill, int sessions = 1, int riders = 0, double ridersMs = 0)
    {
        if (end == 0)
        {
            return;
        }

        if (!prefill || riders > 0)
        {
            _decodeRuns++;
            _decodeSessionSteps += prefill ? riders : sessions;
        }

        double ms = System.Diagnostics.Stopwatch.GetElapsedTime(start, end).TotalMilliseconds;
        if (prefill)
        {
            double decode = riders > 0 ? Math.Clamp(ridersMs, 0, ms) : 0;
            _decodeMs += decode;
            _prefillMs += ms - decode;
        }
        else
        {
            _decodeMs += ms;
        }

        Add(_device, new Interval(start, end));
    }

    public void Paced(bool overran)
    {
        _paced++;
        _overran += overran ? 1 : 0;
    }

    public void Drafted(IEnumerable<Interval> work, bool ahead)
    {
        foreach (var w in work)
        {
            Add(_drafts, w);
        }

        _ahead += ahead ? 1 : 0;
    }

    public void Verified(long start, long end) => Add(_verifies, new Interval(start, end));

    private const int MaxDecisions = 4096;
    private readonly Queue<(QueueSnapshot, StepChoice)> _decisions = new();

    /// <summary>A rebalancing decision and the snapshot it was taken from (the last 4,096 are kept, for replay).</summary>
    public void Decided(QueueSnapshot snapshot, StepChoice choice) => Keep(_decisions, (snapshot, choice));

    public DiagnosticsProtocol.StepDecisions Decisions() => new([.. _decisions]);

    private readonly Queue<(WidthBudgetSnapshot, WidthBudgetChoice)> _widthDecisions = new();

    /// <summary>A width-budget decision for packed trees and the snapshot it was taken from (the last 4,096 are kept, for replay).</summary>
    public void DecidedWidth(WidthBudgetSnapshot snapshot, WidthBudgetChoice choice) => Keep(_widthDecisions, (snapshot, choice));

    public DiagnosticsProtocol.WidthDecisions WidthDecisions() => new([.. _widthDecisions]);

    public DiagnosticsProtocol.Overlap Snapshot() => new([.. _device], [.. _drafts], [.. _verifies], _paced, _overran, _prefillMs, _decodeMs, _ahead, _decodeRuns, _decodeSessionSteps);

    // The last MaxDecisions decisions, oldest first.
    private static void Keep<T>(Queue<T> log, T decision)
    {
        if (log.Count == MaxDecisions)
        {
            log.Dequeue();
        }

        log.Enqueue(decision);
    }

    private static void Add(List<Interval> list, Interval i)
    {
        if (list.Count < MaxIntervals && i.End != 0)
        {
            list.Add(i);
        }
    }
}
