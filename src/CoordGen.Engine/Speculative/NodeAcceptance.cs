using CoordGen.Messages;

namespace CoordGen.Engine.Speculative;

/// <summary>
/// How likely each node of a draft tree is to be accepted, learned from one session's verified trees: per draft
/// source and depth, with a prior from how far the session's recent steps got along their trees. The width budget
/// across sessions (decision 0028) ranks packs by the expected tokens this gives: a tree of nodes that have been
/// accepted lately is worth more rows than one of nodes that have not.
/// </summary>
/// <remarks>
/// Counts decay by <see cref="Decay"/> per observed step, so about the last 30 steps weigh (for the shared estimates, the
/// last 30 steps of all the decoder's sessions together). A node's estimate is
/// the share of its (source, depth) nodes that were accepted, with <see cref="PriorWeight"/> pseudo-nodes at the prior:
/// the chance that a step's accepted path reaches that depth, the product over depths of how often a path that
/// reached the depth before went on, where the tree had a node to go on with (Laplace's rule, so 0.5 per depth
/// before anything is seen). A node is never likelier than its parent, and siblings together are never likelier
/// than their parent (one of them at most is accepted): later siblings get what earlier ones leave.
/// Match lengths are not in a proposal, so they do not enter.
/// </remarks>
public sealed class NodeAcceptance
{
    /// <summary>The deepest depth counted apart; deeper nodes count at this depth.</summary>
    public const int MaxDepth = 16;

    private const double Decay = 0.97;
    private const double PriorWeight = 2;

    // Before anything is seen, a later child (a branch beside the drafter's main continuation) is taken as this share of a first child's chance.
    private const double LaterChildShare = 0.25;

    private readonly NodeAcceptance? _shared;
    private readonly Lock _gate = new();

    /// <param name="shared">Estimates learned from every session of the decoder (its own steps go there too): the prior of a
    /// session's nodes until its own steps say more. Null: the prior from depth alone.</param>
    public NodeAcceptance(NodeAcceptance? shared = null) => _shared = shared;
    private static readonly int Sources = Enum.GetValues<DraftSource>().Length;

    private readonly double[] _proposed = new double[Sources * (MaxDepth + 1) * 2];
    private readonly double[] _accepted = new double[Sources * (MaxDepth + 1) * 2];
    private readonly double[] _chances = new double[MaxDepth + 1];
    private readonly double[] _reached = new double[MaxDepth + 1];
    private int[] _depths = new int[32];
    private bool[] _kept = new bool[32];
    private double[] _p = new double[32];
    private double[] _childSum = new double[32];
    private bool[] _later = new bool[33];

    /// <summary>
    /// Learns from one verified tree step: the first <paramref name="nodes"/> nodes of <paramref name="tree"/> were verified
    /// and <paramref name="keptRows"/> (row 0 the root, row i + 1 node i) is the accepted path. Returns what the estimates
    /// expected of the step before learning from it (<see cref="ExpectedTokens"/>), to compare with the tokens it gave.
    /// </summary>
    public double Observe(DraftProposal tree, int nodes, ReadOnlySpan<int> keptRows)
    {
        ArgumentNullException.ThrowIfNull(tree);
        nodes = Math.Min(nodes, tree.Count);
        lock (_gate)
        {
            // What was expected before anything learns from the step (the shared estimates are this one's prior); locks are
            // always taken a session's first, then the shared one's.
            double expected = ExpectedLocked(tree, nodes + 1);
            _shared?.Observe(tree, nodes, keptRows);
            ObserveLocked(tree, nodes, keptRows);
            return expected;
        }
    }

    private void ObserveLocked(DraftProposal tree, int nodes, ReadOnlySpan<int> keptRows)
    {
        Scale(_proposed);
        Scale(_accepted);
        Scale(_chances);
        Scale(_reached);
        EnsureScratch(nodes);
        Array.Clear(_kept, 0, nodes);
        for (int r = 1; r < keptRows.Length; r++)
        {
            int node = keptRows[r] - 1;
            if (node >= 0 && node < nodes)
            {
                _kept[node] = true;
            }
        }

        bool rootHasChild = false;
        Array.Clear(_childSum, 0, nodes); // here: whether the node has a verified child
        Array.Clear(_later, 0, nodes + 1);
        for (int i = 0; i < nodes; i++)
        {
            int parent = tree.Parents[i];
            _depths[i] = parent < 0 ? 1 : _depths[parent] + 1;
            if (parent < 0)
            {
                rootHasChild = true;
            }
            else
            {
                _childSum[parent] = 1;
            }

            int at = Cell(tree.Sources[i], _depths[i], !_later[parent + 1]);
            _later[parent + 1] = true;
            _proposed[at]++;
            if (_kept[i])
            {
                _accepted[at]++;
            }
        }

        // Depth by depth along the accepted path: where the path's node had a verified child, the path had a chance to
        // go on, taken or not.
        int length = Math.Max(0, keptRows.Length - 1);
        for (int d = 1; d <= Math.Min(length + 1, MaxDepth); d++)
        {
            int at = d == 1 ? -1 : keptRows[d - 1] - 1;
            if (!(at < 0 ? rootHasChild : at < nodes && _childSum[at] > 0))
            {
                break;
            }

            _chances[d]++;
            if (d <= length)
            {
                _reached[d]++;
            }
        }
    }

    /// <summary>
    /// Expected tokens of a step that verifies the first <c>rows - 1</c> nodes of <paramref name="tree"/>: the model's own
    /// token (1) plus each node's chance of acceptance (expected values add, whatever the nodes' dependence).
    /// </summary>
    public double ExpectedTokens(DraftProposal tree, int rows)
    {
        ArgumentNullException.ThrowIfNull(tree);
        lock (_gate)
        {
            return ExpectedLocked(tree, rows);
        }
    }

    private double ExpectedLocked(DraftProposal tree, int rows)
    {
        int nodes = Math.Clamp(rows - 1, 0, tree.Count);
        EnsureScratch(nodes);
        double sum = 1;
        for (int i = 0; i < nodes; i++)
        {
            int parent = tree.Parents[i];
            _depths[i] = parent < 0 ? 1 : _depths[parent] + 1;
            _childSum[i] = 0;
        }

        Array.Clear(_later, 0, nodes + 1);
        double rootChildren = 0;
        for (int i = 0; i < nodes; i++)
        {
            int parent = tree.Parents[i];
            double above = parent < 0 ? 1 : _p[parent];
            ref double siblings = ref parent < 0 ? ref rootChildren : ref _childSum[parent];
            double p = Math.Min(Math.Min(ChanceLocked(tree.Sources[i], _depths[i], !_later[parent + 1]), above), Math.Max(0, above - siblings));
            _later[parent + 1] = true;
            siblings += p;
            _p[i] = p;
            sum += p;
        }

        return sum;
    }

    /// <summary>
    /// The estimate for a node of <paramref name="source"/> at <paramref name="depth"/>, its parent's first child in the tree
    /// (the drafter's main continuation there) or a later one, before its tree's limits.
    /// </summary>
    public double NodeChance(byte source, int depth, bool firstChild = true)
    {
        lock (_gate)
        {
            return ChanceLocked(source, depth, firstChild);
        }
    }

    private double ChanceLocked(byte source, int depth, bool firstChild)
    {
        int d = Math.Clamp(depth, 1, MaxDepth);
        int at = Cell(source, d, firstChild);
        double prior = _shared?.NodeChance(source, d, firstChild) ?? (firstChild ? 1 : LaterChildShare) * ReachLocked(d);
        return (_accepted[at] + (PriorWeight * prior)) / (_proposed[at] + PriorWeight);
    }

    /// <summary>The prior: the chance that a step's accepted path reaches <paramref name="depth"/>.</summary>
    public double Reach(int depth)
    {
        lock (_gate)
        {
            return ReachLocked(depth);
        }
    }

    private double ReachLocked(int depth)
    {
        double p = 1;
        for (int d = 1; d <= Math.Min(depth, MaxDepth); d++)
        {
            p *= (_reached[d] + 1) / (_chances[d] + 2);
        }

        return p;
    }

    private static int Cell(byte source, int depth, bool firstChild) => (((Math.Min((int)source, Sources - 1) * (MaxDepth + 1)) + Math.Clamp(depth, 1, MaxDepth)) * 2) + (firstChild ? 0 : 1);

    private static void Scale(double[] a)
    {
        for (int i = 0; i < a.Length; i++)
        {
            a[i] *= Decay;
        }
    }

    private void EnsureScratch(int nodes)
    {
        if (_p.Length < nodes)
        {
            int n = Math.Max(nodes, 2 * _p.Length);
            (_depths, _kept, _p, _childSum, _later) = (new int[n], new bool[n], new double[n], new double[n], new bool[n + 1]);
        }
    }
}
