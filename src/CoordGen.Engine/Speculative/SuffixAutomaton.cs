namespace CoordGen.Engine.Speculative;

/// <summary>
/// A suffix automaton over a growing token sequence, extended one token at a time in amortized O(1).
/// Each state remembers the end of its first occurrence, so a match can be continued by reading the
/// sequence after it. Tokens below zero are separators: nothing matches across them and drafts stop there.
/// </summary>
public sealed class SuffixAutomaton
{
    private readonly List<int> _len;
    private readonly List<int> _link;
    private readonly List<int> _firstEnd;
    private readonly Dictionary<long, int> _next;
    private readonly List<int> _text;

    // Out-tokens per state, in the order they were added, so a clone can copy its original's transitions:
    // one list of edges for every state (first and last edge per state, token and next edge per edge), not a
    // list object per state (which left about a hundred bytes of garbage per state: 25 MiB per pass of bench
    // prefix's rag-shared, driving gen-0 collections that stop the device).
    private readonly List<int> _firstOut;
    private readonly List<int> _lastOut;
    private readonly List<int> _edgeToken;
    private readonly List<int> _edgeSibling;
    private int _last;

    public SuffixAutomaton()
        : this(0)
    {
    }

    /// <summary>
    /// An automaton sized for about <paramref name="expectedLength"/> tokens (at most 2n states; about 2n
    /// transitions for natural text), so its tables do not grow step by step: each growth of a large table
    /// leaves a large-object-heap array behind, and those drive full garbage collections.
    /// </summary>
    public SuffixAutomaton(int expectedLength)
    {
        int states = (2 * Math.Max(0, expectedLength)) + 1;
        _len = new List<int>(states) { 0 };
        _link = new List<int>(states) { -1 };
        _firstEnd = new List<int>(states) { -1 };
        _firstOut = new List<int>(states) { -1 };
        _lastOut = new List<int>(states) { -1 };
        _edgeToken = new List<int>(2 * Math.Max(0, expectedLength));
        _edgeSibling = new List<int>(2 * Math.Max(0, expectedLength));
        _next = new Dictionary<long, int>(2 * Math.Max(0, expectedLength));
        _text = new List<int>(Math.Max(0, expectedLength));
    }

    public IReadOnlyList<int> Text => _text;

    public int Length => _text.Count;

    private static long Key(int state, int token) => ((long)state << 32) | (uint)token;

    public bool TryNext(int state, int token, out int next) => _next.TryGetValue(Key(state, token), out next);

    public int StateLength(int state) => _len[state];

    public int FirstEnd(int state) => _firstEnd[state];

    public int Link(int state) => _link[state];

    public void Extend(int token)
    {
        int pos = _text.Count;
        _text.Add(token);
        int cur = NewState(_len[_last] + 1, pos);
        int p = _last;
        while (p != -1 && !_next.ContainsKey(Key(p, token)))
        {
            SetNext(p, token, cur);
            p = _link[p];
        }

        if (p == -1)
        {
            _link[cur] = 0;
        }
        else
        {
            int q = _next[Key(p, token)];
            if (_len[p] + 1 == _len[q])
            {
                _link[cur] = q;
            }
            else
            {
                int clone = NewState(_len[p] + 1, _firstEnd[q]);
                _link[clone] = _link[q];
                CopyTransitions(q, clone);
                while (p != -1 && _next.TryGetValue(Key(p, token), out int t) && t == q)
                {
                    _next[Key(p, token)] = clone;
                    p = _link[p];
                }

                _link[q] = clone;
                _link[cur] = clone;
            }
        }

        _last = cur;
        _prefixStates.Add(cur);
    }

    public void ExtendAll(IEnumerable<int> tokens)
    {
        foreach (int t in tokens)
        {
            Extend(t);
        }
    }

    private void SetNext(int state, int token, int target)
    {
        if (_next.TryAdd(Key(state, token), target))
        {
            int edge = _edgeToken.Count;
            _edgeToken.Add(token);
            _edgeSibling.Add(-1);
            if (_lastOut[state] < 0)
            {
                _firstOut[state] = edge;
            }
            else
            {
                _edgeSibling[_lastOut[state]] = edge;
            }

            _lastOut[state] = edge;
        }
        else
        {
            _next[Key(state, token)] = target;
        }
    }

    private void CopyTransitions(int from, int to)
    {
        for (int e = _firstOut[from]; e >= 0; e = _edgeSibling[e])
        {
            int t = _edgeToken[e];
            SetNext(to, t, _next[Key(from, t)]);
        }
    }

    private int NewState(int len, int firstEnd)
    {
        _len.Add(len);
        _link.Add(-1);
        _firstEnd.Add(firstEnd);
        _firstOut.Add(-1);
        _lastOut.Add(-1);
        return _len.Count - 1;
    }

    /// <summary>Tokens with a transition out of <paramref name="state"/>, in the order they were added.</summary>
    public OutTokenList OutTokens(int state) => new(this, _firstOut[state]);

    /// <summary>The out-tokens of one state: enumerate with foreach (no allocation) or LINQ.</summary>
    public readonly struct OutTokenList(SuffixAutomaton sam, int first) : IEnumerable<int>
    {
        public Enumerator GetEnumerator() => new(sam, first);

        IEnumerator<int> IEnumerable<int>.GetEnumerator() => GetEnumerator();

        System.Collections.IEnumerator System.Collections.IEnumerable.GetEnumerator() => GetEnumerator();

        public struct Enumerator(SuffixAutomaton sam, int first) : IEnumerator<int>
        {
            private int _edge = -2;

            public readonly int Current => _edge >= 0 ? sam._edgeToken[_edge] : throw new InvalidOperationException("enumeration has not started or has ended.");

            readonly object System.Collections.IEnumerator.Current => Current;

            public bool MoveNext()
            {
                if (sam is null || _edge == -1)
                {
                    return false; // default(OutTokenList), or already past the end
                }

                _edge = _edge == -2 ? first : sam._edgeSibling[_edge];
                return _edge >= 0;
            }

            public void Reset() => _edge = -2;

            public readonly void Dispose()
            {
            }
        }
    }

    /// <summary>
    /// Occurrence counts per state (how many end positions its substrings have): each prefix's own
    /// state counts one, then counts flow up suffix links from longer states to shorter ones.
    /// O(states log states); call again after the text changes.
    /// </summary>
    public int[] OccurrenceCounts()
    {
        var cnt = new int[_len.Count];
        foreach (int st in _prefixStates)
        {
            cnt[st]++;
        }

        var order = Enumerable.Range(0, _len.Count).OrderByDescending(i => _len[i]);
        foreach (int st in order)
        {
            if (_link[st] >= 0)
            {
                cnt[_link[st]] += cnt[st];
            }
        }

        return cnt;
    }

    private readonly List<int> _prefixStates = [];

    /// <summary>Longest suffix of <paramref name="pattern"/> that occurs in the text, walked from scratch (for tests and seeding).</summary>
    public MatchCursor Match(ReadOnlySpan<int> pattern)
    {
        var c = new MatchCursor();
        foreach (int t in pattern)
        {
            c = Advance(c, t);
        }

        return c;
    }

    /// <summary>Moves a match cursor over one more token: the longest suffix ending here that occurs in the text.</summary>
    public MatchCursor Advance(MatchCursor c, int token)
    {
        if (token < 0)
        {
            return default;
        }

        int state = c.State, length = c.Length;
        while (true)
        {
            if (_next.TryGetValue(Key(state, token), out int nx))
            {
                return new MatchCursor(nx, length + 1);
            }

            if (state == 0)
            {
                return default;
            }

            state = _link[state];
            length = _len[state];
        }
    }

    /// <summary>Up to <paramref name="max"/> tokens that followed the cursor's match at its first occurrence.</summary>
    public int Continuation(MatchCursor c, int max, Span<int> dest)
    {
        if (c.Length == 0)
        {
            return 0;
        }

        int start = _firstEnd[c.State] + 1;
        int n = 0;
        for (int i = start; i < _text.Count && n < max && n < dest.Length; i++)
        {
            if (_text[i] < 0)
            {
                break;
            }

            dest[n++] = _text[i];
        }

        return n;
    }
}

/// <summary>Where a running match stands: an automaton state and the matched length (0 = no match).</summary>
public readonly record struct MatchCursor(int State, int Length);
