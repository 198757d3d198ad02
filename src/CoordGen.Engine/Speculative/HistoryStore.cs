namespace CoordGen.Engine.Speculative;

/// <summary>
/// Past responses of one application or task, as a suffix automaton with occurrence counts, so a
/// draft can follow the most frequent continuation of what the current output ends with. Bounded
/// (oldest responses are dropped past <see cref="MaxTokens"/>) and persisted as a flat token file.
/// </summary>
public sealed class HistoryStore : CoordGen.Messages.IContextSnapshot
{
    private readonly List<int[]> _responses = [];
    private SuffixAutomaton _sam = new();
    private int[] _counts = [];
    private bool _dirty;

    public HistoryStore(int maxTokens = 200_000) => MaxTokens = maxTokens;

    public int MaxTokens { get; }

    public int Tokens => _responses.Sum(r => r.Length + 1);

    public int Responses => _responses.Count;

    /// <summary>The responses held, oldest first.</summary>
    public IReadOnlyList<int[]> ResponseTokens => _responses;

    public SuffixAutomaton Automaton
    {
        get
        {
            Refresh();
            return _sam;
        }
    }

    public void Add(ReadOnlySpan<int> response)
    {
        if (response.IsEmpty)
        {
            return;
        }

        _responses.Add(response.ToArray());
        int total = Tokens;
        bool dropped = false;
        while (total > MaxTokens && _responses.Count > 1)
        {
            total -= _responses[0].Length + 1;
            _responses.RemoveAt(0);
            dropped = true;
        }

        if (dropped)
        {
            _sam = new SuffixAutomaton();
            foreach (var r in _responses)
            {
                _sam.ExtendAll(r);
                _sam.Extend(-1);
            }
        }
        else
        {
            _sam.ExtendAll(response.ToArray());
            _sam.Extend(-1);
        }

        _dirty = true;
    }

    private void Refresh()
    {
        if (_dirty)
        {
            _counts = _sam.OccurrenceCounts();
            _dirty = false;
        }
    }

    /// <summary>
    /// Up to <paramref name="branches"/> continuations of the cursor's match, each following the most
    /// frequent next token greedily for up to <paramref name="length"/> tokens; the first tokens of
    /// the branches are the top-K by count.
    /// </summary>
    public List<int[]> Continuations(MatchCursor cursor, int branches, int length)
    {
        Refresh();
        var result = new List<int[]>();
        if (cursor.Length == 0)
        {
            return result;
        }

        var firsts = _sam.OutTokens(cursor.State).Where(t => t >= 0)
            .Select(t => (Token: t, Count: _sam.TryNext(cursor.State, t, out int s) ? _counts[s] : 0))
            .OrderByDescending(x => x.Count).ThenBy(x => x.Token).Take(branches);
        foreach (var (token, _) in firsts)
        {
            var path = new List<int> { token };
            _sam.TryNext(cursor.State, token, out int state);
            while (path.Count < length)
            {
                int best = -1, bestCount = 0;
                foreach (int t in _sam.OutTokens(state))
                {
                    if (t >= 0 && _sam.TryNext(state, t, out int s) && _counts[s] > bestCount)
                    {
                        (best, bestCount) = (t, _counts[s]);
                    }
                }

                if (best < 0)
                {
                    break;
                }

                path.Add(best);
                _sam.TryNext(state, best, out state);
            }

            result.Add([.. path]);
        }

        return result;
    }

    public void Save(string path)
    {
        using var w = new BinaryWriter(File.Create(path));
        w.Write(0x43474853); // "CGHS"
        w.Write(_responses.Count);
        foreach (var r in _responses)
        {
            w.Write(r.Length);
            foreach (int t in r)
            {
                w.Write(t);
            }
        }
    }

    public static HistoryStore Load(string path, int maxTokens = 200_000)
    {
        var store = new HistoryStore(maxTokens);
        if (!File.Exists(path))
        {
            return store;
        }

        using var r = new BinaryReader(File.OpenRead(path));
        if (r.ReadInt32() != 0x43474853)
        {
            throw new InvalidDataException($"'{path}' is not a CoordGen history store; delete it to start a new one.");
        }

        int n = r.ReadInt32();
        for (int i = 0; i < n; i++)
        {
            int len = r.ReadInt32();
            var toks = new int[len];
            for (int j = 0; j < len; j++)
            {
                toks[j] = r.ReadInt32();
            }

            store.Add(toks);
        }

        return store;
    }
}
