using System.Diagnostics;
using CoordGen.Engine.Generation;
using CoordGen.Engine.Runtime;

namespace CoordGen.Engine.Speculative;

/// <summary>
/// One speculative generation as a sequence of steps, so a scheduler can interleave many sessions on one
/// device: each <see cref="Step"/> drafts a token tree, verifies it in one device pass, commits the
/// accepted path and emits its tokens. A step can also run in halves, with acceptance elsewhere
/// (a verifier actor): <see cref="BeginStep"/> (draft, device run, keys/values staged), then
/// <see cref="TreeVerifier.Verify"/>, then <see cref="Apply"/> (commit, emit). <see cref="SpeculativeDecoder.Generate(Prefilled, int, SamplingOptions, IReadOnlySet{int}, SpeculationOptions, HistoryStore?, Func{int, bool}?, CancellationToken)"/>
/// is this loop run to the end. Owns its KV cache (a copy of the prefill's).
/// </summary>
public sealed class SpeculativeSession : IDisposable
{
    private readonly OrtModelRuntime _runtime;
    private readonly Generator _plain;
    private readonly SpeculationOptions _spec;
    private readonly HistoryStore? _history;
    private readonly IReadOnlySet<int> _stops;
    private readonly Func<int, bool>? _onToken;
    private readonly Action<TokenLogprobs>? _onLogprobs;
    private readonly List<TokenLogprobs>? _logprobs;
    private float[] _logprobRows = [];
    private int _logprobVocab;
    private readonly int _maxTokens;
    private readonly int _width;
    private readonly Sampler _sampler;
    private readonly bool _greedy;
    private readonly KvCache _cache;
    private readonly DraftAccounting _acct = new();
    private readonly List<int> _sequence;
    private readonly SuffixAutomaton _sam;
    private readonly NgramIndex? _ngrams;
    private readonly ConsensusIndex? _consensus;
    private CalibratedIndex? _calibrated;
    private readonly DraftReuse? _reuse;
    private DraftTree _tree;
    private readonly List<int[]> _branches = [];
    private readonly List<int> _output = [];
    private List<int> _chainNodes;
    private int[] _draft;
    private readonly int[] _rowParents;
    private readonly int _promptLength;
    private readonly double _prefillMs;
    private readonly Stopwatch _clock = Stopwatch.StartNew();
    private MatchCursor _samCursor;
    private MatchCursor _calCursor;
    private MatchCursor _histCursor;
    private int _root;
    private bool _chainTrusted;
    private bool _prepared;
    private double _draftMs;
    private double _deviceMs;
    private double _calMs;
    private string _reason = "length";

    internal SpeculativeSession(OrtModelRuntime runtime, Generator plain, Prefilled pre, int maxTokens, SamplingOptions sampling, IReadOnlySet<int> stopTokens,
        SpeculationOptions spec, HistoryStore? history, Func<int, bool>? onToken, bool adoptCache = false, Action<TokenLogprobs>? onLogprobs = null)
    {
        if (maxTokens < 1)
        {
            throw new ArgumentOutOfRangeException(nameof(maxTokens), $"max tokens must be at least 1 (got {maxTokens}).");
        }

        if (spec.UseCalibration && pre.TopK is null && !pre.CalibrationFailed && !pre.CalibrationDeferred)
        {
            throw new ArgumentException("calibration needs a prefill with top-k: call Prefill with calibration options.");
        }

        _runtime = runtime;
        _plain = plain;
        _spec = spec;
        _history = history;
        _stops = stopTokens;
        _onToken = onToken;
        _onLogprobs = onLogprobs;
        _logprobs = sampling.Logprobs is null ? null : [];
        _maxTokens = maxTokens;
        _width = spec.Width;
        _sampler = new Sampler(sampling);
        _greedy = sampling.IsGreedy;
        if (adoptCache)
        {
            _cache = pre.Adopt();
        }
        else
        {
            _cache = runtime.CreateCache();
            _cache.CopyFrom(pre.Cache);
        }

        // Decode time starts here: a copy of the prefilled cache is the caller's choice (a benchmark decodes
        // several methods from one prefill, and times plain decoding after its copy too). Building the draft
        // indexes over the prompt below counts.
        _clock.Restart();

        ReadOnlySpan<int> prompt = pre.Prompt;
        _promptLength = prompt.Length;
        _prefillMs = pre.PrefillMs;
        PrefillTopK? topK = spec.UseCalibration ? pre.TopK : null;
        _calMs = topK is null ? 0 : pre.TopKMs;

        long tc = Stopwatch.GetTimestamp();
        _sam = new SuffixAutomaton(spec.Drafter == DrafterKind.Sam || spec.UseTree ? prompt.Length + maxTokens : 0);
        _sequence = new List<int>(prompt.Length + maxTokens + _width);
        _sequence.AddRange(prompt.ToArray());
        if (spec.Drafter == DrafterKind.Sam || spec.UseTree)
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

        try
        {
            _calibrated = topK is null ? null : CalibratedIndex.Build(_sequence, topK, spec.Calibration);
        }
        catch (Exception ex) when (ex is not OperationCanceledException)
        {
            _acct.Degrade();
        }

        _calCursor = _calibrated is null ? default : _calibrated.Automaton.Match(prompt[Math.Max(0, prompt.Length - 4)..]);
        _calMs += Stopwatch.GetElapsedTime(tc).TotalMilliseconds;
        _histCursor = history is not null && spec.UseHistory ? history.Automaton.Match(prompt[Math.Max(0, prompt.Length - 8)..]) : default;
        _reuse = spec.UseReuse ? new DraftReuse(_width - 1) : null;
        _tree = new DraftTree(_width - 1);
        _draft = new int[Math.Max(_width, PromptLookup.DraftLength)];
        _rowParents = new int[_width];
        _chainNodes = new List<int>(_width);

        _root = _sampler.Next(pre.LastLogits);
        _draws = _sampler.Draws;
        Done = !Emit(_root, pre.LastLogits);
    }

    /// <summary>
    /// Joins a calibrated index built elsewhere (a calibrator actor, from a prefill with
    /// <see cref="Prefilled.CalibrationDeferred"/>) to the draft sources from the next draft on; null
    /// records a failed calibration (the session goes on without it). Call between steps, never while
    /// <see cref="Step"/> or <see cref="PrepareDraft"/> runs.
    /// </summary>
    public void AttachCalibration(CalibratedIndex? index, double calibrationMs)
    {
        _calMs += calibrationMs;
        if (index is null || !_spec.UseCalibration)
        {
            _acct.Degrade();
            return;
        }

        _calibrated = index;
        var tail = System.Runtime.InteropServices.CollectionsMarshal.AsSpan(_sequence);
        _calCursor = index.Automaton.Match(tail[Math.Max(0, tail.Length - 4)..]);
    }

    /// <summary>Generation has ended (a stop token, max tokens, capacity, or the consumer declined a token).</summary>
    public bool Done { get; private set; }

    /// <summary>Tokens emitted so far.</summary>
    public IReadOnlyList<int> Output => _output;

    /// <summary>Each output token's log-probabilities (from the logits row that chose it), when <see cref="SamplingOptions.Logprobs"/> asked for them; otherwise null.</summary>
    public IReadOnlyList<TokenLogprobs>? Logprobs => _logprobs;

    public DraftAccounting Accounting => _acct;

    /// <summary>One draft-verify-commit step, acceptance inline. Returns <see cref="Done"/>.</summary>
    public bool Step(CancellationToken cancellation = default)
    {
        if (BeginStep(cancellation) is not { } verify)
        {
            return Done;
        }

        return Apply(TreeVerifier.Verify(verify, _greedy ? null : _sampler));
    }

    private enum Pending
    {
        None,

        /// <summary>A plain step near the cache's capacity.</summary>
        Capacity,

        /// <summary>Adaptive width chose width 1: a plain step that counts as a verification step.</summary>
        Narrow,

        /// <summary>A token tree: its rows are staged in the cache until the verdict keeps the accepted path.</summary>
        Tree,
    }

    private Pending _pending;
    private int _stepNumber;
    private int _pendingWidth;
    private bool _pendingPredraft;
    private int[] _pendingArgmax = [];
    private long _draws;

    /// <summary>The step whose verdict this session waits for (<see cref="Apply"/>); null when none.</summary>
    public int? AwaitingStep => _pending == Pending.None ? null : _stepNumber;

    /// <summary>
    /// The device half of a step: drafts (unless a draft is prepared), runs the token tree (or one plain
    /// token) on the device, writes every row's keys/values after the committed slots, and returns what
    /// acceptance needs; null when the session is done. <see cref="Apply"/> with the verdict
    /// (<see cref="TreeVerifier.Verify"/>, inline or on a verifier actor) ends the step; until then
    /// the session must not be stepped or drafted.
    /// </summary>
    /// <param name="ownRows">Copy the logits rows into the result (sampling only), so it outlives the
    /// device's buffers (a verifier actor reads it while the device runs other steps); otherwise the
    /// result reads the buffers and must be verified before the next device run.</param>
    public TreeToVerify? BeginStep(CancellationToken cancellation = default, bool ownRows = false)
    {
        if (Done)
        {
            return null;
        }

        if (_pending != Pending.None)
        {
            throw new InvalidOperationException($"step {_stepNumber} waits for its verdict: apply it before the next step.");
        }

        cancellation.ThrowIfCancellationRequested();
        if (_cache.Length + _width + 1 >= _cache.Capacity)
        {
            // Too close to capacity for a tree step: finish with plain steps, exactly like the baseline.
            if (_cache.Length + 1 >= _cache.Capacity)
            {
                _reason = "capacity";
                Done = true;
                return null;
            }

            return Single(_plain.Step(_cache, _root), Pending.Capacity);
        }

        if (!_prepared)
        {
            long ti = Stopwatch.GetTimestamp();
            Draft();
            InlineDraftMs += Stopwatch.GetElapsedTime(ti).TotalMilliseconds;
        }

        _prepared = false;
        int width = _spec.AdaptiveWidth ? ChooseWidth() : _width;
        if (width == 1)
        {
            // Nothing worth verifying: the root alone on the width-1 graph, exactly a plain step.
            return Single(_plain.Step(_cache, _root), Pending.Narrow);
        }

        if (width < _width)
        {
            _tree.Truncate(width - 1);
            _chainNodes.RemoveAll(n => n >= width - 1);
        }

        var buf = _runtime.Buffers(width, _cache);
        buf.TokenIds[0] = _root;
        buf.Positions[0] = _cache.Length;
        for (int i = 0; i < _tree.Count; i++)
        {
            buf.TokenIds[i + 1] = _tree.Token(i);
            buf.Positions[i + 1] = _cache.Length + _tree.Depth(i);
        }

        for (int i = _tree.Count + 1; i < width; i++)
        {
            buf.TokenIds[i] = 0;
            buf.Positions[i] = _cache.Length;
        }

        AttentionMask.FillTree(buf.Mask, width, buf.Capacity, _cache.Length, _rowParents.AsSpan(0, _tree.Count + 1));

        // The drafter may prepare the next step from the likely outcome while the device runs this one.
        bool predrafting = DuringVerify is not null && width == _width;
        if (predrafting)
        {
            Volatile.Write(ref _preState, PreIdle);
            DuringVerify!(RunPreDraft);
        }

        long t1 = Stopwatch.GetTimestamp();
        try
        {
            _runtime.Run(width, _cache);
        }
        finally
        {
            // Nothing below may run while the pre-draft reads this session's state: call it off if it
            // has not started, else wait for it (microseconds of CPU work).
            if (predrafting && Interlocked.CompareExchange(ref _preState, PreAbandoned, PreIdle) == PreRunning)
            {
                SpinWait.SpinUntil(() => Volatile.Read(ref _preState) == PreDone);
            }
        }

        _deviceMs += Stopwatch.GetElapsedTime(t1).TotalMilliseconds;

        // Every row's keys/values go after the committed slots now (the device's buffers are reused by
        // the next run); the verdict keeps the accepted path's rows.
        _cache.WriteLayers(0, _cache.Layers, buf.NewKeys, buf.NewValues, width, width, _cache.Length);
        int rows = _tree.Count + 1;
        var tokens = new int[_tree.Count];
        var parents = new int[_tree.Count];
        for (int i = 0; i < tokens.Length; i++)
        {
            tokens[i] = _tree.Token(i);
            parents[i] = _tree.Parent(i);
        }

        _pendingArgmax = new int[rows];
        for (int r = 0; r < rows; r++)
        {
            _pendingArgmax[r] = buf.Argmax(r);
        }

        ReadOnlyMemory<float> logits = _greedy ? default : ownRows ? buf.Logits.AsSpan(0, rows * buf.VocabSize).ToArray() : buf.Logits.AsMemory(0, rows * buf.VocabSize);
        KeepLogprobRows(buf.Logits.AsSpan(0, rows * buf.VocabSize), buf.VocabSize);
        _pending = Pending.Tree;
        _pendingWidth = width;
        _pendingPredraft = predrafting;
        return new TreeToVerify(++_stepNumber, tokens, parents, _pendingArgmax, logits, buf.VocabSize, _draws);
    }

    /// <summary>A plain step's row as a tree with no nodes (its key/value slot is committed already).</summary>
    private TreeToVerify Single(ReadOnlySpan<float> row, Pending kind)
    {
        _pending = kind;
        _pendingArgmax = [Sampler.Argmax(row)];
        KeepLogprobRows(row, row.Length);
        ReadOnlyMemory<float> logits = _greedy ? default : row.ToArray();
        return new TreeToVerify(++_stepNumber, [], [], _pendingArgmax, logits, row.Length, _draws);
    }

    /// <summary>
    /// Ends the step <see cref="BeginStep"/> began with its verdict: commits the accepted path's keys
    /// and values, updates acceptance statistics and draft reuse, and emits the tokens. Returns
    /// <see cref="Done"/>. A verdict for another step than <see cref="AwaitingStep"/> is refused.
    /// </summary>
    public bool Apply(TreeVerdict verdict)
    {
        ArgumentNullException.ThrowIfNull(verdict);
        if (AwaitingStep != verdict.Step)
        {
            throw new InvalidOperationException($"verdict for step {verdict.Step}, but the session waits for {(AwaitingStep is { } s ? $"step {s}" : "none")}: a stale verdict must be dropped.");
        }

        var kind = _pending;
        _pending = Pending.None;
        _draws = verdict.Draws;
        var emitted = verdict.Emitted;
        if (kind != Pending.Tree)
        {
            if (kind == Pending.Narrow)
            {
                _acct.Step(1, 0, 0, 1); // no tree verified: nothing learned about acceptance
                _reuse?.EndStep([], 0);
            }

            _root = emitted[0];
            Done = !Emit(_root, LogprobRow(0));
            return Done;
        }

        int width = _pendingWidth;
        var kept = verdict.Rows;
        for (int i = 1; i < kept.Length; i++)
        {
            _acct.Accept(_tree.Source(kept[i] - 1));
        }

        _acct.Step(width, _tree.Count, verdict.Accepted, emitted.Length);
        Observe(verdict.Accepted, width);
        int chainAccepted = 0;
        while (chainAccepted < _chainNodes.Count && chainAccepted < kept.Length - 1 && kept[chainAccepted + 1] == _chainNodes[chainAccepted] + 1)
        {
            chainAccepted++;
        }

        _chainTrusted = _chainNodes.Count >= 3 && chainAccepted == _chainNodes.Count;
        _cache.Keep(kept);

        long t2 = Stopwatch.GetTimestamp();
        if (_reuse is not null)
        {
            SpeculativeDecoder.ObserveReuse(_reuse, _tree, _chainNodes, _pendingArgmax, _draft);
            _reuse.EndStep(emitted, _tree.Count);
        }

        _draftMs += Stopwatch.GetElapsedTime(t2).TotalMilliseconds;
        for (int j = 0; j < emitted.Length; j++)
        {
            int y = emitted[j];
            _root = y;
            if (!Emit(y, LogprobRow(verdict.Rows[j])))
            {
                Done = true;
                break;
            }
        }

        if (_pendingPredraft && !Done && Volatile.Read(ref _preState) == PreDone && _preReady && emitted.AsSpan().SequenceEqual(_preHyp.AsSpan(0, _preHypLength)))
        {
            // The likely outcome happened: the tree drafted during verification is this state's tree.
            (_tree, _preTree) = (_preTree!, _tree);
            (_chainNodes, _preChain) = (_preChain!, _chainNodes);
            (_draft, _preDraft) = (_preDraft!, _draft);
            _tree.RowParents(_rowParents);
            _chainTrusted = false;
            _prepared = true;
            PreDraftsUsed++;
        }

        return Done;
    }

    private const int PreIdle = 0, PreRunning = 1, PreDone = 2, PreAbandoned = 3;
    private int _preState = PreAbandoned;
    private bool _preReady;
    private DraftTree? _preTree;
    private List<int>? _preChain;
    private int[]? _preDraft;
    private int[] _preHyp = [];
    private List<int>? _preSequence;
    private readonly List<int[]> _preBranches = [];
    private int _preHypLength;

    /// <summary>
    /// Set by a scheduler with a drafter of its own (the device actor): called with a job when this
    /// session's verification starts; run the job elsewhere while the device computes. The job drafts
    /// the next step for the most likely outcome (the main chain fully accepted and the model's next
    /// token being the chain's own continuation); the step uses it only if exactly that happened, and
    /// drafts inline otherwise. The job may run at most once, during the device run (later it does
    /// nothing); the step waits for a job that started.
    /// </summary>
    public Action<Func<bool>>? DuringVerify { get; set; }

    /// <summary>Steps whose tree came from a draft prepared during the previous step's verification.</summary>
    public int PreDraftsUsed { get; private set; }

    private bool RunPreDraft()
    {
        if (Interlocked.CompareExchange(ref _preState, PreRunning, PreIdle) != PreIdle)
        {
            return false; // the step is past its device run: too late
        }

        try
        {
            _preReady = false;
            _preReady = PreDraft();
            return _preReady;
        }
        catch (Exception ex) when (ex is not OutOfMemoryException)
        {
            return false;
        }
        finally
        {
            Volatile.Write(ref _preState, PreDone);
        }
    }

    /// <summary>Reads this session's state, never writes it: runs while the device runs the step.</summary>
    private bool PreDraft()
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
        bool useSam = _spec.Drafter == DrafterKind.Sam || _spec.UseTree;
        bool useHistory = _history is not null && _spec.UseHistory;
        void Push(int t)
        {
            seq.Add(t);
            sc = useSam ? _sam.Advance(sc, t) : sc;
            cc = _calibrated is null ? cc : _calibrated.Automaton.Advance(cc, t);
            hc = useHistory ? _history!.Automaton.Advance(hc, t) : hc;
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

    /// <summary>
    /// Drafts the next step's token tree now (CPU only: no device buffers are touched), so a drafter can
    /// prepare this session while the device verifies another; the next <see cref="Step"/> uses it.
    /// Returns false when there is nothing to draft (done, or a plain step comes next).
    /// </summary>
    public bool PrepareDraft()
    {
        if (Done || _prepared || _pending != Pending.None || _cache.Length + _width + 1 >= _cache.Capacity)
        {
            return false;
        }

        Draft();
        _prepared = true;
        return true;
    }

    private const int Saturated = 1 << 16;
    private readonly int[] _recent = new int[16];
    private int _recentCount;
    private int _adaptiveSteps;

    /// <summary>The compiled widths adaptive width chooses from (1 = plain up to the full width), ascending.</summary>
    private int[]? _candidateWidths;

    /// <summary>The decoder's memory of recent steps across sessions (the prior before this session has its own).</summary>
    internal AcceptanceMemory? SharedAcceptance { get; init; }

    private void Observe(int acceptedDraftTokens, int width)
    {
        // A step that accepted everything its width allowed says "at least": count it as full acceptance
        // at any width, or narrow steps would keep the estimate narrow.
        if (acceptedDraftTokens >= width - 1)
        {
            acceptedDraftTokens = Saturated;
        }

        _recent[_recentCount++ % _recent.Length] = acceptedDraftTokens;
        if (_spec.AdaptiveWidth)
        {
            SharedAcceptance?.Add(acceptedDraftTokens);
        }
    }

    /// <summary>
    /// The compiled width (1 = plain) with the most expected tokens per millisecond: expected tokens at
    /// width w = 1 + the mean over recent steps of min(accepted, w - 1, this tree's size), cost = the
    /// runtime's recent run time of that graph plus this session's drafting per step. A width never
    /// run yet is tried once; every 16th step runs the full width, so acceptance beyond a narrow
    /// width keeps being seen.
    /// </summary>
    private int ChooseWidth()
    {
        _adaptiveSteps++;
        int nodes = _tree.Count;
        int chosen;
        if (nodes == 0)
        {
            chosen = 1;
        }
        else if (_adaptiveSteps % 16 == 0)
        {
            chosen = _width;
        }
        else
        {
            // This session's own recent steps, or (for its first 4) the decoder's recent steps.
            Span<int> seen = stackalloc int[_recent.Length];
            int n = Math.Min(_recentCount, _recent.Length);
            if (n >= 4)
            {
                _recent.AsSpan(0, n).CopyTo(seen);
            }
            else
            {
                n = SharedAcceptance?.Recent(seen) ?? 0;
            }

            chosen = _width;
            double best = n < 4 ? double.MaxValue : -1; // nothing to go on yet: the full width
            double draftMs = _acct.Steps == 0 ? 0 : _draftMs / _acct.Steps;
            _candidateWidths ??= [.. _runtime.Widths.Where(w => w <= _width).Order()];
            foreach (int w in _candidateWidths)
            {
                if ((_spec.WidthCostMs is { } cost ? cost(w) : _runtime.RecentRunMs(w, _cache.Bucket)) is not { } ms)
                {
                    chosen = w; // never measured: measure it now
                    break;
                }

                double tokens = 1;
                if (w > 1)
                {
                    int cap = Math.Min(w - 1, nodes);
                    double sum = 0;
                    for (int i = 0; i < n; i++)
                    {
                        sum += Math.Min(seen[i], cap);
                    }

                    tokens += sum / n;
                    ms += draftMs;
                }

                double rate = tokens / Math.Max(1e-6, ms);
                if (rate > best)
                {
                    best = rate;
                    chosen = w;
                }
            }
        }

        return chosen;
    }

    /// <summary>Milliseconds spent drafting inside <see cref="Step"/> because no prepared draft was waiting.</summary>
    public double InlineDraftMs { get; private set; }

    private void Draft()
    {
        long t0 = Stopwatch.GetTimestamp();
        _tree.Clear();
        _chainNodes.Clear();
        try
        {
            _runtime.Faults?.OnDraft();
            SpeculativeDecoder.BuildTree(_spec, _sequence, new(_sam, _calibrated, _history, _reuse, _ngrams, _consensus), new(_samCursor, _calCursor, _histCursor), _branches, _tree, _draft, _chainNodes, _chainTrusted);
        }
        catch (Exception ex) when (ex is not OperationCanceledException)
        {
            // A failed drafter degrades this step to plain verification (the root alone).
            _tree.Clear();
            _chainNodes.Clear();
            _acct.Degrade();
        }

        _tree.RowParents(_rowParents);
        for (int i = 0; i < _tree.Count; i++)
        {
            _acct.Propose(_tree.Source(i));
        }

        _draftMs += Stopwatch.GetElapsedTime(t0).TotalMilliseconds;
    }

    /// <summary>The outcome so far (complete once <see cref="Done"/>).</summary>
    public SpeculativeResult Result()
    {
        var stats = new GenerationStats
        {
            PromptTokens = _promptLength,
            GeneratedTokens = _output.Count,
            PrefillMs = _prefillMs,
            DecodeMs = _clock.Elapsed.TotalMilliseconds,
            DecodeRunMs = _deviceMs,
            StopReason = _reason,
        };
        return new SpeculativeResult(_output, stats, _acct, _draftMs, _calMs, _deviceMs) { Logprobs = _logprobs };
    }

    public void Dispose() => _cache.Dispose();

    // Keeps the step's logits rows until its verdict says which rows chose the emitted tokens (only when
    // log-probabilities are asked for: the device's buffers are reused before a verifier actor answers).
    private void KeepLogprobRows(ReadOnlySpan<float> rows, int vocab)
    {
        if (_logprobs is null)
        {
            return;
        }

        if (_logprobRows.Length < rows.Length)
        {
            _logprobRows = new float[rows.Length];
        }

        rows.CopyTo(_logprobRows);
        _logprobVocab = vocab;
    }

    private ReadOnlySpan<float> LogprobRow(int row) => _logprobs is null ? default : _logprobRows.AsSpan(row * _logprobVocab, _logprobVocab);

    // Appends a chosen token (from logits row <paramref name="row"/>, read only for log-probabilities): stop
    // tokens end generation; otherwise it joins the output and the indexes.
    private bool Emit(int token, ReadOnlySpan<float> row)
    {
        if (_stops.Contains(token))
        {
            _reason = "stop";
            return false;
        }

        _output.Add(token);
        if (_logprobs is not null)
        {
            var lp = TokenLogprobs.Of(row, token, _sampler.Options.Logprobs!.Value);
            _logprobs.Add(lp);
            _onLogprobs?.Invoke(lp);
        }

        _sequence.Add(token);
        if (_spec.Drafter == DrafterKind.Sam || _spec.UseTree)
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

        if (_history is not null && _spec.UseHistory)
        {
            _histCursor = _history.Automaton.Advance(_histCursor, token);
        }

        if (_onToken is not null && !_onToken(token))
        {
            _reason = "stop";
            return false;
        }

        if (_output.Count >= _maxTokens)
        {
            _reason = "length";
            return false;
        }

        return true;
    }
}
