using System.Diagnostics;
using CoordGen.Engine.Generation;
using CoordGen.Engine.Runtime;
using CoordGen.Messages;

namespace CoordGen.Engine.Speculative;

/// <summary>
/// One speculative generation as a sequence of steps, so a scheduler can interleave many sessions on one
/// device: each <see cref="Step"/> takes a token tree, verifies it in one device pass, commits the
/// accepted path and emits its tokens. This is the device's half: the KV cache, the root token, the
/// verification width, the sampler's position and the output. The trees come from a
/// <see cref="SessionDrafter"/>: one this session owns and calls inline, or, with an external drafter
/// (a drafter actor), trees <see cref="Offer"/>ed to it, each step's outcome handed back through
/// <see cref="TakeAdvance"/>. A step can also run in halves, with acceptance elsewhere (a verifier
/// actor): <see cref="BeginStep"/> (device run, keys/values staged), then <see cref="TreeVerifier.Verify"/>,
/// then <see cref="Apply"/> (commit, emit). <see cref="SpeculativeDecoder.Generate(Prefilled, int, SamplingOptions, IReadOnlySet{int}, SpeculationOptions, HistoryStore?, Func{int, bool}?, CancellationToken)"/>
/// is this loop run to the end. Owns its KV cache (a copy of the prefill's).
/// </summary>
public sealed class SpeculativeSession : IDisposable
{
    private readonly OrtModelRuntime _runtime;
    private readonly Generator _plain;
    private readonly SpeculationOptions _spec;
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
    private readonly SessionDrafter? _drafter;
    private readonly List<int> _output = [];
    private readonly List<int> _committed = [];
    private readonly int[] _rowParents;
    private readonly int[] _depths;
    private readonly int _promptLength;
    private readonly double _prefillMs;
    private readonly Stopwatch _clock = Stopwatch.StartNew();
    private DraftProposal? _proposal;
    private DraftProposal _inFlight = DraftProposal.Empty;
    private StepOutcome? _outcome;
    private int _nodes;
    private int _root;
    private double _draftMs;
    private double _deviceMs;
    private double _calMs;
    private string _reason = "length";

    /// <param name="externalDrafter">Trees come from outside (<see cref="Offer"/>), the outcome of each step goes back through <see cref="TakeAdvance"/>; else this session drafts inline with a <see cref="SessionDrafter"/> of its own.</param>
    internal SpeculativeSession(OrtModelRuntime runtime, Generator plain, Prefilled pre, int maxTokens, SamplingOptions sampling, IReadOnlySet<int> stopTokens,
        SpeculationOptions spec, HistoryStore? history, Func<int, bool>? onToken, bool adoptCache = false, Action<TokenLogprobs>? onLogprobs = null, bool externalDrafter = false)
    {
        if (maxTokens < 1)
        {
            throw new ArgumentOutOfRangeException(nameof(maxTokens), $"max tokens must be at least 1 (got {maxTokens}).");
        }

        if (!externalDrafter && spec.UseCalibration && pre.TopK is null && !pre.CalibrationFailed && !pre.CalibrationDeferred)
        {
            throw new ArgumentException("calibration needs a prefill with top-k: call Prefill with calibration options.");
        }

        _runtime = runtime;
        _plain = plain;
        _spec = spec;
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
        _promptLength = pre.Prompt.Length;
        _prefillMs = pre.PrefillMs;
        _rowParents = new int[_width];
        _depths = new int[_width];
        if (!externalDrafter)
        {
            PrefillTopK? topK = spec.UseCalibration ? pre.TopK : null;
            _calMs = topK is null ? 0 : pre.TopKMs;
            long tc = Stopwatch.GetTimestamp();
            CalibratedIndex? calibrated = null;
            try
            {
                calibrated = topK is null ? null : CalibratedIndex.Build(pre.Prompt, topK, spec.Calibration);
            }
            catch (Exception ex) when (ex is not OperationCanceledException)
            {
                _acct.Degrade();
            }

            _calMs += Stopwatch.GetElapsedTime(tc).TotalMilliseconds;
            _drafter = new SessionDrafter(pre.Prompt, maxTokens, spec, history, calibrated, runtime.Faults);
        }

        _root = _sampler.Next(pre.LastLogits);
        _draws = _sampler.Draws;
        Done = !Emit(_root, pre.LastLogits);
    }

    /// <summary>Generation has ended (a stop token, max tokens, capacity, or the consumer declined a token).</summary>
    public bool Done { get; private set; }

    /// <summary>Tokens emitted so far.</summary>
    public IReadOnlyList<int> Output => _output;

    /// <summary>Each output token's log-probabilities (from the logits row that chose it), when <see cref="SamplingOptions.Logprobs"/> asked for them; otherwise null.</summary>
    public IReadOnlyList<TokenLogprobs>? Logprobs => _logprobs;

    public DraftAccounting Accounting => _acct;

    /// <summary>With an inline drafter: also draft each next step ahead for its likely outcome, as a drafter actor does during the device run (tests of that path).</summary>
    public bool DraftAhead { get; set; }

    /// <summary>Trees drafted ahead that were used (inline drafter only).</summary>
    public int AheadUsed => _drafter?.AheadUsed ?? 0;

    /// <summary>The next step needs a tree and none has been offered (external drafter only).</summary>
    public bool NeedsProposal => _drafter is null && !Done && _pending == Pending.None && _proposal is null && !NearCapacity;

    private bool NearCapacity => _cache.Length + _width + 1 >= _cache.Capacity;

    /// <summary>Whether a tree step of <paramref name="width"/> rows fits this session's cache (a packed run may be wider than its own width).</summary>
    public bool RoomForTree(int width) => _cache.Length + width + 1 < _cache.Capacity;

    /// <summary>The tree for the next step, from an external drafter.</summary>
    public void Offer(DraftProposal proposal)
    {
        if (_drafter is not null)
        {
            throw new InvalidOperationException("this session drafts inline: it takes no offered trees.");
        }

        _proposal = proposal;
    }

    /// <summary>
    /// What an external drafter learns from since the last call: the outcome of the step just applied
    /// (null when it verified no tree) and the tokens committed since (the first call after the start
    /// returns the first token).
    /// </summary>
    public (StepOutcome? Outcome, int[] Committed) TakeAdvance()
    {
        var r = (_outcome, _committed.ToArray());
        _outcome = null;
        _committed.Clear();
        return r;
    }

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
    private int[] _pendingArgmax = [];
    private long _draws;

    /// <summary>Steps begun so far: the next tree offered is for step <see cref="Steps"/> + 1.</summary>
    public int Steps => _stepNumber;

    /// <summary>
    /// What the pending step's outcome will tell a drafter: the graph width of a tree step, 1 for a plain
    /// step where a tree could have run, 0 for a step that verified no tree (near the cache's capacity).
    /// </summary>
    public int PendingOutcomeWidth => _pending switch { Pending.Tree => _pendingWidth, Pending.Narrow => 1, _ => 0 };

    /// <summary>The step whose verdict this session waits for (<see cref="Apply"/>); null when none.</summary>
    public int? AwaitingStep => _pending == Pending.None ? null : _stepNumber;

    /// <summary>
    /// The device half of a step: takes the next tree (drafted inline, or the one offered), runs it (or one
    /// plain token) on the device, writes every row's keys/values after the committed slots, and returns
    /// what acceptance needs; null when the session is done. <see cref="Apply"/> with the verdict
    /// (<see cref="TreeVerifier.Verify"/>, inline or on a verifier actor) ends the step; until then
    /// the session must not be stepped.
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
        if (NearCapacity)
        {
            // Too close to capacity for a tree step: finish with plain steps, exactly like the baseline.
            _proposal = null;
            if (_cache.Length + 1 >= _cache.Capacity)
            {
                _reason = "capacity";
                Done = true;
                return null;
            }

            return Single(_plain.Step(_cache, _root), Pending.Capacity);
        }

        var tree = TakeTree();
        int width = _spec.AdaptiveWidth ? ChooseWidth(tree) : _width;
        if (width == 1)
        {
            // Nothing worth verifying: the root alone on the width-1 graph, exactly a plain step.
            return Single(_plain.Step(_cache, _root), Pending.Narrow);
        }

        var buf = _runtime.Buffers(width, _cache);
        FillTree(buf, width, tree);
        long t1 = Stopwatch.GetTimestamp();
        _runtime.Run(width, _cache);
        _deviceMs += Stopwatch.GetElapsedTime(t1).TotalMilliseconds;
        return FinishTree(buf, width, tree, ownRows);
    }

    /// <summary>
    /// The graph width of the next step if it is a tree step, read without taking anything: what
    /// <see cref="BeginStep"/> would run now, or 0 when the next step is not a tree (done, a verdict awaited,
    /// near the cache's capacity, no tree offered yet, or adaptive width would verify the root alone).
    /// </summary>
    public int NextTreeWidth
    {
        get
        {
            if (Done || _pending != Pending.None || NearCapacity || _proposal is not { } tree)
            {
                return 0;
            }

            int width = _spec.AdaptiveWidth ? ChooseWidth(tree, peek: true) : _width;
            return width >= 2 ? width : 0;
        }
    }

    /// <summary>
    /// Expected tokens of the next step if it verifies the offered tree at <paramref name="width"/> rows (the root and the
    /// tree's first <c>width - 1</c> nodes), from how often this session's nodes of each source and depth were accepted
    /// lately (<see cref="NodeAcceptance"/>); 1 when no tree is offered. The width budget across sessions ranks packs by it.
    /// </summary>
    public double ExpectedTokens(int width) => _proposal is { } tree ? _nodeAcceptance.ExpectedTokens(tree, width) : 1;

    private NodeAcceptance _nodeAcceptance = new();

    /// <summary>The decoder's per-node estimates across sessions: this session's prior until its own steps say more.</summary>
    internal NodeAcceptance? SharedNodeAcceptance { init => _nodeAcceptance = new NodeAcceptance(value); }

    /// <summary>
    /// The next step verifies the root alone (adaptive width found nothing worth a wider graph), read without
    /// taking anything: it can ride in a packed width-1 run beside other sessions' width-1 steps
    /// (<see cref="BeginNarrow"/>, <see cref="NarrowSteps.RunPacked"/>).
    /// </summary>
    public bool NextStepNarrow =>
        !Done && _pending == Pending.None && !NearCapacity && _spec.AdaptiveWidth
        && (_proposal is { } tree ? ChooseWidth(tree, peek: true) == 1 : RootAloneWithoutTree);

    /// <summary>
    /// While set, a step with no tree offered yet is the root alone (<see cref="NextStepNarrow"/>), without waiting for
    /// the drafter: the device sets it while a prompt waits to be prefilled and a root alone rides in its chunk's run
    /// for a few rows (decision 0033), where the tree, if it came, would not be chosen at that price. A tree offered
    /// meanwhile is weighed as usual; the drafter's tree for a step taken without one is stale when it comes, and dropped.
    /// Only with adaptive width (a fixed width always verifies a tree): otherwise it stays false.
    /// </summary>
    public bool RootAloneWithoutTree
    {
        get => _rootAlone;
        set => _rootAlone = value && _spec.AdaptiveWidth && _drafter is null;
    }

    private bool _rootAlone;

    /// <summary>
    /// What a step of each width costs this session when it rides in a packed run with others, by width (the
    /// device's estimate from its measured packed runs; null or a width missing: alone). Adaptive width weighs
    /// a width at the lower of this and a solo run, so under concurrency a tree must beat a share of a packed
    /// width-1 run, and may itself cost a share of a packed tree run (the width budget across sessions,
    /// decision 0016's addenda).
    /// </summary>
    public IReadOnlyDictionary<int, double>? SharedStepMs { get; set; }

    /// <summary>
    /// Takes the next step as a width-1 step for a packed run (<see cref="NextStepNarrow"/> must hold); once the
    /// run has finished it, <see cref="TakeNarrow"/> gives what acceptance needs, as <see cref="BeginStep"/> does alone.
    /// </summary>
    public INarrowStep BeginNarrow()
    {
        if (!NextStepNarrow)
        {
            throw new InvalidOperationException("the next step is not a width-1 step: step it alone.");
        }

        if (_proposal is null)
        {
            _inFlight = DraftProposal.Empty; // the root alone, no tree waited for (RootAloneWithoutTree)
            return new NarrowStep(this);
        }

        var tree = TakeTree();
        ChooseWidth(tree); // the same choice as the peek, counted as a solo step counts it
        return new NarrowStep(this);
    }

    /// <summary>The finished width-1 step's row for acceptance (after the packed run).</summary>
    public TreeToVerify TakeNarrow()
    {
        var t = _narrow ?? throw new InvalidOperationException("no width-1 step has finished: run BeginNarrow's step first.");
        _narrow = null;
        return t;
    }

    private TreeToVerify? _narrow;

    private sealed class NarrowStep(SpeculativeSession session) : INarrowStep
    {
        public KvCache NarrowCache => session._cache;

        public int NarrowToken => session._root;

        public void FinishNarrow(ReadOnlySpan<float> logits, double shareMs)
        {
            session._deviceMs += shareMs;
            session._narrow = session.Single(logits, Pending.Narrow);
        }
    }

    /// <summary>The KV bucket a step of <paramref name="width"/> rows needs.</summary>
    public int BucketFor(int width) => _cache.BucketFor(Math.Min(_cache.Length + width, _cache.Capacity));

    /// <summary>
    /// The device half of one step for several sessions at once: each session's offered tree at
    /// <paramref name="width"/> in its own slot of one packed run (<see cref="OrtModelRuntime.RunPacked"/>),
    /// against its own cache; returns what acceptance needs, per session, as <see cref="BeginStep"/> does.
    /// Every session's next step must be a tree (<see cref="NextTreeWidth"/> of 2 or more); a tree wider than
    /// <paramref name="width"/> keeps its first nodes (a node's parent comes before it), a narrower one is padded.
    /// </summary>
    public static TreeToVerify[] BeginPacked(IReadOnlyList<SpeculativeSession> group, int width, bool ownRows = false)
    {
        var trees = TakeTrees(group, width, ownRows);
        trees.RunPacked();
        return trees.Results!;
    }

    /// <summary>
    /// Takes every session's next tree for one run at <paramref name="width"/> rows each (the checks and the choice
    /// of <see cref="BeginPacked"/>), to run in a packed run of their own (<see cref="PackedTrees.RunPacked"/>) or beside a
    /// prefill chunk (<see cref="PrefillSession.Step(int, IChunkRiders)"/>, decision 0029).
    /// </summary>
    public static PackedTrees TakeTrees(IReadOnlyList<SpeculativeSession> group, int width, bool ownRows = false)
    {
        ArgumentNullException.ThrowIfNull(group);
        var runtime = group[0]._runtime;
        if (width < 2 || group.Any(s => s._runtime != runtime || s.NextTreeWidth < 2 || !s.RoomForTree(width)))
        {
            throw new InvalidOperationException($"a packed tree step needs sessions of one runtime whose next step is a tree with room for {width} rows in its cache, and a width of 2 or more.");
        }

        var trees = new DraftProposal[group.Count];
        for (int i = 0; i < group.Count; i++)
        {
            var s = group[i];
            trees[i] = s.TakeTree();
            if (s._spec.AdaptiveWidth)
            {
                s.ChooseWidth(trees[i]); // the same choice as the peek, counted as a solo step counts it
            }
        }

        return new PackedTrees([.. group], trees, width, ownRows);
    }

    /// <summary>Several sessions' trees taken for one run (<see cref="TakeTrees"/>): fill their slots, run, finish.</summary>
    public sealed class PackedTrees : IChunkRiders
    {
        private readonly SpeculativeSession[] _group;
        private readonly KvCache[] _caches;
        private readonly DraftProposal[] _trees;
        private readonly bool _ownRows;

        internal PackedTrees(SpeculativeSession[] group, DraftProposal[] trees, int width, bool ownRows)
        {
            (_group, _trees, Width, _ownRows) = (group, trees, width, ownRows);
            _caches = [.. group.Select(s => s._cache)];
        }

        /// <summary>Rows of each tree's slot.</summary>
        public int Width { get; }

        /// <summary>Each session's cache, in slot order.</summary>
        public IReadOnlyList<KvCache> Caches => _caches;

        /// <summary>What acceptance needs, per session (after <see cref="Finish"/>).</summary>
        public TreeToVerify[]? Results { get; private set; }

        /// <summary>Fills each tree into its slot's buffers (<paramref name="buffers"/>[i] for session i).</summary>
        public void Fill(IReadOnlyList<StepBuffers> buffers)
        {
            for (int i = 0; i < _group.Length; i++)
            {
                _group[i].FillTree(buffers[i], Width, _trees[i]);
            }
        }

        /// <summary>After the run: each session's rows (in its cache already when <paramref name="staged"/>) and its share of the run's time.</summary>
        public void Finish(IReadOnlyList<StepBuffers> buffers, bool staged, double shareMs)
        {
            var result = new TreeToVerify[_group.Length];
            for (int i = 0; i < _group.Length; i++)
            {
                _group[i]._deviceMs += shareMs;
                result[i] = _group[i].FinishTree(buffers[i], Width, _trees[i], _ownRows, staged);
            }

            Results = result;
        }

        /// <summary>The trees in a packed run of their own (<see cref="OrtModelRuntime.RunPacked"/>); their results are <see cref="Results"/>.</summary>
        public void RunPacked()
        {
            long begin = Stopwatch.GetTimestamp();
            var runtime = _group[0]._runtime;
            var buffers = runtime.PackedBuffers(Width, _caches);
            Fill(buffers);
            long t0 = Stopwatch.GetTimestamp();
            bool staged = runtime.RunPacked(Width, _caches);
            Finish(buffers, staged, Stopwatch.GetElapsedTime(t0).TotalMilliseconds / _group.Length);
            if (_group.Length > 1)
            {
                runtime.RecordPackedStep(_group.Length, _caches.Max(c => c.Bucket), Stopwatch.GetElapsedTime(begin).TotalMilliseconds, Width);
            }
        }
    }

    // The next step's tree (offered, or drafted inline), counted as proposed.
    private DraftProposal TakeTree()
    {
        var tree = _proposal ?? DraftInline();
        _proposal = null;
        _inFlight = tree;
        _draftMs += tree.DraftMs;
        if (tree.Degraded)
        {
            _acct.Degrade();
        }

        for (int i = 0; i < tree.Count; i++)
        {
            _acct.Propose((DraftSource)tree.Sources[i]);
        }

        return tree;
    }

    // Rows 0..width-1 of the step: the root, the tree's first width - 1 nodes (a narrower graph keeps a prefix:
    // a node's parent comes before it), padding; positions by depth and the tree mask.
    private void FillTree(StepBuffers buf, int width, DraftProposal tree)
    {
        _nodes = Math.Min(tree.Count, width - 1);
        buf.TokenIds[0] = _root;
        buf.Positions[0] = _cache.Length;
        _rowParents[0] = -1;
        for (int i = 0; i < _nodes; i++)
        {
            int parent = tree.Parents[i];
            _depths[i] = parent < 0 ? 1 : _depths[parent] + 1;
            _rowParents[i + 1] = parent + 1;
            buf.TokenIds[i + 1] = tree.Tokens[i];
            buf.Positions[i + 1] = _cache.Length + _depths[i];
        }

        for (int i = _nodes + 1; i < width; i++)
        {
            buf.TokenIds[i] = 0;
            buf.Positions[i] = _cache.Length;
        }

        AttentionMask.FillTree(buf.Mask, width, buf.Capacity, _cache.Length, _rowParents.AsSpan(0, _nodes + 1));
    }

    // After the run: every row's keys/values go after the committed slots (the device's buffers are reused by
    // the next run; the verdict keeps the accepted path's rows), and what acceptance needs. A run that wrote
    // them there itself (<paramref name="staged"/>: GroupQueryAttention packing) leaves nothing to copy.
    private TreeToVerify FinishTree(StepBuffers buf, int width, DraftProposal tree, bool ownRows, bool staged = false)
    {
        if (!staged)
        {
            _cache.WriteLayers(0, _cache.Layers, buf.NewKeys, buf.NewValues, width, width, _cache.Length);
        }

        int rows = _nodes + 1;
        var tokens = new int[_nodes];
        var parents = new int[_nodes];
        for (int i = 0; i < _nodes; i++)
        {
            tokens[i] = tree.Tokens[i];
            parents[i] = tree.Parents[i];
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
        return new TreeToVerify(++_stepNumber, tokens, parents, _pendingArgmax, logits, buf.VocabSize, _draws);
    }

    private DraftProposal DraftInline()
    {
        if (_drafter is null)
        {
            throw new InvalidOperationException("no tree was offered for this step: an external drafter's proposal must arrive before the step (NeedsProposal).");
        }

        var (outcome, committed) = TakeAdvance();
        var tree = _drafter.Advance(outcome, committed);
        if (DraftAhead)
        {
            _drafter.PrepareAhead();
        }

        return tree;
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
    /// and values, updates acceptance statistics, and emits the tokens (the drafter learns from them at
    /// the next draft). Returns <see cref="Done"/>. A verdict for another step than
    /// <see cref="AwaitingStep"/> is refused.
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
                _outcome = new StepOutcome(1, [.. emitted], [0], [.. _pendingArgmax]);
            }

            _root = emitted[0];
            Done = !Emit(_root, LogprobRow(0));
            return Done;
        }

        int width = _pendingWidth;
        var kept = verdict.Rows;
        for (int i = 1; i < kept.Length; i++)
        {
            _acct.Accept((DraftSource)_inFlight.Sources[kept[i] - 1]);
        }

        _acct.Step(width, _nodes, verdict.Accepted, emitted.Length);
        Observe(verdict.Accepted, width);
        _acct.Expected(_nodeAcceptance.Observe(_inFlight, _nodes, kept), emitted.Length);
        _cache.Keep(kept);
        _outcome = new StepOutcome(width, [.. emitted], [.. kept], [.. _pendingArgmax]);
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

        return Done;
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
    /// The compiled width (1 = plain) with the most expected tokens per millisecond. Expected tokens at width w: once
    /// the session has 4 tree steps of its own, what the first w - 1 nodes of this very tree are expected to give from how
    /// often nodes of their source and depth were accepted lately (<see cref="NodeAcceptance"/>, decision 0032), so a tree
    /// padded with rarely accepted nodes is not verified wide; before that, 1 + the mean over the decoder's recent steps of
    /// min(accepted, w - 1, this tree's size). Cost: the runtime's recent run time of that graph (or the device profile's)
    /// plus this session's drafting per step. A width never run yet is tried once; every 16th step runs the full width,
    /// so acceptance beyond a narrow width keeps being seen.
    /// </summary>
    private int ChooseWidth(DraftProposal tree, bool peek = false)
    {
        int nodes = tree.Count;
        int step = _adaptiveSteps + 1;
        if (!peek)
        {
            _adaptiveSteps = step;
        }

        int chosen;
        if (nodes == 0)
        {
            chosen = 1;
        }
        else if (step % 16 == 0 && !_rootAlone)
        {
            chosen = _width; // not while the root rides in a chunk's run: a tree then would miss the chunk (decision 0034)
        }
        else
        {
            // This session's own recent steps, or (for its first 4) the decoder's recent steps.
            Span<int> seen = stackalloc int[_recent.Length];
            int n = Math.Min(_recentCount, _recent.Length);
            bool own = n >= 4;
            if (own)
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
                double? solo = _spec.WidthCostMs is { } cost ? cost(w) : _runtime.RecentRunMs(w, _cache.Bucket);
                if (solo is null && !_rootAlone)
                {
                    chosen = w; // never measured: measure it now
                    break;
                }

                // Riding in a packed run with other sessions, or in a chunk's run, costs at most its share.
                double? shared = SharedStepMs is { } prices && prices.TryGetValue(w, out double packed) ? packed : null;
                if ((solo, shared) is (null, null))
                {
                    continue; // while the root rides: measured later, not at the cost of missing a chunk's run
                }

                double ms = Math.Min(solo ?? double.MaxValue, shared ?? double.MaxValue);

                double tokens = 1;
                if (w > 1 && own)
                {
                    // What this very tree's first w - 1 nodes are expected to give (decision 0032).
                    tokens = _nodeAcceptance.ExpectedTokens(tree, w);
                    ms += draftMs;
                }
                else if (w > 1)
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
    // tokens end generation; otherwise it joins the output (and the drafter's sequence at its next draft).
    private bool Emit(int token, ReadOnlySpan<float> row)
    {
        if (_stops.Contains(token))
        {
            _reason = "stop";
            return false;
        }

        _output.Add(token);
        _committed.Add(token);
        if (_logprobs is not null)
        {
            var lp = TokenLogprobs.Of(row, token, _sampler.Options.Logprobs!.Value);
            _logprobs.Add(lp);
            _onLogprobs?.Invoke(lp);
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
