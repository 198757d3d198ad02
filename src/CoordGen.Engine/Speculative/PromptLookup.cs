namespace CoordGen.Engine.Speculative;

/// <summary>
/// Prompt Lookup Decoding, as in its reference implementation: for n-gram sizes 3 down to 1, find the
/// earliest earlier occurrence of the sequence's last n tokens and propose the (up to 10) tokens after it.
/// </summary>
public static class PromptLookup
{
    public const int MaxNgram = 3;
    public const int DraftLength = 10;

    public static int Draft(IReadOnlyList<int> sequence, Span<int> dest, int maxNgram = MaxNgram, int draftLength = DraftLength)
    {
        int len = sequence.Count;
        for (int n = Math.Min(maxNgram, len - 1); n >= 1; n--)
        {
            int patStart = len - n;
            for (int i = 0; i + n < len; i++)
            {
                bool match = true;
                for (int k = 0; k < n; k++)
                {
                    if (sequence[i + k] != sequence[patStart + k])
                    {
                        match = false;
                        break;
                    }
                }

                if (!match || i == patStart)
                {
                    continue;
                }

                int start = i + n, count = 0;
                for (int j = start; j < len && count < draftLength && count < dest.Length; j++)
                {
                    dest[count++] = sequence[j];
                }

                if (count > 0)
                {
                    return count;
                }
            }
        }

        return 0;
    }
}
