using CoordGen.Engine.Generation;
using CoordGen.Engine.Runtime;

namespace CoordGen.Engine.Evaluation;

/// <summary>How one prompt's greedy continuation under a model agrees with a reference model's.</summary>
/// <param name="Tokens">Reference greedy tokens compared.</param>
/// <param name="FirstDivergence">Index of the first token whose argmax differs (null: identical throughout).</param>
/// <param name="ReferenceMargin">At the first divergence, the reference's top-1 minus top-2 logit (how near a tie it was).</param>
/// <param name="MeanKl">Mean KL(reference ‖ model) of the next-token distributions, in nats, over the compared positions.</param>
/// <param name="MaxRelativeLogitDiff">Largest |model - reference| logit over a row, relative to the row's largest |reference logit|.</param>
public sealed record PromptAgreement(int Tokens, int? FirstDivergence, double? ReferenceMargin, double MeanKl, double MaxRelativeLogitDiff)
{
    public bool Identical => FirstDivergence is null;

    /// <summary>Greedy tokens the model reproduces before it first departs from the reference.</summary>
    public int IdenticalTokens => FirstDivergence ?? Tokens;
}

/// <summary>
/// Compares a model with a reference model on the reference's greedy continuation, teacher-forced: both
/// read prompt + continuation in wide chunks, and each position's argmax, logits and distribution are
/// compared. If every argmax agrees, the model's own greedy output is the reference's, token for token;
/// the first position where they differ is where its greedy output would depart.
/// </summary>
public static class Agreement
{
    /// <summary>Logits rows predicting continuation[0..n-1] after <paramref name="prompt"/>, one per call of <paramref name="row"/>.</summary>
    /// <param name="promptLoss">If given, receives the prompt's own next-token loss: summed negative log-likelihood (nats) of prompt tokens 1..n-1.</param>
    public static void TeacherForced(Generator gen, OrtModelRuntime runtime, int[] prompt, IReadOnlyList<int> continuation, Action<int, ReadOnlySpan<float>> row, Action<double>? promptLoss = null)
    {
        double nll = 0;
        // Position p's logits predict token p + 1: rows from the last prompt token to the second-to-last output token.
        int[] all = [.. prompt, .. continuation.Take(Math.Max(0, continuation.Count - 1))];
        int first = prompt.Length - 1;
        using var cache = runtime.CreateCache();
        var prefill = gen.BeginPrefill(cache, all, (buf, start, n) =>
        {
            for (int i = 0; i < n; i++)
            {
                int pos = start + i;
                if (pos >= first && pos - first < continuation.Count)
                {
                    row(pos - first, buf.LogitsRow(i));
                }

                if (pos < first)
                {
                    nll += NegativeLogLikelihood(buf.LogitsRow(i), all[pos + 1]);
                }
            }
        });
        while (!prefill.Step())
        {
        }

        promptLoss?.Invoke(nll);
    }

    /// <summary>-log softmax(logits)[token], in double precision.</summary>
    public static double NegativeLogLikelihood(ReadOnlySpan<float> logits, int token) => LogSumExp(logits) - logits[token];

    /// <summary>Compares rows of one prompt; the reference's rows and greedy tokens come first.</summary>
    public static PromptAgreement Compare(IReadOnlyList<float[]> reference, IReadOnlyList<float[]> model, IReadOnlyList<int> tokens)
    {
        if (reference.Count != model.Count || reference.Count != tokens.Count)
        {
            throw new ArgumentException($"rows to compare differ in number: reference {reference.Count}, model {model.Count}, tokens {tokens.Count}.");
        }

        int? diverged = null;
        double? margin = null;
        double kl = 0, worst = 0;
        for (int i = 0; i < tokens.Count; i++)
        {
            if (diverged is null && Sampler.Argmax(model[i]) != tokens[i])
            {
                diverged = i;
                margin = Margin(reference[i]);
            }

            kl += Kl(reference[i], model[i]);
            worst = Math.Max(worst, RelativeDiff(reference[i], model[i]));
        }

        return new PromptAgreement(tokens.Count, diverged, margin, tokens.Count == 0 ? 0 : kl / tokens.Count, worst);
    }

    /// <summary>Top-1 minus top-2 logit.</summary>
    public static double Margin(ReadOnlySpan<float> logits)
    {
        float a = float.NegativeInfinity, b = float.NegativeInfinity;
        foreach (float v in logits)
        {
            if (v > a)
            {
                b = a;
                a = v;
            }
            else if (v > b)
            {
                b = v;
            }
        }

        return a - b;
    }

    /// <summary>KL(softmax(p) ‖ softmax(q)) in nats, in double precision.</summary>
    public static double Kl(ReadOnlySpan<float> p, ReadOnlySpan<float> q)
    {
        double lp = LogSumExp(p), lq = LogSumExp(q), kl = 0;
        for (int i = 0; i < p.Length; i++)
        {
            double logP = p[i] - lp;
            kl += Math.Exp(logP) * (logP - (q[i] - lq));
        }

        return Math.Max(0, kl);
    }

    private static double LogSumExp(ReadOnlySpan<float> x)
    {
        double max = double.NegativeInfinity;
        foreach (float v in x)
        {
            max = Math.Max(max, v);
        }

        double sum = 0;
        foreach (float v in x)
        {
            sum += Math.Exp(v - max);
        }

        return max + Math.Log(sum);
    }

    private static double RelativeDiff(ReadOnlySpan<float> reference, ReadOnlySpan<float> model)
    {
        double scale = 1e-12, diff = 0;
        for (int i = 0; i < reference.Length; i++)
        {
            scale = Math.Max(scale, Math.Abs(reference[i]));
            diff = Math.Max(diff, Math.Abs(reference[i] - model[i]));
        }

        return diff / scale;
    }
}
