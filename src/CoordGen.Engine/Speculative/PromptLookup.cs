namespace CoordGen.Engine.Speculative;

/// <summary>
/// Prompt Lookup Decoding, as in its reference implementation: for n-gram sizes 3 down to 1, find the
/// earliest earlier occurrence of the sequence's last n tokens and propose the (up to 10) tokens after it.
/// The search is a vectorized span search over prompt + output.
/// </summary>
public static class PromptLookup
{
    public const int MaxNgram = 3;
    public const int DraftLength = 10;

    public static int Draft(IReadOnlyList<int> sequence, Span<int> dest, int maxNgram = MaxNgram, int draftLength = DraftLength)
        => Draft(sequence is List<int> list ? System.Runtime.InteropServices.CollectionsMarshal.AsSpan(list) : sequence.ToArray(), dest, maxNgram, draftLength);

    public static int Draft(ReadOnlySpan<int> sequence, Span<int> dest, int maxNgram = MaxNgram, int draftLength = DraftLength)
    {
        int len = sequence.Length;
        for (int n = Math.Min(maxNgram, len - 1); n >= 1; n--)
        {
            var pattern = sequence[(len - n)..];
            // A match must end before the last token, so something follows it.
            int i = sequence[..(len - 1)].IndexOf(pattern);
            if (i < 0)
            {
                continue;
            }

            int count = Math.Min(Math.Min(draftLength, dest.Length), len - (i + n));
            sequence.Slice(i + n, count).CopyTo(dest);
            return count;
        }

        return 0;
    }
}
