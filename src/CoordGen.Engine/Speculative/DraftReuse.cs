namespace CoordGen.Engine.Speculative;

/// <summary>
/// Draft reuse (paper §3.4, Eq. 3): after a rejection at position e of a draft chain, keep the longest
/// run of later draft positions where the draft agreed with the model's own prediction, and re-offer
/// it from the root in the following steps. It lives for at least one step and is dropped once the
/// draft tokens proposed since it was kept pass <see cref="Threshold"/> (tied to the verification width).
/// </summary>
public sealed class DraftReuse(int threshold)
{
    private int[] _segment = [];
    private int _spent;
    private int _age;

    public int Threshold { get; } = threshold;

    /// <summary>
    /// Eq. 3 over one verified chain: <paramref name="draft"/>[i] is the chain's token at depth i+1 and
    /// <paramref name="predicted"/>[i] the model's prediction for that depth given the chain before it.
    /// <paramref name="firstMismatch"/> is e (0-based). Keeps the longest agreeing run after e, if any.
    /// </summary>
    public void Observe(ReadOnlySpan<int> draft, ReadOnlySpan<int> predicted, int firstMismatch)
    {
        int bestStart = -1, bestLen = 0;
        int runStart = -1;
        for (int i = firstMismatch + 1; i <= draft.Length; i++)
        {
            bool agree = i < draft.Length && draft[i] == predicted[i];
            if (agree && runStart < 0)
            {
                runStart = i;
            }
            else if (!agree && runStart >= 0)
            {
                if (i - runStart > bestLen)
                {
                    (bestStart, bestLen) = (runStart, i - runStart);
                }

                runStart = -1;
            }
        }

        if (bestLen >= 1)
        {
            _segment = draft.Slice(bestStart, bestLen).ToArray();
            _spent = 0;
            _age = 0;
        }
    }

    /// <summary>The segment to offer this step, or empty; call <see cref="EndStep"/> after the step.</summary>
    public ReadOnlySpan<int> Offer() => _segment;

    /// <summary>Accounts a step: the tokens committed and the draft length proposed.</summary>
    public void EndStep(ReadOnlySpan<int> committed, int proposedDraftTokens)
    {
        if (_segment.Length == 0)
        {
            return;
        }

        _age++;
        _spent += proposedDraftTokens;
        // Consumed: the committed tokens ran through (a prefix of) the segment.
        int k = 0;
        while (k < committed.Length && k < _segment.Length && committed[k] == _segment[k])
        {
            k++;
        }

        if (k > 0)
        {
            _segment = _segment[k..];
        }

        if (_segment.Length == 0 || (_age >= 1 && _spent > Threshold))
        {
            _segment = [];
        }
    }
}
