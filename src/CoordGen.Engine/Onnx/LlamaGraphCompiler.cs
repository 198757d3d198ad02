using CoordGen.Engine.Model;
using CoordGen.Engine.Onnx.Proto;
using CoordGen.Engine.Runtime;
using Google.Protobuf;
using DT = CoordGen.Engine.Onnx.Proto.TensorProto.Types.DataType;

namespace CoordGen.Engine.Onnx;

/// <summary>Static shape of one compiled graph: W new tokens against a KV cache of C slots.</summary>
public readonly record struct GraphShape(int Width, int Capacity)
{
    public override string ToString() => $"W={Width},C={Capacity}";
}

/// <summary>
/// Writes a Llama-family decoder as an ONNX graph (opset 17) with fully static shapes, the way NPU
/// deployments compile fixed AR-N graphs.
/// <para>Inputs: <c>input_ids</c> int64 [1,W]; <c>position_ids</c> int64 [1,W];
/// <c>attention_mask</c> float [1,1,W,C+W], additive (0 = visible, -1e9 = hidden), columns 0..C-1 are
/// cache slots and C..C+W-1 the new tokens, so a token tree is verified by giving each row its
/// ancestors; <c>past_key_i</c>/<c>past_value_i</c> float [1,Hkv,C,D] per layer.</para>
/// <para>Outputs: <c>logits</c> float [1,W,V]; with <c>topCandidates</c> K &gt; 0 also <c>top_ids</c> int64
/// [1,W,K] and <c>top_probs</c> float [1,W,K]: each row's K most likely next tokens (ties: lower id first,
/// as argmax) and their softmax probabilities, so greedy verification and calibration read K numbers a row
/// instead of scanning V logits on the host; <c>present_key_i</c>/<c>present_value_i</c> float
/// [1,Hkv,W,D]: the keys (after RoPE) and values of the W new tokens only. The graph never copies
/// the cache: attention scores against the cache and against the new tokens are computed
/// separately and joined, so the caller's cache buffers are read in place.</para>
/// </summary>
public static class LlamaGraphCompiler
{
    public const int Opset = 17;
    public const float MaskedValue = -1e9f;

    /// <summary>File name the weights' external-data entries point at (a placeholder; see OrtModelRuntime).</summary>
    public const string SharedWeightsFile = "coordgen-shared-weights.bin";

    public static string PastKey(int layer) => $"past_key_{layer}";

    public static string PastValue(int layer) => $"past_value_{layer}";

    public static string PresentKey(int layer) => $"present_key_{layer}";

    public static string PresentValue(int layer) => $"present_value_{layer}";

    /// <summary>Slot <paramref name="slot"/>'s cache input of a packed graph (slot 0 of a one-slot graph keeps the plain name).</summary>
    public static string PastKey(int layer, int slot, int slots) => slots == 1 ? PastKey(layer) : $"past_key_{layer}_s{slot}";

    public static string PastValue(int layer, int slot, int slots) => slots == 1 ? PastValue(layer) : $"past_value_{layer}_s{slot}";

    public static string PresentKey(int layer, int slot, int slots) => slots == 1 ? PresentKey(layer) : $"present_key_{layer}_s{slot}";

    public static string PresentValue(int layer, int slot, int slots) => slots == 1 ? PresentValue(layer) : $"present_value_{layer}_s{slot}";

    /// <summary>Weight names the graph expects as shared initializers.</summary>
    public static IEnumerable<string> WeightNames(ModelConfig c) => ModelWeights.ExpectedTensors(c).Select(e => e.Name);

    /// <param name="slots">Sessions packed into one run (issue 19): S slots of W rows each, every slot with its own
    /// cache inputs; the linear layers and the head run on all S·W rows at once (the weights are read once
    /// for all of them), attention runs per slot against that slot's cache only. Inputs: <c>input_ids</c> and
    /// <c>position_ids</c> [1,S·W] (slot s holds rows s·W..), <c>attention_mask</c> [S,1,W,C+W],
    /// <c>past_key_i_sS</c>/<c>past_value_i_sS</c> [1,Hkv,C,D]; outputs <c>logits</c> [1,S·W,V] (and top-K
    /// likewise), <c>present_key_i_sS</c>/<c>present_value_i_sS</c> [1,Hkv,W,D]. One slot is the plain graph.</param>
    /// <param name="kv">How the caches hold keys and values: with <see cref="KvFormat.F16"/> the past inputs and present
    /// outputs are float16; attention reads them converted to float32, and the new rows are rounded to float16
    /// before any row attends to them, so a token's keys and values are the same numbers whether a later token
    /// reads them in the same step (a verified tree) or from the cache (plain decoding).</param>
    /// <param name="groupQuery">A packed graph (float32 caches) whose attention is ONNX Runtime's
    /// <c>com.microsoft.GroupQueryAttention</c>, one node per slot over that slot's cache in place: an extra
    /// input <c>kv_lengths</c> [S] (int32, each cache's committed slots) says where each slot's new rows go
    /// (from that length on) and how far they attend; <c>present_key_i_sS</c>/<c>present_value_i_sS</c> are
    /// then the whole caches [1,Hkv,C_s,D], each of its own size (its KV bucket; C only bounds the mask), to be bound to the same memory as the past inputs (the new rows are
    /// written there, no commit copies them). Width 1 ignores <c>attention_mask</c>; wider slots (trees) take
    /// only its last W columns, each slot's tree block, as the node's additive bias after zeros over the
    /// cache. No cache is joined and each slot is scored over its own length, not the bucket (decision 0023).</param>
    /// <param name="float64Attention">The attention's two sums over keys (the softmax's denominator and the weighted sum of
    /// values) computed in float64 and rounded to float32 once at the end; the scores, their max and exponentials stay
    /// float32. A row's output then does not depend on the number of rows or on where its keys sit (the cache or the
    /// step's own columns), short of an exact value within about 1e-16 of a float32 rounding boundary. Quantized
    /// weights need this for speculation to stay lossless (decision 0025). Joined form only.</param>
    /// <param name="mixed">A mixed graph (with <paramref name="groupQuery"/>, decision 0026): slot 0 carries a prefill chunk of
    /// W rows and slots 1..S-1 one decode row each (or a tree each, <paramref name="riderWidth"/>), so a chunk and S-1
    /// sessions' steps share one run. Rows: n = W + S - 1 (the chunk first); <c>attention_mask</c> is the chunk's own
    /// [1,1,W,C+W] (its last W columns, the causal block, are the chunk's bias; decode rows need none).</param>
    /// <param name="riderWidth">Rows of each of a mixed graph's other slots: 1 (one decode row each), or a tree's width R
    /// (decision 0029): n = W + (S - 1)·R, and input <c>rider_mask</c> [S-1,1,R,R] holds each rider's tree block, its bias
    /// after zeros over its cache, as a packed tree slot's.</param>
    public static byte[] CompileBytes(ModelConfig c, GraphShape shape, bool hasLmHead = false, int topCandidates = 0, WeightFormat weights = WeightFormat.F32, int slots = 1, KvFormat kv = KvFormat.F32, bool groupQuery = false, bool float64Attention = false, bool mixed = false, bool fused = false, int riderWidth = 1) =>
        Compile(c, shape, hasLmHead, topCandidates: topCandidates, weights: weights, slots: slots, kv: kv, groupQuery: groupQuery, float64Attention: float64Attention, mixed: mixed, fused: fused, riderWidth: riderWidth).ToByteArray();

    /// <summary>Input of a mixed graph whose riders are trees: each rider's tree block, float [S-1, 1, R, R] (0 or a large negative).</summary>
    public const string RiderMask = "rider_mask";

    /// <summary>Input of a <c>groupQuery</c> packed graph: each slot's committed cache length, int32 [S].</summary>
    public const string KvLengths = "kv_lengths";

    /// <summary>Shared initializer holding a quantized linear layer's codes ([N, K/block, block·bits/8] uint8).</summary>
    public static string QuantizedCodes(string weight) => weight + ".q";

    /// <summary>Shared initializer holding a quantized linear layer's scales ([N·K/block] float).</summary>
    public static string QuantizedScales(string weight) => weight + ".scales";

    /// <summary>
    /// MatMulNBits' accuracy_level: 4 lets the CPU kernel quantize activations to int8 per block and use the
    /// int8 dot-product instructions (VNNI); level 0 runs 10-20x slower than float32 here (issue 18).
    /// </summary>
    public const int QuantizedAccuracyLevel = 4;

    /// <summary>Candidates per row in the <c>top_ids</c>/<c>top_probs</c> outputs of the runtime's verification and prefill graphs.</summary>
    public const int TopCandidates = 4;

    public const string TopIds = "top_ids";

    public const string TopProbs = "top_probs";

    /// <summary>Hidden state between blocks of a split model: [W, hidden].</summary>
    public const string HiddenIn = "hidden_in";

    public const string HiddenOut = "hidden_out";

    /// <summary>
    /// One block of a split model: decoder layers [<paramref name="firstLayer"/>, <paramref name="endLayer"/>).
    /// The first block starts from input_ids (embedding), the others from <see cref="HiddenIn"/>; the last
    /// ends with the norm and head (logits), the others with <see cref="HiddenOut"/>. Past/present names
    /// keep the model's layer numbers.
    /// </summary>
    public static byte[] CompileBlockBytes(ModelConfig c, GraphShape shape, int firstLayer, int endLayer, bool hasLmHead = false) =>
        Compile(c, shape, hasLmHead, firstLayer, endLayer).ToByteArray();

    internal static ModelProto Compile(ModelConfig c, GraphShape shape, bool hasLmHead = false, int firstLayer = 0, int endLayer = -1, int topCandidates = 0, WeightFormat weights = WeightFormat.F32, int slots = 1, KvFormat kv = KvFormat.F32, bool groupQuery = false, bool float64Attention = false, bool mixed = false, bool fused = false, int riderWidth = 1)
    {
        if (mixed && !groupQuery)
        {
            throw new ArgumentException("a mixed graph (a prefill chunk beside decode rows) is a GroupQueryAttention packed graph.");
        }

        if (riderWidth < 1 || (riderWidth > 1 && !mixed))
        {
            throw new ArgumentException($"a rider width above 1 is for mixed graphs only, and at least 1 (got {riderWidth}, mixed: {mixed}).");
        }

        if (groupQuery && float64Attention)
        {
            throw new ArgumentException("GroupQueryAttention computes in float32; float64 attention needs the joined form.");
        }

        if (groupQuery && (slots < 2 || kv != KvFormat.F32))
        {
            throw new ArgumentException($"GroupQueryAttention packing is for packed graphs over float32 caches (got {slots} slots, {kv} caches).");
        }

        if (topCandidates < 0 || topCandidates > c.VocabSize)
        {
            throw new ArgumentException($"top candidates must be between 0 and the vocabulary size {c.VocabSize} (got {topCandidates}).");
        }

        if (endLayer < 0)
        {
            endLayer = c.NumLayers;
        }

        if (firstLayer < 0 || firstLayer >= endLayer || endLayer > c.NumLayers)
        {
            throw new ArgumentException($"layer range [{firstLayer}, {endLayer}) is not inside the model's {c.NumLayers} layers.");
        }

        bool first = firstLayer == 0, last = endLayer == c.NumLayers;
        if (slots < 1 || (slots > 1 && !(first && last)))
        {
            throw new ArgumentException($"slots must be at least 1, and packed graphs hold the whole model (got {slots} slots for layers [{firstLayer}, {endLayer})).");
        }

        // n: rows of the whole run (every slot's); w: rows of one slot (of the chunk's slot in a mixed graph, the
        // others riderWidth each); rowsOf[s]: slot s's rows.
        int rw = riderWidth, w = shape.Width, n = mixed ? w + ((slots - 1) * rw) : slots * w, cap = shape.Capacity, d = c.HeadDim, hkv = c.NumKvHeads, g = c.NumHeads / c.NumKvHeads;
        string name = first && last ? $"coordgen_{shape.Width}x{shape.Capacity}" : $"coordgen_{shape.Width}x{shape.Capacity}_layers{firstLayer}-{endLayer}";
        int[] rowsOf = [.. Enumerable.Range(0, slots).Select(s => !mixed || s == 0 ? w : rw)];
        var b = new GraphBuilder(slots == 1 ? name : $"{name}_s{slots}{(mixed ? "_mixed" : "")}{(rw > 1 ? $"_r{rw}" : "")}");
        bool half = kv == KvFormat.F16;
        var kvType = half ? DT.Float16 : DT.Float;
        string ToFloat(string t) => half ? b.Node("Cast", [t], attrs: GraphBuilder.Int("to", (long)DT.Float)) : t;
        string ToKv(string t) => half ? b.Node("Cast", [t], attrs: GraphBuilder.Int("to", (long)DT.Float16)) : t;

        if (first)
        {
            b.Input("input_ids", DT.Int64, 1, n);
        }
        else
        {
            b.Input(HiddenIn, DT.Float, w, c.HiddenSize);
        }

        b.Input("position_ids", DT.Int64, 1, n);
        b.Input("attention_mask", DT.Float, mixed ? 1 : slots, 1, w, cap + w);
        if (groupQuery)
        {
            b.Input(KvLengths, DT.Int32, slots);
        }

        if (rw > 1)
        {
            b.Input(RiderMask, DT.Float, slots - 1, 1, rw, rw);
        }

        // In place, each slot's cache keeps its own size (its KV bucket): GroupQueryAttention reads it up to the
        // slot's length whatever its size, so a pack never moves its sessions' caches into the largest bucket.
        for (int i = firstLayer; i < endLayer; i++)
        {
            for (int s = 0; s < slots; s++)
            {
                object size = groupQuery ? $"cache_s{s}" : cap;
                b.InputDynamic(PastKey(i, s, slots), kvType, 1, hkv, size, d);
                b.InputDynamic(PastValue(i, s, slots), kvType, 1, hkv, size, d);
            }
        }

        string W(string name, params long[] dims) => b.SharedWeight(name, dims);

        string? embed = first || (last && !hasLmHead) ? W("model.embed_tokens.weight", c.VocabSize, c.HiddenSize) : null;
        string shapeWH = b.ConstInt64([n, c.HiddenSize], hint: "shape_wh");

        // Embedding lookup, flattened to [W, hidden].
        string x = first ? b.Node("Reshape", [b.Node("Gather", [embed!, "input_ids"], attrs: GraphBuilder.Int("axis", 0)), shapeWH]) : HiddenIn;

        // Rotary tables from positions: cos/sin [1,1,W,D], halves duplicated (rotate_half convention). The contrib
        // kernel (fused) reads tables made at compile time instead, below.
        var invFreq = c.RopeInverseFrequencies();
        string cos = "", sin = "";
        if (!fused)
        {
            string pos = b.Node("Reshape", [b.Node("Cast", ["position_ids"], attrs: GraphBuilder.Int("to", (long)DT.Float)), b.ConstInt64([n, 1])]);
            string freqs = b.Node("Mul", [pos, b.ConstFloat(invFreq, [1, d / 2], "inv_freq")]);
            string emb = b.Node("Reshape", [b.Node("Concat", [freqs, freqs], attrs: GraphBuilder.Int("axis", -1)), b.ConstInt64([1, 1, n, d])]);
            cos = b.Node("Cos", [emb]);
            sin = b.Node("Sin", [emb]);
        }

        string mask5 = groupQuery ? "" : b.Node("Reshape", ["attention_mask", b.ConstInt64([slots, 1, 1, w, cap + w])]); // GroupQueryAttention masks by kv_lengths
        string eps = b.ConstFloat([c.RmsNormEps], [1], "eps");
        string scale = b.ConstFloat([(float)(1.0 / Math.Sqrt(d))], [1], "scale");
        string halves = fused ? "" : b.ConstInt64([d / 2, d / 2], hint: "halves");
        string shapeQ = b.ConstInt64([1, n, c.NumHeads, d]);
        string shapeKv = b.ConstInt64([1, n, hkv, d]);
        string shapeQkv = weights == WeightFormat.F32 ? "" : b.ConstInt64([1, n, c.NumHeads + (2 * hkv), d]);
        string shapeGrouped = b.ConstInt64([slots, hkv, g * w, d]);
        string shapeScores5 = b.ConstInt64([slots, hkv, g, w, cap + w]);
        string shapeScores4 = b.ConstInt64([slots, hkv, g * w, cap + w]);
        string shapeHeads = b.ConstInt64([slots, c.NumHeads, w, d]);
        string shapeWQ = b.ConstInt64([n, c.QDim]);
        string sliceStart0 = b.ConstInt64([0]);
        string sliceC = b.ConstInt64([cap]);
        string sliceEnd = b.ConstInt64([cap + w]);
        string axisLast = b.ConstInt64([-1]);

        string two = b.ConstFloat([2f], [1], "two");

        // Rows [start, end) of a tensor along an axis (a packed graph's slot).
        string Slice(string t, int start, int end, int axis) => b.Node("Slice", [t, b.ConstInt64([start]), b.ConstInt64([end]), b.ConstInt64([axis])]);

        // x / sqrt(mean(x^2) + eps) * w, written as Pow, ReduceMean, Add, Sqrt, Div, Mul: the pattern ONNX
        // Runtime fuses into one SimplifiedLayerNormalization kernel (a Mul(x, x) and Reciprocal form is not).
        string RmsNorm(string input, string weight)
        {
            string ms = b.Node("ReduceMean", [b.Node("Pow", [input, two])], attrs: [GraphBuilder.Ints("axes", -1), GraphBuilder.Int("keepdims", 1)]);
            return b.Node("Mul", [b.Node("Div", [input, b.Node("Sqrt", [b.Node("Add", [ms, eps])])]), weight]);
        }

        string? pending = null;
        string NormResidual(string weight)
        {
            if (pending is null)
            {
                return RmsNorm(x, weight);
            }

            if (!fused)
            {
                x = b.Node("Add", [x, pending]);
                pending = null;
                return RmsNorm(x, weight);
            }

            string normed = b.Fresh("skipnorm"), sum = b.Fresh("residual");
            b.ContribNodeOutputs("SkipSimplifiedLayerNormalization", [x, pending, weight], [normed, "", "", sum], GraphBuilder.Float("epsilon", c.RmsNormEps));
            x = sum;
            pending = null;
            return normed;
        }

        // A decoder layer's projection [n, k]: float32 Gemm, or MatMulNBits over the shared quantized codes.
        string Linear(string input, string weight, int n, int k, string? bias = null)
        {
            if (weights == WeightFormat.F32)
            {
                string w = W(weight, n, k);
                return b.Node("Gemm", bias is null ? [input, w] : [input, w, bias], attrs: GraphBuilder.Int("transB", 1));
            }

            int bits = WeightQuantizer.Bits(weights), bs = WeightQuantizer.BlockSize;
            int blocks = (k + bs - 1) / bs;
            string codes = b.SharedWeight(QuantizedCodes(weight), [n, blocks, bs * bits / 8], DT.Uint8);
            string scales = b.SharedWeight(QuantizedScales(weight), [n * blocks]);
            string y = b.ContribNode("MatMulNBits", [input, codes, scales],
                GraphBuilder.Int("K", k), GraphBuilder.Int("N", n), GraphBuilder.Int("bits", bits), GraphBuilder.Int("block_size", bs),
                GraphBuilder.Int("accuracy_level", QuantizedAccuracyLevel));
            return bias is null ? y : b.Node("Add", [y, bias]);
        }

        string? cosCache = null, sinCache = null;
        if (fused)
        {
            // Positions stay below C + W; ONNX Runtime's kernel also wants at least as many table rows as the run has
            // rows, which a pack of S slots of W rows (S x W) can exceed at a small capacity.
            int rowsMax = Math.Max(cap + Math.Max(w, rw), n);
            var cosT = new float[rowsMax * (d / 2)];
            var sinT = new float[rowsMax * (d / 2)];
            for (int r = 0; r < rowsMax; r++)
            {
                for (int j = 0; j < d / 2; j++)
                {
                    float f = (float)r * invFreq[j];
                    cosT[(r * (d / 2)) + j] = MathF.Cos(f);
                    sinT[(r * (d / 2)) + j] = MathF.Sin(f);
                }
            }

            cosCache = b.ConstFloat(cosT, [rowsMax, d / 2], "cos_cache");
            sinCache = b.ConstFloat(sinT, [rowsMax, d / 2], "sin_cache");
        }

        string Rope(string t)
        {
            if (fused)
            {
                return b.ContribNode("RotaryEmbedding", [t, "position_ids", cosCache!, sinCache!], GraphBuilder.Int("interleaved", 0));
            }

            var parts = b.NodeMulti("Split", [t, halves], 2, GraphBuilder.Int("axis", -1));
            string rotated = b.Node("Concat", [b.Node("Neg", [parts[1]]), parts[0]], attrs: GraphBuilder.Int("axis", -1));
            return b.Node("Add", [b.Node("Mul", [t, cos]), b.Node("Mul", [rotated, sin])]);
        }

        string ToHeads(string t, string shape4) => b.Node("Transpose", [b.Node("Reshape", [t, shape4])], attrs: GraphBuilder.Ints("perm", 0, 2, 1, 3));

        // GroupQueryAttention packing, once for all layers: each slot's seqlens_k (its length after the step,
        // less one: the new rows go from its committed length on) and total length; for slots of several rows
        // (trees), its additive bias [1,1,W,length + W]: zeros over the cache, then the slot's tree block of
        // attention_mask (its last W columns), so a node attends to its ancestors only.
        var gqaLengths = new List<(string SeqLens, string Total, string? Bias)>();
        if (groupQuery)
        {
            // Per slot width r: r - 1 (seqlens_k past the length), r (the total), the bias's head [1,1,r].
            var rowConsts = rowsOf.Distinct().ToDictionary(r => r, r => (Less1: b.ConstInt32([r - 1]), Rows: b.ConstInt32([r]), Head: b.ConstInt64([1, 1, r])));
            string scalar = b.ConstInt64([], dims: [0]);
            string treeBlocks = w == 1 ? "" : b.Node("Slice", ["attention_mask", b.ConstInt64([cap]), b.ConstInt64([cap + w]), b.ConstInt64([3])]);
            for (int s = 0; s < slots; s++)
            {
                int r = rowsOf[s];
                var rc = rowConsts[r];
                string len = b.Node("Slice", [KvLengths, b.ConstInt64([s]), b.ConstInt64([s + 1]), b.ConstInt64([0])]);
                string seqLens = r > 1 ? b.Node("Add", [len, rc.Less1]) : len;
                string? bias = null;
                if (r > 1)
                {
                    // A tree's or a chunk's block: a packed slot's from attention_mask, a mixed graph's chunk the whole
                    // of it, a mixed graph's tree rider its own of rider_mask.
                    string block = !mixed ? Slice(treeBlocks, s, s + 1, 0) : s == 0 ? treeBlocks : Slice(RiderMask, s - 1, s, 0);
                    string zeros = b.Node("ConstantOfShape", [b.Node("Concat", [rc.Head, b.Node("Cast", [len], attrs: GraphBuilder.Int("to", (long)DT.Int64))], attrs: GraphBuilder.Int("axis", 0))]);
                    bias = b.Node("Concat", [zeros, block], attrs: GraphBuilder.Int("axis", 3));
                }

                gqaLengths.Add((seqLens, b.Node("Reshape", [b.Node("Add", [len, rc.Rows]), scalar]), bias));
            }
        }

        for (int i = firstLayer; i < endLayer; i++)
        {
            string p = $"model.layers.{i}.";
            string h = NormResidual(W(p + "input_layernorm.weight", c.HiddenSize));
            string? qb = c.AttentionBias ? W(p + "self_attn.q_proj.bias", c.QDim) : null;
            string? kb = c.AttentionBias ? W(p + "self_attn.k_proj.bias", c.KvDim) : null;
            string? vb = c.AttentionBias ? W(p + "self_attn.v_proj.bias", c.KvDim) : null;
            string q, k, v;
            if (weights == WeightFormat.F32)
            {
                q = ToHeads(Linear(h, p + "self_attn.q_proj.weight", c.QDim, c.HiddenSize, qb), shapeQ);
                k = ToHeads(Linear(h, p + "self_attn.k_proj.weight", c.KvDim, c.HiddenSize, kb), shapeKv);
                v = ToHeads(Linear(h, p + "self_attn.v_proj.weight", c.KvDim, c.HiddenSize, vb), shapeKv);
            }
            else
            {
                // Quantized: q, k and v are one MatMulNBits over the rows stacked (WeightQuantizer.Fuse), split after;
                // one kernel call and one activation quantization instead of three.
                string qkv = Linear(h, p + WeightQuantizer.QkvProj, c.QDim + (2 * c.KvDim), c.HiddenSize);
                if (qb is null)
                {
                    // The stacked rows are heads of one size: [1,n,H+2Hkv,D] goes to [1,H+2Hkv,n,D] at once and splits
                    // by heads, 3 nodes where splitting first and regrouping each part took 7 (120 fewer a step on the twin).
                    var heads = b.NodeMulti("Split", [b.Node("Transpose", [b.Node("Reshape", [qkv, shapeQkv])], attrs: GraphBuilder.Ints("perm", 0, 2, 1, 3)),
                        b.ConstInt64([c.NumHeads, hkv, hkv])], 3, GraphBuilder.Int("axis", 1));
                    (q, k, v) = (heads[0], heads[1], heads[2]);
                }
                else
                {
                    var parts = b.NodeMulti("Split", [qkv, b.ConstInt64([c.QDim, c.KvDim, c.KvDim])], 3, GraphBuilder.Int("axis", -1));
                    q = ToHeads(b.Node("Add", [parts[0], qb]), shapeQ);
                    k = ToHeads(b.Node("Add", [parts[1], kb!]), shapeKv);
                    v = ToHeads(b.Node("Add", [parts[2], vb!]), shapeKv);
                }
            }
            q = Rope(q);
            k = Rope(k);

            string merged;
            if (groupQuery)
            {
                // W rows per slot: [1,H,S*W,D] -> S blocks of [1,W,H*D] (and likewise k, v); each slot's
                // GroupQueryAttention writes its new rows into its own cache in place (from its length on) and
                // reads that cache up to its own length, a tree's rows through the slot's bias.
                // A mixed graph splits [1,n,dim] by each slot's rows instead: [1,W,dim] for the chunk, [1,R,dim] for each rider.
                string[] Rows(string t, int dim) => mixed
                    ? b.NodeMulti("Split", [b.Node("Reshape", [b.Node("Transpose", [t], attrs: GraphBuilder.Ints("perm", 0, 2, 1, 3)), b.ConstInt64([1, n, dim])]), b.ConstInt64([.. rowsOf.Select(r => (long)r)])], slots, GraphBuilder.Int("axis", 1))
                    : b.NodeMulti("Split", [b.Node("Reshape", [b.Node("Transpose", [t], attrs: GraphBuilder.Ints("perm", 0, 2, 1, 3)), b.ConstInt64([slots, w, dim])]), b.ConstInt64([.. Enumerable.Repeat(1L, slots)])], slots, GraphBuilder.Int("axis", 0));
                var (qs, ks, vs) = (Rows(q, c.QDim), Rows(k, c.KvDim), Rows(v, c.KvDim));
                var outs = new string[slots];
                for (int s = 0; s < slots; s++)
                {
                    outs[s] = b.Fresh("gqa_out");
                    var (seqLens, total, bias) = gqaLengths[s];
                    // Inputs after the seventh: cos_cache, sin_cache, position_ids (RoPE is applied above), attention_bias.
                    string[] inputs = bias is null
                        ? [qs[s], ks[s], vs[s], PastKey(i, s, slots), PastValue(i, s, slots), seqLens, total]
                        : [qs[s], ks[s], vs[s], PastKey(i, s, slots), PastValue(i, s, slots), seqLens, total, "", "", "", bias];
                    b.ContribNodeOutputs("GroupQueryAttention", inputs,
                        [outs[s], PresentKey(i, s, slots), PresentValue(i, s, slots)],
                        GraphBuilder.Int("num_heads", c.NumHeads), GraphBuilder.Int("kv_num_heads", hkv), GraphBuilder.Float("scale", (float)(1.0 / Math.Sqrt(d))));
                }

                merged = b.Node("Reshape", [b.Node("Concat", outs, attrs: GraphBuilder.Int("axis", mixed ? 1 : 0)), shapeWQ]);
            }
            else
            {
                // Packed graphs batch the slots: each slot's rows attend only its own cache, and the slots' caches
                // are joined into one [S, Hkv, C, D] batch per layer (a copy of every cache per step, but one
                // attention instead of S: 8% faster at a 256-slot bucket on the 135M twin in float32, 21% in int8;
                // decision 0016). One slot reads its cache in place: nothing is joined or regrouped.
                string Batch(string t, int heads) => slots == 1 ? t : b.Node("Transpose", [b.Node("Reshape", [t, b.ConstInt64([heads, slots, w, d])])], attrs: GraphBuilder.Ints("perm", 1, 0, 2, 3));
                string Join(Func<int, string> past) => slots == 1 ? past(0) : b.Node("Concat", [.. Enumerable.Range(0, slots).Select(past)], attrs: GraphBuilder.Int("axis", 0));
                // The new rows in the cache's format (float16 rounds them), and back in float32 for attention.
                string kS16 = ToKv(Batch(k, hkv)), vS16 = ToKv(Batch(v, hkv));
                for (int s = 0; s < slots; s++)
                {
                    b.Node("Identity", [slots == 1 ? kS16 : Slice(kS16, s, s + 1, 0)], PresentKey(i, s, slots));
                    b.Node("Identity", [slots == 1 ? vS16 : Slice(vS16, s, s + 1, 0)], PresentValue(i, s, slots));
                }

                string kS = ToFloat(kS16);

                // Grouped-query attention: heads h = kv * G + g, so [S,H,W,D] regroups to [S,Hkv,G*W,D] without a copy.
                string qg = b.Node("Mul", [b.Node("Reshape", [Batch(q, c.NumHeads), shapeGrouped]), scale]);
                string sPast = b.Node("MatMul", [qg, b.Node("Transpose", [ToFloat(Join(s => PastKey(i, s, slots)))], attrs: GraphBuilder.Ints("perm", 0, 1, 3, 2))]);
                string sNew = b.Node("MatMul", [qg, b.Node("Transpose", [kS], attrs: GraphBuilder.Ints("perm", 0, 1, 3, 2))]);
                string scores = b.Node("Add", [b.Node("Reshape", [b.Node("Concat", [sPast, sNew], attrs: GraphBuilder.Int("axis", -1)), shapeScores5]), mask5]);
                string att;
                if (float64Attention)
                {
                    // Decision 0025. The scores and their exponentials stay float32: each is computed element by element,
                    // the same numbers whatever the row count or column. The sums are what depend on where a key sits
                    // (the softmax's denominator, the weighted sum of values), so they run in float64, where the products
                    // of float32 numbers are exact and every sum is rounded 2^29 times finer than float32 needs; the
                    // weighted sum is divided by the denominator once per output, and rounded to float32 at the end.
                    string To64(string t) => b.Node("Cast", [t], attrs: GraphBuilder.Int("to", (long)DT.Double));
                    string max = b.Node("ReduceMax", [scores], attrs: [GraphBuilder.Ints("axes", -1), GraphBuilder.Int("keepdims", 1)]);
                    string e = b.Node("Reshape", [To64(b.Node("Exp", [b.Node("Sub", [scores, max])])), shapeScores4]);
                    string sum = b.Node("ReduceSum", [e, axisLast], attrs: GraphBuilder.Int("keepdims", 1));
                    string ePast = b.Node("Slice", [e, sliceStart0, sliceC, axisLast]);
                    string eNew = b.Node("Slice", [e, sliceC, sliceEnd, axisLast]);
                    string weighted = b.Node("Add", [b.Node("MatMul", [ePast, To64(Join(s => PastValue(i, s, slots)))]), b.Node("MatMul", [eNew, To64(vS16)])]);
                    att = b.Node("Cast", [b.Node("Div", [weighted, sum])], attrs: GraphBuilder.Int("to", (long)DT.Float));
                }
                else
                {
                    string probs = b.Node("Reshape", [b.Node("Softmax", [scores], attrs: GraphBuilder.Int("axis", -1)), shapeScores4]);
                    string pPast = b.Node("Slice", [probs, sliceStart0, sliceC, axisLast]);
                    string pNew = b.Node("Slice", [probs, sliceC, sliceEnd, axisLast]);
                    att = b.Node("Add", [b.Node("MatMul", [pPast, ToFloat(Join(s => PastValue(i, s, slots)))]), b.Node("MatMul", [pNew, ToFloat(vS16)])]);
                }

                merged = b.Node("Reshape", [b.Node("Transpose", [b.Node("Reshape", [att, shapeHeads])], attrs: GraphBuilder.Ints("perm", 0, 2, 1, 3)), shapeWQ]);
            }

            pending = Linear(merged, p + "self_attn.o_proj.weight", c.HiddenSize, c.QDim);
            string h2 = NormResidual(W(p + "post_attention_layernorm.weight", c.HiddenSize));
            string gate, up;
            if (weights == WeightFormat.F32)
            {
                gate = Linear(h2, p + "mlp.gate_proj.weight", c.IntermediateSize, c.HiddenSize);
                up = Linear(h2, p + "mlp.up_proj.weight", c.IntermediateSize, c.HiddenSize);
            }
            else
            {
                var gu = b.NodeMulti("Split", [Linear(h2, p + WeightQuantizer.GateUpProj, 2 * c.IntermediateSize, c.HiddenSize), b.ConstInt64([c.IntermediateSize, c.IntermediateSize])], 2, GraphBuilder.Int("axis", -1));
                (gate, up) = (gu[0], gu[1]);
            }
            string act = b.Node("Mul", [b.Node("Mul", [gate, b.Node("Sigmoid", [gate])]), up]);
            pending = Linear(act, p + "mlp.down_proj.weight", c.HiddenSize, c.IntermediateSize);
        }

        if (last)
        {
            string final = NormResidual(W("model.norm.weight", c.HiddenSize));
            string head = hasLmHead ? W("lm_head.weight", c.VocabSize, c.HiddenSize) : embed!;
            string logits = b.Node("Reshape", [b.Node("Gemm", [final, head], attrs: GraphBuilder.Int("transB", 1)), b.ConstInt64([1, n, c.VocabSize])], "logits");
            b.Output("logits", DT.Float, 1, n, c.VocabSize);
            if (topCandidates > 0)
            {
                // Top-K of the logits (not of the probabilities, so ties break as argmax over the logits does),
                // then p = exp(l - max) / sum(exp(l - max)) for the K kept; the max is the first of the K.
                var top = b.NodeMulti("TopK", [logits, b.ConstInt64([topCandidates])], 2, GraphBuilder.Int("axis", -1), GraphBuilder.Int("largest", 1), GraphBuilder.Int("sorted", 1));
                b.Node("Identity", [top[1]], TopIds);
                string max = b.Node("Slice", [top[0], sliceStart0, b.ConstInt64([1]), axisLast]);
                string sum = b.Node("ReduceSum", [b.Node("Exp", [b.Node("Sub", [logits, max])]), axisLast], attrs: GraphBuilder.Int("keepdims", 1));
                b.Node("Div", [b.Node("Exp", [b.Node("Sub", [top[0], max])]), sum], TopProbs);
                b.Output(TopIds, DT.Int64, 1, n, topCandidates);
                b.Output(TopProbs, DT.Float, 1, n, topCandidates);
            }
        }
        else
        {
            if (pending is not null)
            {
                x = b.Node("Add", [x, pending]);
            }

            b.Node("Identity", [x], HiddenOut);
            b.Output(HiddenOut, DT.Float, w, c.HiddenSize);
        }

        for (int i = firstLayer; i < endLayer; i++)
        {
            for (int s = 0; s < slots; s++)
            {
                object rows = groupQuery ? $"cache_s{s}" : w; // in place the present is the whole cache, else the step's rows
                b.OutputDynamic(PresentKey(i, s, slots), kvType, 1, hkv, rows, d);
                b.OutputDynamic(PresentValue(i, s, slots), kvType, 1, hkv, rows, d);
            }
        }

        return b.Build(Opset, new Dictionary<string, string>
        {
            ["coordgen.slots"] = slots.ToString(System.Globalization.CultureInfo.InvariantCulture),
            ["coordgen.mixed"] = mixed ? "true" : "false",
            ["coordgen.rider_width"] = rw.ToString(System.Globalization.CultureInfo.InvariantCulture),
            ["coordgen.width"] = w.ToString(System.Globalization.CultureInfo.InvariantCulture),
            ["coordgen.capacity"] = cap.ToString(System.Globalization.CultureInfo.InvariantCulture),
            ["coordgen.architecture"] = c.Architecture,
        });
    }
}
