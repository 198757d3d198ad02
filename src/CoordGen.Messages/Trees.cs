using System.Collections.Immutable;

namespace CoordGen.Messages;

/// <summary>
/// A drafter's token tree for one verification step, as data: node i has token <see cref="Tokens"/>[i],
/// parent node <see cref="Parents"/>[i] (-1 = the root, the last committed token) and came from draft
/// source <see cref="Sources"/>[i]. A node's parent always comes before it, so the first n nodes are a
/// tree too (a narrower graph keeps a prefix). The main chain is <see cref="Chain"/> (node indexes, in order).
/// </summary>
/// <param name="DraftMs">The drafter's time on this tree.</param>
/// <param name="Degraded">Drafting failed: the tree is empty and the step verifies the root alone.</param>
public sealed record DraftProposal(ImmutableArray<int> Tokens, ImmutableArray<int> Parents, ImmutableArray<byte> Sources, ImmutableArray<int> Chain, double DraftMs, bool Degraded = false)
{
    public static readonly DraftProposal Empty = new([], [], [], [], 0);

    public int Count => Tokens.Length;
}

/// <summary>
/// What one verification step did, as the drafter needs it to learn from (draft reuse, whether the main
/// chain can be trusted): the width it ran at (a narrower graph keeps a prefix of the proposal's nodes),
/// the verdict's tokens (the accepted drafts and the model's own token), the logits rows of the accepted
/// path, and each row's greedy token. Width 1: a plain step where a tree could have run. Null for steps
/// that verified no tree at all (near the cache's capacity).
/// </summary>
public sealed record StepOutcome(int Width, ImmutableArray<int> Emitted, ImmutableArray<int> KeptRows, ImmutableArray<int> RowArgmax);

/// <summary>
/// What acceptance needs from one verification step, detached from the device's buffers: the draft
/// tree (node i is logits row i + 1; row 0 is the root) and, per row, the model's greedy token, plus the
/// rows' logits when sampling. <paramref name="Step"/> numbers the session's steps, so a verdict that
/// arrives for another step is recognised as stale. A step with no nodes is a plain one-token step.
/// </summary>
/// <param name="Draws">Random draws the session made before this step (the sampler's position).</param>
/// <param name="Logits">Rows x <paramref name="VocabSize"/> logits; empty when greedy.</param>
public sealed record TreeToVerify(int Step, int[] Tokens, int[] Parents, int[] RowArgmax, ReadOnlyMemory<float> Logits, int VocabSize, long Draws)
{
    /// <summary>Rows the device computed that acceptance can read: the root and every node.</summary>
    public int Rows => Tokens.Length + 1;
}

/// <summary>
/// The outcome of one verification step: the tokens to emit (the accepted drafts, then the model's own
/// token after them) and the logits rows of the accepted path (row 0 first), which are the KV rows to keep.
/// </summary>
/// <param name="Draws">The sampler's position after this step.</param>
public sealed record TreeVerdict(int Step, int[] Emitted, int[] Rows, long Draws)
{
    /// <summary>Draft tokens accepted (the model's own last token is not one).</summary>
    public int Accepted => Emitted.Length - 1;
}

/// <summary>
/// The top-k next tokens (best first) and their probabilities for consecutive prompt rows: a copy of one
/// prefill chunk's, small enough to hand to a calibrator.
/// </summary>
public sealed record TopRows(int K, int[] Ids, float[] Probs)
{
    public int Rows => Ids.Length / K;
}

/// <summary>
/// A calibrated index as data (paper §3.3): the symbols of its calibrated paths (each path's left context,
/// its tokens, then -1), which the drafter indexes with a suffix automaton.
/// </summary>
public sealed record CalibratedPaths(ImmutableArray<int> Symbols, int Paths);
