namespace CoordGen.Engine.Speculative;

/// <summary>
/// A token tree hanging off the last committed token (the root, row 0). Candidate continuations are
/// merged by shared prefix; the tree is laid out for a static width W as rows 1..W-1 with parent rows,
/// positions = parent + 1, and each row's mask showing its ancestors and itself (see AttentionMask).
/// </summary>
public sealed class DraftTree
{
    private readonly List<int> _tokens = [];
    private readonly List<int> _parents = [];
    private readonly List<int> _depths = [];
    private readonly List<DraftSource> _sources = [];
    private readonly Dictionary<long, int> _children = new();

    public DraftTree(int capacity) => Capacity = capacity;

    /// <summary>Most nodes the tree may hold (W - 1: row 0 is the root token).</summary>
    public int Capacity { get; }

    public int Count => _tokens.Count;

    public int Token(int node) => _tokens[node];

    /// <summary>Parent node, or -1 for children of the root.</summary>
    public int Parent(int node) => _parents[node];

    public int Depth(int node) => _depths[node];

    public DraftSource Source(int node) => _sources[node];

    public void Clear()
    {
        _tokens.Clear();
        _parents.Clear();
        _depths.Clear();
        _sources.Clear();
        _children.Clear();
    }

    private static long Key(int parent, int token) => ((long)(parent + 1) << 32) | (uint)token;

    /// <summary>The child of <paramref name="parent"/> (-1 = root) with this token, or -1.</summary>
    public int Child(int parent, int token) => _children.TryGetValue(Key(parent, token), out int c) ? c : -1;

    /// <summary>Adds a path from the root (or from <paramref name="from"/>), sharing existing prefixes. Returns nodes added.</summary>
    public int AddPath(ReadOnlySpan<int> path, DraftSource source, int from = -1)
    {
        int added = 0, at = from;
        foreach (int t in path)
        {
            int c = Child(at, t);
            if (c < 0)
            {
                if (Count >= Capacity)
                {
                    break;
                }

                c = _tokens.Count;
                _tokens.Add(t);
                _parents.Add(at);
                _depths.Add(at < 0 ? 1 : _depths[at] + 1);
                _sources.Add(source);
                _children[Key(at, t)] = c;
                added++;
            }

            at = c;
        }

        return added;
    }

    /// <summary>
    /// Keeps the first <paramref name="count"/> nodes (a node's parent always comes before it, so the
    /// rest is still a tree; the main chain, added first, keeps its first tokens).
    /// </summary>
    public void Truncate(int count)
    {
        if (count >= Count)
        {
            return;
        }

        for (int i = Count - 1; i >= count; i--)
        {
            _children.Remove(Key(_parents[i], _tokens[i]));
        }

        int drop = Count - count;
        _tokens.RemoveRange(count, drop);
        _parents.RemoveRange(count, drop);
        _depths.RemoveRange(count, drop);
        _sources.RemoveRange(count, drop);
    }

    /// <summary>Row parents for the graph: row 0 is the root (-1), node i is row i + 1.</summary>
    public void RowParents(Span<int> dest)
    {
        dest[0] = -1;
        for (int i = 0; i < Count; i++)
        {
            dest[i + 1] = _parents[i] + 1;
        }
    }
}
