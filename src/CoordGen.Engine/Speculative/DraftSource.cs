namespace CoordGen.Engine.Speculative;

/// <summary>Where a draft token came from, for per-source accounting.</summary>
public enum DraftSource
{
    Prompt,
    History,
    Calibrated,
    Reused,
}

/// <summary>Per-source counters of one generation: proposed tree nodes and accepted tokens.</summary>
public sealed class DraftAccounting
{
    private readonly long[] _proposed = new long[4];
    private readonly long[] _accepted = new long[4];

    public int Steps { get; private set; }

    public long AcceptedTokens { get; private set; }

    public long EmittedTokens { get; private set; }

    public long WastedWidth { get; private set; }

    /// <summary>Steps (or whole calibrations) that fell back to plain verification because drafting failed.</summary>
    public int DegradedSteps { get; private set; }

    internal void Degrade() => DegradedSteps++;

    /// <summary>Tree steps whose tokens the per-node acceptance estimates predicted before the step (<see cref="NodeAcceptance"/>).</summary>
    public int PredictedSteps { get; private set; }

    /// <summary>Tokens those steps were expected to give, summed: beside <see cref="PredictedEmitted"/>, how well the width budget's estimates are calibrated.</summary>
    public double PredictedTokens { get; private set; }

    /// <summary>Tokens those steps gave.</summary>
    public long PredictedEmitted { get; private set; }

    internal void Expected(double predicted, int emitted)
    {
        PredictedSteps++;
        PredictedTokens += predicted;
        PredictedEmitted += emitted;
    }

    public long Proposed(DraftSource s) => _proposed[(int)s];

    public long Accepted(DraftSource s) => _accepted[(int)s];

    /// <summary>Mean tokens committed per verification step (accepted drafts plus the bonus token): the paper's acceptance ratio.</summary>
    public double MeanAccepted => Steps == 0 ? 0 : (double)EmittedTokens / Steps;

    private readonly SortedDictionary<int, int> _stepsByWidth = [];

    /// <summary>Verification steps per width the step ran at (adaptive width's choices; 1 = a plain step).</summary>
    public IReadOnlyDictionary<int, int> StepsByWidth => _stepsByWidth;

    internal void Step(int width, int nodes, int accepted, int emitted)
    {
        Steps++;
        _stepsByWidth[width] = _stepsByWidth.GetValueOrDefault(width) + 1;
        AcceptedTokens += accepted;
        EmittedTokens += emitted;
        WastedWidth += width - 1 - nodes;
    }

    internal void Propose(DraftSource s) => _proposed[(int)s]++;

    internal void Accept(DraftSource s) => _accepted[(int)s]++;
}
