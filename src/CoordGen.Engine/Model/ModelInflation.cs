namespace CoordGen.Engine.Model;

/// <summary>The sizes a checkpoint is inflated to; everything else (vocabulary, RoPE, tokens) stays the source's.</summary>
public sealed record InflationTarget(string Architecture, int HiddenSize, int IntermediateSize, int NumLayers, int NumHeads, int NumKvHeads, int HeadDim, bool AttentionBias = false)
{
    /// <summary>The sizes of a published shape (<see cref="ShapeCatalog"/>); its vocabulary and RoPE base are not taken.</summary>
    public static InflationTarget FromShape(ModelConfig shape) => new(
        shape.Architecture, shape.HiddenSize, shape.IntermediateSize, shape.NumLayers, shape.NumHeads, shape.NumKvHeads, shape.HeadDim, shape.AttentionBias);

    public override string ToString() =>
        $"hidden {HiddenSize}, intermediate {IntermediateSize}, {NumLayers} layers, {NumHeads} heads / {NumKvHeads} kv heads of dim {HeadDim}";
}

/// <summary>A target a checkpoint cannot be inflated to; the message says which size and what would work.</summary>
public sealed class InflationException(string message) : ArgumentException(message);

/// <summary>
/// Function-preserving inflation of a Llama-family checkpoint into a larger shape (docs/decisions/0011):
/// the twin computes the source's logits, up to float rounding, while every graph of the twin does all
/// the work and reads all the bytes of the larger shape.
/// <list type="bullet">
/// <item>Hidden channels h..H-1 stay zero in the residual stream: their embedding columns and their
/// o_proj/down_proj rows are zero. RMSNorm gains on the source channels are scaled by sqrt(h/H) and eps
/// by h/H, so every norm divides by the same root mean square as the source's.</item>
/// <item>Head dim D = r·d: source rotary pair (j, j + d/2) lands on (r·j, r·j + D/2), which turns at the
/// same frequency (theta^(-2rj/D) = theta^(-2j/d)); the other q/k rows of a source head are zero, and q
/// is scaled by sqrt(D/d) so the graph's 1/sqrt(D) still scales scores by 1/sqrt(d).</item>
/// <item>Source query head i of kv group k sits in slot i of the twin's group k; extra query heads, extra
/// kv heads, extra MLP channels and extra layers carry random weights and compute like real ones, but
/// the projections that would write their results (o_proj and down_proj columns, and the whole o_proj
/// and down_proj of extra layers) are zero.</item>
/// </list>
/// </summary>
public static class ModelInflation
{
    /// <summary>Standard deviation of the random weights of the parts that write nothing.</summary>
    public const float RandomScale = 0.02f;

    /// <summary>
    /// Scale of the weights the construction needs to write nothing (the extra channels' embedding columns,
    /// o_proj and down_proj parts that would write what extra heads, dims, channels and layers compute, and
    /// the unused q/k rows of source heads): tiny random values instead of zeros. A random-weight model whose
    /// weights held the twin's zeros (36% of them) ran as fast as the twin, 8-12% faster than the same model
    /// without them, on this CPU (decision 0011): multiplying zeros is cheaper than multiplying real numbers,
    /// so a twin with zeros understated a real model's cost. At 1e-16 what these weights add to the residual
    /// stream is about 1e-11 after 30 layers, far below float32's rounding of the values there, and no
    /// product of two of them reaches the subnormal range.
    /// </summary>
    public const float TinyScale = 1e-16f;

    /// <summary>
    /// Version of the construction: a twin folder made by another version is made again
    /// (1: zeros as -0.0; 2: <see cref="TinyScale"/> values instead of zeros).
    /// </summary>
    public const int ConstructionVersion = 2;

    /// <summary>The twin's config: the target's sizes with the source's vocabulary, RoPE, tokens and tying; eps scaled by h/H.</summary>
    public static ModelConfig TwinConfig(ModelConfig source, InflationTarget target)
    {
        Check(source, target);
        var twin = new ModelConfig
        {
            Architecture = target.Architecture,
            HiddenSize = target.HiddenSize,
            IntermediateSize = target.IntermediateSize,
            NumLayers = target.NumLayers,
            NumHeads = target.NumHeads,
            NumKvHeads = target.NumKvHeads,
            HeadDim = target.HeadDim,
            RmsNormEps = (float)((double)source.RmsNormEps * source.HiddenSize / target.HiddenSize),
            RopeTheta = source.RopeTheta,
            RopeScaling = source.RopeScaling,
            VocabSize = source.VocabSize,
            MaxPositionEmbeddings = source.MaxPositionEmbeddings,
            TieWordEmbeddings = source.TieWordEmbeddings,
            AttentionBias = source.AttentionBias || target.AttentionBias || target.Architecture == "Qwen2ForCausalLM",
            BosTokenId = source.BosTokenId,
            EosTokenIds = source.EosTokenIds,
        };
        twin.Validate("inflation target");
        return twin;
    }

    /// <summary>Throws an <see cref="InflationException"/> naming the first size that cannot hold the source.</summary>
    public static void Check(ModelConfig source, InflationTarget target)
    {
        void Require(bool ok, string what)
        {
            if (!ok)
            {
                throw new InflationException($"cannot inflate {Describe(source)} to {target}: {what}");
            }
        }

        Require(ModelConfig.SupportedArchitectures.Contains(target.Architecture), $"architecture '{target.Architecture}' is not one of {string.Join(", ", ModelConfig.SupportedArchitectures)}.");
        Require(target.HiddenSize >= source.HiddenSize, $"hidden size {target.HiddenSize} is smaller than the source's {source.HiddenSize}; a twin can only grow.");
        Require(target.IntermediateSize >= source.IntermediateSize, $"intermediate size {target.IntermediateSize} is smaller than the source's {source.IntermediateSize}.");
        Require(target.NumLayers >= source.NumLayers, $"{target.NumLayers} layers are fewer than the source's {source.NumLayers}.");
        Require(target.HeadDim >= source.HeadDim && target.HeadDim % source.HeadDim == 0, $"head dim {target.HeadDim} is not a multiple of the source's {source.HeadDim} (rotary pairs must land on the same frequencies).");
        Require(target.NumKvHeads >= source.NumKvHeads, $"{target.NumKvHeads} kv heads are fewer than the source's {source.NumKvHeads}.");
        Require(target.NumHeads > 0 && target.NumHeads % target.NumKvHeads == 0, $"{target.NumHeads} query heads are not a multiple of {target.NumKvHeads} kv heads.");
        int g = source.NumHeads / source.NumKvHeads, gt = target.NumHeads / target.NumKvHeads;
        Require(gt >= g, $"its query groups hold {gt} heads per kv head, fewer than the source's {g}; raise the query heads to at least {g * target.NumKvHeads}.");
    }

    private static string Describe(ModelConfig c) =>
        $"the source (hidden {c.HiddenSize}, intermediate {c.IntermediateSize}, {c.NumLayers} layers, {c.NumHeads} heads / {c.NumKvHeads} kv heads of dim {c.HeadDim})";

    /// <summary>The twin's weights. <paramref name="seed"/> fixes the random parts, so a twin is made again bit for bit.</summary>
    public static ModelWeights Inflate(ModelWeights source, InflationTarget target, int seed = 1, IProgress<double>? progress = null)
    {
        var s = source.Config;
        var t = TwinConfig(s, target);
        var rng = new FastNormal((ulong)seed);
        int h = s.HiddenSize, hT = t.HiddenSize, d = s.HeadDim, dT = t.HeadDim, g = s.NumHeads / s.NumKvHeads, gT = t.NumHeads / t.NumKvHeads;
        float normScale = (float)Math.Sqrt((double)h / hT);
        float qScale = (float)Math.Sqrt((double)dT / d);

        // Source head row j (0..d-1) lands on twin row HeadRow(j) within the head: halves stay halves, spaced by r.
        int r = dT / d;
        int HeadRow(int j) => j < d / 2 ? r * j : (dT / 2) + (r * (j - (d / 2)));

        var expected = ModelWeights.ExpectedTensors(t).ToList();
        long total = expected.Sum(e => e.Shape.Aggregate(1L, (a, b) => a * b)), done = 0;
        var tensors = new List<WeightTensor>(expected.Count);
        foreach (var (name, shape) in expected)
        {
            var data = GC.AllocateUninitializedArray<float>(checked((int)shape.Aggregate(1L, (a, b) => a * b)), pinned: true);
            var view = new Matrix(data, shape.Length == 2 ? (int)shape[1] : data.Length);
            int layer = LayerOf(name);
            bool sourceLayer = layer < s.NumLayers;
            string role = layer < 0 ? name : name[(name.IndexOf('.', "model.layers.".Length) + 1)..];
            string sp = $"model.layers.{layer}.";
            switch (role)
            {
                case "model.embed_tokens.weight":
                    rng.Fill(data, TinyScale);
                    view.CopyBlock(source[name].Data, h);
                    break;
                case "lm_head.weight":
                    rng.Fill(data, RandomScale);
                    view.CopyBlock(source[name].Data, h);
                    break;
                case "model.norm.weight" or "input_layernorm.weight" or "post_attention_layernorm.weight":
                    if (layer >= 0 && !sourceLayer)
                    {
                        rng.FillNorm(data);
                        break;
                    }

                    Array.Fill(data, 1f);
                    var src = source[name].Data;
                    for (int i = 0; i < h; i++)
                    {
                        data[i] = src[i] * normScale;
                    }

                    break;
                case "self_attn.q_proj.weight" or "self_attn.k_proj.weight":
                    rng.Fill(data, RandomScale);
                    if (sourceLayer)
                    {
                        bool isQ = role.StartsWith("self_attn.q", StringComparison.Ordinal);
                        MapHeads(view, source[sp + role].Data, h, isQ ? s.NumHeads : s.NumKvHeads, isQ ? g : 1, isQ ? gT : 1, d, dT, HeadRow, isQ ? qScale : 1f, zeroRestOfHead: true, rng);
                    }

                    break;
                case "self_attn.v_proj.weight":
                    rng.Fill(data, RandomScale);
                    if (sourceLayer)
                    {
                        MapHeads(view, source[sp + role].Data, h, s.NumKvHeads, 1, 1, d, dT, HeadRow, 1f, zeroRestOfHead: false, rng);
                    }

                    break;
                case "self_attn.q_proj.bias" or "self_attn.k_proj.bias" or "self_attn.v_proj.bias":
                    rng.Fill(data, RandomScale);
                    if (sourceLayer)
                    {
                        bool isQ = role.StartsWith("self_attn.q", StringComparison.Ordinal);
                        var srcBias = s.AttentionBias ? source[sp + role].Data : new float[isQ ? s.QDim : s.KvDim];
                        MapHeads(new Matrix(data, 1), srcBias, 1, isQ ? s.NumHeads : s.NumKvHeads, isQ ? g : 1, isQ ? gT : 1, d, dT, HeadRow,
                            isQ ? qScale : 1f, zeroRestOfHead: !role.StartsWith("self_attn.v", StringComparison.Ordinal), rng);
                    }

                    break;
                case "self_attn.o_proj.weight":
                    // Writes only what source heads computed into source channels; extra heads and dims write nothing.
                    rng.Fill(data, TinyScale);
                    if (sourceLayer)
                    {
                        var o = source[sp + role].Data;
                        for (int row = 0; row < h; row++)
                        {
                            for (int sh = 0; sh < s.NumHeads; sh++)
                            {
                                int th = TwinHead(sh, g, gT);
                                for (int j = 0; j < d; j++)
                                {
                                    view[row, (th * dT) + HeadRow(j)] = o[(row * s.QDim) + (sh * d) + j];
                                }
                            }
                        }
                    }

                    break;
                case "mlp.gate_proj.weight" or "mlp.up_proj.weight":
                    rng.Fill(data, RandomScale);
                    if (sourceLayer)
                    {
                        view.CopyBlock(source[sp + role].Data, h);
                    }

                    break;
                case "mlp.down_proj.weight":
                    rng.Fill(data, TinyScale);
                    if (sourceLayer)
                    {
                        view.CopyBlock(source[sp + role].Data, s.IntermediateSize);
                    }

                    break;
                default:
                    throw new InvalidOperationException($"inflation has no rule for weight '{name}'.");
            }

            tensors.Add(new WeightTensor(name, shape, data));
            done += data.LongLength;
            progress?.Report((double)done / total);
        }

        return new ModelWeights(t, tensors);
    }

    /// <summary>Twin head of source head <paramref name="head"/>: slot i of group k stays slot i of group k.</summary>
    public static int TwinHead(int head, int groupSize, int twinGroupSize) => ((head / groupSize) * twinGroupSize) + (head % groupSize);

    private static int LayerOf(string name)
    {
        const string prefix = "model.layers.";
        if (!name.StartsWith(prefix, StringComparison.Ordinal))
        {
            return -1;
        }

        int end = name.IndexOf('.', prefix.Length);
        return int.Parse(name.AsSpan(prefix.Length, end - prefix.Length), System.Globalization.CultureInfo.InvariantCulture);
    }

    /// <summary>
    /// Copies a projection's source heads (rows of <paramref name="cols"/> source columns) into their twin
    /// heads, row j of a head onto <paramref name="headRow"/>(j), times <paramref name="scale"/>.
    /// </summary>
    private static void MapHeads(Matrix twin, float[] src, int cols, int heads, int g, int gT, int d, int dT, Func<int, int> headRow, float scale, bool zeroRestOfHead, FastNormal rng)
    {
        for (int sh = 0; sh < heads; sh++)
        {
            int th = TwinHead(sh, g, gT);
            if (zeroRestOfHead)
            {
                for (int row = th * dT; row < (th + 1) * dT; row++)
                {
                    twin.FillRow(row, rng, TinyScale);
                }
            }

            for (int j = 0; j < d; j++)
            {
                int srow = (sh * d) + j, trow = (th * dT) + headRow(j);
                for (int col = 0; col < cols; col++)
                {
                    twin[trow, col] = src[(srow * cols) + col] * scale;
                }
            }
        }
    }

    /// <summary>A row-major view of a flat tensor.</summary>
    private readonly struct Matrix(float[] data, int cols)
    {
        public float this[int row, int col]
        {
            get => data[((long)row * cols) + col];
            set => data[((long)row * cols) + col] = value;
        }

        /// <summary>Row <paramref name="row"/> as tiny random values (<see cref="TinyScale"/>): it writes nothing that float32 keeps.</summary>
        public void FillRow(int row, FastNormal rng, float std) => rng.Fill(data.AsSpan(row * cols, cols), std);

        /// <summary>Copies a [rows, srcCols] source into the top-left block (same row and column indices).</summary>
        public void CopyBlock(float[] src, int srcCols)
        {
            int rows = src.Length / srcCols;
            for (int i = 0; i < rows; i++)
            {
                Array.Copy(src, (long)i * srcCols, data, (long)i * cols, srcCols);
            }
        }
    }

    /// <summary>SplitMix64 turned into roughly normal floats (a sum of four uniforms): fast enough for a billion weights.</summary>
    internal sealed class FastNormal(ulong seed)
    {
        private ulong _state = seed * 0x9E3779B97F4A7C15UL;

        private ulong Next()
        {
            ulong z = _state += 0x9E3779B97F4A7C15UL;
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
            return z ^ (z >> 31);
        }

        /// <summary>Four 16-bit uniforms from one draw, summed and centred: variance 4/12, so scaled by sqrt(3) to unit variance.</summary>
        private float Sample()
        {
            ulong x = Next();
            int sum = (int)(x & 0xFFFF) + (int)((x >> 16) & 0xFFFF) + (int)((x >> 32) & 0xFFFF) + (int)(x >> 48);
            return ((sum / 65536f) - 2f) * 1.7320508f;
        }

        public void Fill(Span<float> data, float std)
        {
            for (int i = 0; i < data.Length; i++)
            {
                data[i] = Sample() * std;
            }
        }

        public void FillNorm(float[] data)
        {
            for (int i = 0; i < data.Length; i++)
            {
                data[i] = 1f + (0.1f * Sample());
            }
        }
    }
}
