using CoordGen.Engine.Generation;
using CoordGen.Messages;

namespace CoordGen.Engine.Speculative;

/// <summary>
/// Acceptance for tree verification: walk from the root, at each row take the model's token (argmax when
/// greedy, one draw from the row's distribution when sampling) and descend into the child with that
/// token; stop at the first row whose token no child has. Greedy output equals plain greedy decoding;
/// sampled tokens come from the model's own distribution at every emitted position, as plain sampling's
/// do. A pure function of its input and the sampler's stream: it runs inline in a step or on a verifier actor.
/// </summary>
public static class TreeVerifier
{
    /// <param name="sampler">The session's sampler positioned at <see cref="TreeToVerify.Draws"/>; null when greedy.</param>
    public static TreeVerdict Verify(TreeToVerify step, Sampler? sampler)
    {
        ArgumentNullException.ThrowIfNull(step);
        bool greedy = sampler is null || sampler.Options.IsGreedy;
        if (!greedy && step.Logits.Length < step.Rows * step.VocabSize)
        {
            throw new ArgumentException($"sampling needs every row's logits: got {step.Logits.Length} floats for {step.Rows} rows of {step.VocabSize}.");
        }

        Span<int> emitted = stackalloc int[step.Rows];
        Span<int> rows = stackalloc int[step.Rows];
        int n = 0, at = -1, row = 0;
        while (true)
        {
            int y = greedy ? step.RowArgmax[row] : sampler!.Next(step.Logits.Span.Slice(row * step.VocabSize, step.VocabSize));
            emitted[n] = y;
            rows[n++] = row;
            int child = ChildOf(step, at, y);
            if (child < 0)
            {
                break;
            }

            at = child;
            row = child + 1;
        }

        return new TreeVerdict(step.Step, emitted[..n].ToArray(), rows[..n].ToArray(), sampler?.Draws ?? step.Draws);
    }

    private static int ChildOf(TreeToVerify step, int parent, int token)
    {
        for (int i = 0; i < step.Tokens.Length; i++)
        {
            if (step.Parents[i] == parent && step.Tokens[i] == token)
            {
                return i;
            }
        }

        return -1;
    }
}
