namespace CoordGen.Engine.Speculative;

/// <summary>
/// Positions of every token bigram in prompt + output, appended in O(1) per token. Tree drafting uses
/// it to find several earlier occurrences of what the sequence ends with and offer their distinct
/// continuations as alternate branches.
/// </summary>
public sealed class NgramIndex
{
    private readonly Dictionary<long, List<int>> _positions = new();
    private readonly List<int> _tokens = [];

    public IReadOnlyList<int> Tokens => _tokens;

    private static long Key(int a, int b) => ((long)a << 32) | (uint)b;

    public void Add(int token)
    {
        _tokens.Add(token);
        int n = _tokens.Count;
        if (n >= 2)
        {
            long k = Key(_tokens[n - 2], token);
            if (!_positions.TryGetValue(k, out var list))
            {
                _positions[k] = list = [];
            }

            list.Add(n - 1);
        }
    }

    /// <summary>
    /// Continuations after earlier occurrences of the sequence's last bigram, most recent first,
    /// skipping continuations that start with a token already offered. Returns how many were written.
    /// </summary>
    public int Continuations(int maxBranches, int length, Span<int> firstTokens, List<int[]> result)
    {
        result.Clear();
        int n = _tokens.Count;
        if (n < 3 || !_positions.TryGetValue(Key(_tokens[n - 2], _tokens[n - 1]), out var list))
        {
            return 0;
        }

        int found = 0;
        for (int i = list.Count - 1; i >= 0 && found < maxBranches; i--)
        {
            int end = list[i];
            if (end >= n - 1)
            {
                continue;
            }

            int first = _tokens[end + 1];
            bool seen = false;
            for (int j = 0; j < found; j++)
            {
                seen |= firstTokens[j] == first;
            }

            if (seen)
            {
                continue;
            }

            int len = Math.Min(length, n - end - 1);
            var path = new int[len];
            for (int j = 0; j < len; j++)
            {
                path[j] = _tokens[end + 1 + j];
            }

            firstTokens[found++] = first;
            result.Add(path);
        }

        return found;
    }

    /// <summary>
    /// Continuations that take the sequence's last token for a one-token edit of an earlier passage: for each earlier
    /// occurrence of the bigram before the last token that went on with another token (most recent first, at most
    /// <paramref name="maxOccurrences"/>), the passage resumed after the token the last one replaced, at the token the
    /// last one was inserted before, and, when the last token is the passage's next but one, after it (one dropped).
    /// A copy whose words the model changes by one (a synonym, an article) then gets drafts back at the next step,
    /// not only once its suffix matches again. Returns how many paths were written.
    /// </summary>
    public int EditContinuations(int maxOccurrences, int length, List<int[]> result)
    {
        result.Clear();
        int n = _tokens.Count;
        if (n < 4 || !_positions.TryGetValue(Key(_tokens[n - 3], _tokens[n - 2]), out var list))
        {
            return 0;
        }

        int last = _tokens[n - 1], used = 0;
        for (int i = list.Count - 1; i >= 0 && used < maxOccurrences; i--)
        {
            int end = list[i];
            if (end >= n - 2 || _tokens[end + 1] == last)
            {
                continue; // the sequence's own end, or a plain copy (the bigram branches and the automaton offer those)
            }

            used++;
            Resume(end + 2, length, result); // replaced
            Resume(end + 1, length, result); // inserted
            if (end + 2 < n - 2 && _tokens[end + 2] == last)
            {
                Resume(end + 3, length, result); // dropped
            }
        }

        return result.Count;
    }

    private void Resume(int start, int length, List<int[]> result)
    {
        int len = Math.Min(length, _tokens.Count - 1 - start);
        if (len > 0)
        {
            result.Add([.. _tokens.GetRange(start, len)]);
        }
    }
}
