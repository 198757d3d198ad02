using System.Numerics.Tensors;

namespace CoordGen.Engine.Generation;

/// <summary>One of the most likely tokens at a position, with its log-probability.</summary>
public readonly record struct TopLogprob(int Token, float Logprob);

/// <summary>
/// An emitted token's log-probability under the model and the most likely tokens at its position. The
/// distribution is the model's own: the log-softmax of the raw logits, before temperature, top-k or top-p
/// (as vLLM reports by default), so greedy and sampled runs, plain and speculative, report the same
/// numbers for the same position. Under speculation they come from the verification step's logits row
/// that chose the token.
/// </summary>
public sealed record TokenLogprobs(int Token, float Logprob, TopLogprob[] Top)
{
    /// <summary>The most alternatives a request may ask for (OpenAI's limit).</summary>
    public const int MaxTop = 20;

    /// <summary>Log-probability of <paramref name="token"/> in the row, and the <paramref name="top"/> likeliest tokens (lowest id first on ties).</summary>
    public static TokenLogprobs Of(ReadOnlySpan<float> logits, int token, int top)
    {
        if ((uint)token >= (uint)logits.Length)
        {
            throw new ArgumentOutOfRangeException(nameof(token), $"token {token} is outside the vocabulary of {logits.Length}.");
        }

        top = Math.Clamp(top, 0, Math.Min(MaxTop, logits.Length));
        float max = TensorPrimitives.Max(logits);
        double sum = 0;
        foreach (float l in logits)
        {
            sum += Math.Exp(l - max);
        }

        float logZ = (float)(max + Math.Log(sum));
        var best = new TopLogprob[top];
        int filled = 0;
        for (int i = 0; i < logits.Length && top > 0; i++)
        {
            float l = logits[i];
            if (filled == top && l <= best[top - 1].Logprob)
            {
                continue; // not better than the worst kept (an equal logit at a higher id loses the tie)
            }

            int at = Math.Min(filled, top - 1);
            while (at > 0 && best[at - 1].Logprob < l)
            {
                best[at] = best[at - 1];
                at--;
            }

            best[at] = new TopLogprob(i, l);
            filled = Math.Min(filled + 1, top);
        }

        for (int i = 0; i < best.Length; i++)
        {
            best[i] = best[i] with { Logprob = best[i].Logprob - logZ };
        }

        return new TokenLogprobs(token, logits[token] - logZ, best);
    }
}
