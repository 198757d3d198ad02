using System.Collections.Immutable;
using System.Diagnostics;
using CoordGen.Engine.Runtime;
using CoordGen.Messages;

namespace CoordGen.Engine.Speculative;

/// <summary>
/// The drafting half of a speculative session: everything it drafts from (the prompt + output sequence,
/// the suffix automaton, the bigram and consensus indexes, the calibrated index, the history store's
/// cursor, draft reuse) and the tree it proposed last. It never touches the device: it hands out
/// <see cref="DraftProposal"/>s and learns from each step's <see cref="StepOutcome"/> and committed
/// tokens (<see cref="Advance"/>). One thread at a time: the drafter actor owns one per session; an
/// engine-only <see cref="SpeculativeSession"/> owns one and calls it inline.
/// </summary>
public sealed class SessionDrafter
{
    private readonly SpeculationOptions _spec;
    private readonly HistoryStore? _history;
    private readonly IFaultInjector? _faults;
    private readonly int _width;
    private readonly bool _useSam;
    private readonly List<int> _sequence;
    private readonly SuffixAutomaton _sam;
    private readonly NgramIndex? _ngrams;
    private readonly ConsensusIndex? _consensus;
    private readonly DraftReuse? _reuse;
    private readonly List<int[]> _branches = [];
    private CalibratedIndex? _calibrated;
    private DraftTree _tree;
    private List<int> _chainNodes;
    private int[] _draft;
    private MatchCursor _samCursor;
    private MatchCursor _calCursor;
    private MatchCursor _histCursor;
    private bool _chainTrusted;
    private bool _degradeNext;

    // The tree drafted ahead for the likely outcome of the step in flight (PrepareAhead).
    private DraftTree? _preTree;
    private List<int>? _preChain;
    private int[]? _preDraft;
    private int[] _preHyp = [];
    private int _preHypLength;
    private bool _preReady;
    private List<int>? _preSequence;
    private readonly List<int[]> _preBranches = [];

    /// <param name="prompt">The prompt (the indexes are built over it here).</param>
    /// <param name="calibrated">A calibrated index built with the prefill, or null (one may join later: <see cref="AttachCalibration"/>).</param>
    /// <param name="calibrationFailed">Calibration was asked for and failed: the first proposal reports a degraded step.</param>
    public SessionDrafter(ReadOnlySpan<int> prompt, int maxTokens, SpeculationOptions spec, HistoryStore? history, CalibratedIndex? calibrated = null, IFaultInjector? faults = null, bool calibrationFailed = false)
    {
        _spec = spec;
        _history = history is not null && spec.UseHistory ? history : null;
        _faults = faults;
        _width = spec.Width;
        _useSam = spec.Drafter == DrafterKind.Sam || spec.UseTree;
        _sam = new SuffixAutomaton(_useSam ? prompt.Length + maxTokens : 0);
        _sequence = new List<int>(prompt.Length + maxTokens + _width);
        _sequence.AddRange(prompt.ToArray());
        if (_useSam)
        {
            foreach (int t in prompt)
            {
                _samCursor = _sam.Advance(_samCursor, t);
                _sam.Extend(t);
            }
        }

        _ngrams = spec.UseTree ? new NgramIndex() : null;
        _consensus = spec.UseTree ? new ConsensusIndex() : null;
        if (_ngrams is not null)
        {
            foreach (int t in prompt)
            {
                _ngrams.Add(t);
                _consensus!.Add(t);
            }
        }

        _calibrated = calibrated;
        _calCursor = calibrated is null ? default : calibrated.Automaton.Match(prompt[Math.Max(0, prompt.Length - 4)..]);
        _histCursor = _history is not null ? _history.Automaton.Match(prompt[Math.Max(0, prompt.Length - 8)..]) : default;
        _reuse = spec.UseReuse ? new DraftReuse(_width - 1) : null;
        _tree = new DraftTree(_width - 1);
        _draft = new int[Math.Max(_width, PromptLookup.DraftLength)];
        _chainNodes = new List<int>(_width);
        _degradeNext = calibrationFailed;
    }

    /// <summary>Trees drafted ahead for the likely outcome that were used.</summary>
    public int AheadUsed { get; private set; }

    /// <summary>
    /// Joins a calibrated index built elsewhere (a calibrator) to the draft sources from the next draft
    /// on; null records a failed calibration (the session goes on without it).
    /// </summary>
    public void AttachCalibration(CalibratedIndex? index)
    {
        if (index is null || !_spec.UseCalibration)
        {
            _degradeNext = true;
            return;
        }

        _calibrated = index;
        var tail = System.Runtime.InteropServices.CollectionsMarshal.AsSpan(_sequence);
        _calCursor = index.Automaton.Match(tail[Math.Max(0, tail.Length - 4)..]);
    }

    /// <summary>
    /// Learns from the step just verified (<paramref name="outcome"/>; null for a step that verified no tree)
    /// and appends the tokens committed since the last call (<paramref name="committed"/>: those that joined
    /// the output, in order), then returns the next step's tree: the one drafted ahead when exactly its
    /// hypothesis happened, else a fresh draft.
    /// </summary>
    public DraftProposal Advance(StepOutcome? outcome, ReadOnlySpan<int> committed)
    {
        long t0 = Stopwatch.GetTimestamp();
        bool ahead = false;
        if (outcome is not null)
        {
            ahead = Learn(outcome);
        }

        foreach (int t in committed)
        {
            Append(t);
        }

        double learnMs = Stopwatch.GetElapsedTime(t0).TotalMilliseconds;
        if (ahead && outcome!.Emitted.AsSpan().SequenceEqual(_preHyp.AsSpan(0, _preHypLength)))
        {
            // The likely outcome happened: the tree drafted during verification is this state's tree.
            (_tree, _preTree) = (_preTree!, _tree);
            (_chainNodes, _preChain) = (_preChain!, _chainNodes);
            (_draft, _preDraft) = (_preDraft!, _draft);
            _chainTrusted = false;
            AheadUsed++;
            return Snapshot(learnMs, degraded: false);
        }

        return Propose(learnMs);
    }

    /// <summary>Drafts the next tree from the current state (the first step's, or after <see cref="Advance"/> without a proposal).</summary>
    public DraftProposal Propose(double extraMs = 0)
    {
        long t0 = Stopwatch.GetTimestamp();
        _tree.Clear();
        _chainNodes.Clear();
        bool degraded = false;
        try
        {
            _faults?.OnDraft();
            SpeculativeDecoder.BuildTree(_spec, _sequence, new(_sam, _calibrated, _history, _reuse, _ngrams, _consensus), new(_samCursor, _calCursor, _histCursor), _branches, _tree, _draft, _chainNodes, _chainTrusted);
        }
        catch (Exception ex) when (ex is not OperationCanceledException)
        {
            // A failed drafter degrades this step to plain verification (the root alone).
            _tree.Clear();
            _chainNodes.Clear();
            degraded = true;
        }

        return Snapshot(extraMs + Stopwatch.GetElapsedTime(t0).TotalMilliseconds, degraded);
    }

    private DraftProposal Snapshot(double ms, bool degraded)
    {
        int n = _tree.Count;
        var tokens = ImmutableArray.CreateBuilder<int>(n);
        var parents = ImmutableArray.CreateBuilder<int>(n);
        var sources = ImmutableArray.CreateBuilder<byte>(n);
        for (int i = 0; i < n; i++)
        {
            tokens.Add(_tree.Token(i));
            parents.Add(_tree.Parent(i));
            sources.Add((byte)_tree.Source(i));
        }

        degraded |= _degradeNext;
        _degradeNext = false;
        return new DraftProposal(tokens.MoveToImmutable(), parents.MoveToImmutable(), sources.MoveToImmutable(), [.. _chainNodes], ms, degraded);
    }

    // Chain trust and draft reuse from the verified step; true when a tree drafted ahead may apply.
    private bool Learn(StepOutcome o)
    {
        if (o.Width <= 1)
        {
            // A plain step where a tree could have run: nothing learned about acceptance.
            _reuse?.EndStep([], 0);
            _preReady = false;
            return false;
        }

        if (o.Width - 1 < _tree.Count)
        {
            _tree.Truncate(o.Width - 1);
            _chainNodes.RemoveAll(n => n >= o.Width - 1);
        }

        var kept = o.KeptRows.AsSpan();
        int chainAccepted = 0;
        while (chainAccepted < _chainNodes.Count && chainAccepted < kept.Length - 1 && kept[chainAccepted + 1] == _chainNodes[chainAccepted] + 1)
        {
            chainAccepted++;
        }

        _chainTrusted = _chainNodes.Count >= 3 && chainAccepted == _chainNodes.Count;
        if (_reuse is not null)
        {
            SpeculativeDecoder.ObserveReuse(_reuse, _tree, _chainNodes, o.RowArgmax.AsSpan(), _draft);
            _reuse.EndStep(o.Emitted.AsSpan(), _tree.Count);
        }

        bool ready = _preReady;
        _preReady = false;
        return ready;
    }

    private void Append(int token)
    {
        _sequence.Add(token);
        if (_useSam)
        {
            _samCursor = _sam.Advance(_samCursor, token);
            _sam.Extend(token);
        }

        _ngrams?.Add(token);
        _consensus?.Add(token);
        if (_calibrated is not null)
        {
            _calCursor = _calibrated.Automaton.Advance(_calCursor, token);
        }

        if (_history is not null)
        {
            _histCursor = _history.Automaton.Advance(_histCursor, token);
        }
    }

    /// <summary>
    /// Drafts the step after the one in flight for its most likely outcome (the last proposal's main chain
    /// fully accepted, and the model's next token being the chain's own continuation), reading this state
    /// and writing none of it; <see cref="Advance"/> uses it only if exactly that happens. Returns whether a
    /// tree was drafted. A drafter calls it while the device runs the step.
    /// </summary>
    public bool PrepareAhead()
    {
        _preReady = false;
        try
        {
            _preReady = DraftAhead();
        }
        catch (Exception ex) when (ex is not OutOfMemoryException)
        {
            _preReady = false;
        }

        return _preReady;
    }

    private bool DraftAhead()
    {
        int n = _chainNodes.Count;
        if (n == 0)
        {
            return false;
        }

        var seq = _preSequence ??= new List<int>(_sequence.Capacity);
        seq.Clear();
        seq.AddRange(_sequence);
        MatchCursor sc = _samCursor, cc = _calCursor, hc = _histCursor;
        void Push(int t)
        {
            seq.Add(t);
            sc = _useSam ? _sam.Advance(sc, t) : sc;
            cc = _calibrated is null ? cc : _calibrated.Automaton.Advance(cc, t);
            hc = _history is not null ? _history.Automaton.Advance(hc, t) : hc;
        }

        if (_preHyp.Length < n + 1)
        {
            _preHyp = new int[_width + 1];
        }

        for (int i = 0; i < n; i++)
        {
            _preHyp[i] = _tree.Token(_chainNodes[i]);
            Push(_preHyp[i]);
        }

        _preTree ??= new DraftTree(_width - 1);
        _preChain ??= new List<int>(_width);
        _preDraft ??= new int[_draft.Length];
        var branches = _preBranches;
        branches.Clear();

        // The model's next token after the chain, guessed as the drafters' own continuation.
        _preTree.Clear();
        _preChain.Clear();
        SpeculativeDecoder.BuildTree(_spec, seq, new(_sam, _calibrated, _history, null, null, _consensus), new(sc, cc, hc), branches, _preTree, _preDraft, _preChain, false);
        if (_preChain.Count == 0)
        {
            return false;
        }

        int guess = _preTree.Token(_preChain[0]);
        _preHyp[n] = guess;
        _preHypLength = n + 1;
        Push(guess);
        _preTree.Clear();
        _preChain.Clear();
        branches.Clear();
        SpeculativeDecoder.BuildTree(_spec, seq, new(_sam, _calibrated, _history, null, null, _consensus), new(sc, cc, hc), branches, _preTree, _preDraft, _preChain, false);
        return _preTree.Count > 0;
    }
}
