namespace CoordGen.Engine.Speculative;

/// <summary>
/// How many tokens per verification step a drafter that copies from the text could reach on a known
/// greedy output, if it always picked the best place to copy from: an upper bound for retrieval
/// drafting, used by <c>coordgen bench accept</c> to show how much room drafting has left. Each step
/// takes the longest copy (at most <c>maxDraft</c> tokens, all from text already there: prompt plus
/// output so far) that matches the output from the current position, plus the model's own next token.
/// </summary>
public static class CopyCeiling
{
    /// <summary>
    /// Tokens per step of the best copy at every step. <paramref name="afterLastToken"/> = true: a copy
    /// must start right after an earlier occurrence of the current last token, which is what suffix
    /// matchers (prompt lookup, suffix automata) can find; false: a copy may start anywhere, knowing the
    /// output in advance (no drafter can do this; it bounds what jumping to a new place could add).
    /// </summary>
    public static double TokensPerStep(ReadOnlySpan<int> prompt, ReadOnlySpan<int> output, int maxDraft, bool afterLastToken) =>
        output.IsEmpty ? 0 : (double)output.Length / Steps(prompt, output, maxDraft, afterLastToken);

    /// <summary>Verification steps the best copy at every step needs for <paramref name="output"/> (see <see cref="TokensPerStep"/>).</summary>
    public static int Steps(ReadOnlySpan<int> prompt, ReadOnlySpan<int> output, int maxDraft, bool afterLastToken)
    {
        int[] text = [.. prompt, .. output];
        int steps = 0;
        for (int j = 0; j < output.Length; steps++)
        {
            int at = prompt.Length + j, best = 0;
            for (int s = afterLastToken ? 1 : 0; s < at && best < maxDraft; s++)
            {
                if (afterLastToken && text[s - 1] != text[at - 1])
                {
                    continue;
                }

                int k = 0;
                while (k < maxDraft && s + k < at && at + k < text.Length && text[s + k] == text[at + k])
                {
                    k++;
                }

                best = Math.Max(best, k);
            }

            j += best + 1;
        }

        return steps;
    }
}
