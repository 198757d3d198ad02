namespace CoordGen.Engine.Generation;

/// <summary>How the next token is chosen. Temperature 0 is greedy (argmax, lowest id on ties).</summary>
public sealed record SamplingOptions
{
    public float Temperature { get; init; }

    /// <summary>Keep the k most likely tokens; 0 keeps all.</summary>
    public int TopK { get; init; }

    /// <summary>Keep the smallest set whose probability reaches p; 1 keeps all.</summary>
    public float TopP { get; init; } = 1f;

    public int Seed { get; init; }

    /// <summary>
    /// Random draws to skip first. Every emitted token costs exactly one draw (plain and speculative
    /// alike), so a request resumed after n committed tokens with Offset = n continues the same text.
    /// </summary>
    public int Offset { get; init; }

    /// <summary>
    /// Report each emitted token's log-probability (<see cref="TokenLogprobs"/>) with this many of the
    /// likeliest alternatives (0 to <see cref="TokenLogprobs.MaxTop"/>); null reports none. It changes no token.
    /// </summary>
    public int? Logprobs { get; init; }

    public bool IsGreedy => Temperature <= 0f;

    public void Validate()
    {
        if (float.IsNaN(Temperature) || Temperature < 0f || Temperature > 10f)
        {
            throw new ArgumentException($"temperature must be between 0 and 10 (got {Temperature}); use 0 for greedy decoding.");
        }

        if (TopK < 0)
        {
            throw new ArgumentException($"top-k must be 0 (off) or positive (got {TopK}).");
        }

        if (!(TopP > 0f && TopP <= 1f))
        {
            throw new ArgumentException($"top-p must be in (0, 1] (got {TopP}); use 1 to turn it off.");
        }

        if (Logprobs is < 0 or > TokenLogprobs.MaxTop)
        {
            throw new ArgumentException($"top logprobs must be between 0 and {TokenLogprobs.MaxTop} (got {Logprobs}).");
        }
    }
}

/// <summary>Seeded token selection from a logits row.</summary>
public sealed class Sampler
{
    private readonly SamplingOptions _options;
    private readonly Random _rng;

    public Sampler(SamplingOptions options)
    {
        options.Validate();
        _options = options;
        _rng = new Random(options.Seed);
        if (!options.IsGreedy)
        {
            for (int i = 0; i < options.Offset; i++)
            {
                _rng.NextDouble();
            }

            Draws = options.Offset;
        }
    }

    public SamplingOptions Options => _options;

    /// <summary>Random numbers drawn so far, counting <see cref="SamplingOptions.Offset"/>: the stream's position.</summary>
    public long Draws { get; private set; }

    /// <summary>Index of the largest logit; the lowest index wins ties (vectorized).</summary>
    public static int Argmax(ReadOnlySpan<float> logits) => System.Numerics.Tensors.TensorPrimitives.IndexOfMax(logits);

    /// <summary>The distribution sampling draws from (after temperature, top-k, top-p), as probabilities.</summary>
    public float[] Distribution(ReadOnlySpan<float> logits)
    {
        int n = logits.Length;
        var p = new float[n];
        if (_options.IsGreedy)
        {
            p[Argmax(logits)] = 1f;
            return p;
        }

        float max = float.NegativeInfinity;
        foreach (float l in logits)
        {
            max = Math.Max(max, l);
        }

        double sum = 0;
        for (int i = 0; i < n; i++)
        {
            p[i] = MathF.Exp((logits[i] - max) / _options.Temperature);
            sum += p[i];
        }

        for (int i = 0; i < n; i++)
        {
            p[i] = (float)(p[i] / sum);
        }

        if (_options.TopK > 0 || _options.TopP < 1f)
        {
            var order = Enumerable.Range(0, n).ToArray();
            Array.Sort(order, (a, b) => p[b].CompareTo(p[a]) is var c && c != 0 ? c : a.CompareTo(b));
            int keep = _options.TopK > 0 ? Math.Min(_options.TopK, n) : n;
            double cum = 0;
            for (int r = 0; r < keep; r++)
            {
                cum += p[order[r]];
                if (cum >= _options.TopP)
                {
                    keep = r + 1;
                    break;
                }
            }

            var kept = new float[n];
            double ks = 0;
            for (int r = 0; r < keep; r++)
            {
                kept[order[r]] = p[order[r]];
                ks += p[order[r]];
            }

            for (int i = 0; i < n; i++)
            {
                kept[i] = (float)(kept[i] / ks);
            }

            p = kept;
        }

        return p;
    }

    public int Next(ReadOnlySpan<float> logits)
    {
        if (_options.IsGreedy)
        {
            return Argmax(logits);
        }

        return Draw(Distribution(logits));
    }

    /// <summary>Draws an index from a probability vector with this sampler's random stream.</summary>
    public int Draw(ReadOnlySpan<float> probs)
    {
        double u = _rng.NextDouble();
        Draws++;
        double cum = 0;
        int last = 0;
        for (int i = 0; i < probs.Length; i++)
        {
            if (probs[i] <= 0f)
            {
                continue;
            }

            cum += probs[i];
            last = i;
            if (u < cum)
            {
                return i;
            }
        }

        return last;
    }
}
