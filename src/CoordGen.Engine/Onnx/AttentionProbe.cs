using CoordGen.Engine.Onnx.Proto;
using Google.Protobuf;
using DT = CoordGen.Engine.Onnx.Proto.TensorProto.Types.DataType;

namespace CoordGen.Engine.Onnx;

/// <summary>
/// Attention alone, in two forms, for <c>coordgen bench attention</c>: the model's attention layers with
/// nothing else, to price a KV layout before building it (issue 19's KV slot pool).
/// <list type="bullet">
/// <item><see cref="Joined"/>: what <see cref="LlamaGraphCompiler"/> builds today. Each slot's cache is
/// its own input [1, Hkv, C, D]; a packed graph joins them per layer, scores every row against the whole
/// capacity C (masked) and against the step's own columns, one softmax.</item>
/// <item><see cref="GroupQuery"/>: ONNX Runtime's <c>com.microsoft.GroupQueryAttention</c> over one
/// buffer per layer [S, Hkv, C, D] that is both past and present (the caller binds the same memory to
/// both): the step's keys and values are written in place at each slot's length, and each slot attends
/// over its own length only (<c>seqlens_k</c>), not the capacity. An optional additive bias
/// [S, 1, W, T] (T the total length, so its shape changes per step) carries a tree mask.</item>
/// </list>
/// Both chain the layers: a layer's output is the next layer's query.
/// </summary>
public static class AttentionProbe
{
    /// <summary>Today's form. Inputs: <c>q</c> [S, Hkv, G·W, D], <c>k</c>/<c>v</c> [S, Hkv, W, D], <c>mask</c> [S, 1, G·W, C + W], and per layer l and slot s <c>pk{l}_{s}</c>/<c>pv{l}_{s}</c> [1, Hkv, C, D]; output <c>out</c> like <c>q</c>.</summary>
    public static byte[] Joined(int layers, int slots, int width, int capacity, int heads, int kvHeads, int headDim)
    {
        int g = heads / kvHeads;
        var b = new GraphBuilder("attention_joined");
        b.Input("q", DT.Float, slots, kvHeads, g * width, headDim);
        b.Input("k", DT.Float, slots, kvHeads, width, headDim);
        b.Input("v", DT.Float, slots, kvHeads, width, headDim);
        b.Input("mask", DT.Float, slots, 1, g * width, capacity + width);
        string s0 = b.ConstInt64([0]), sc = b.ConstInt64([capacity]), se = b.ConstInt64([capacity + width]), axis = b.ConstInt64([-1]);
        string x = "q";
        for (int l = 0; l < layers; l++)
        {
            for (int s = 0; s < slots; s++)
            {
                b.Input($"pk{l}_{s}", DT.Float, 1, kvHeads, capacity, headDim);
                b.Input($"pv{l}_{s}", DT.Float, 1, kvHeads, capacity, headDim);
            }

            int layer = l;
            string Join(string p) => slots == 1 ? $"{p}{layer}_0" : b.Node("Concat", [.. Enumerable.Range(0, slots).Select(s => $"{p}{layer}_{s}")], attrs: GraphBuilder.Int("axis", 0));
            string sPast = b.Node("MatMul", [x, b.Node("Transpose", [Join("pk")], attrs: GraphBuilder.Ints("perm", 0, 1, 3, 2))]);
            string sNew = b.Node("MatMul", [x, b.Node("Transpose", ["k"], attrs: GraphBuilder.Ints("perm", 0, 1, 3, 2))]);
            string probs = b.Node("Softmax", [b.Node("Add", [b.Node("Concat", [sPast, sNew], attrs: GraphBuilder.Int("axis", -1)), "mask"])], attrs: GraphBuilder.Int("axis", -1));
            string pPast = b.Node("Slice", [probs, s0, sc, axis]);
            string pNew = b.Node("Slice", [probs, sc, se, axis]);
            x = b.Node("Add", [b.Node("MatMul", [pPast, Join("pv")]), b.Node("MatMul", [pNew, "v"])], l == layers - 1 ? "out" : null);
        }

        b.Output("out", DT.Float, slots, kvHeads, g * width, headDim);
        return b.Build(LlamaGraphCompiler.Opset, new Dictionary<string, string>()).ToByteArray();
    }

    /// <summary>
    /// The GroupQueryAttention form. Inputs: <c>q</c> [S, W, H·D], <c>k</c>/<c>v</c> [S, W, Hkv·D],
    /// <c>seqlens_k</c> [S] (each slot's length after the step, less one), <c>total_len</c> (a scalar),
    /// per layer <c>pk{l}</c>/<c>pv{l}</c> [S, Hkv, C, D], and with <paramref name="bias"/> <c>bias</c> [S, 1, W, T];
    /// outputs <c>out</c> [S, W, H·D] and per layer <c>prk{l}</c>/<c>prv{l}</c> (bind them to the past buffers).
    /// </summary>
    public static byte[] GroupQuery(int layers, int slots, int width, int capacity, int heads, int kvHeads, int headDim, bool bias = false)
    {
        var b = new GraphBuilder("attention_gqa");
        b.Input("q", DT.Float, slots, width, heads * headDim);
        b.Input("k", DT.Float, slots, width, kvHeads * headDim);
        b.Input("v", DT.Float, slots, width, kvHeads * headDim);
        b.Input("seqlens_k", DT.Int32, slots);
        b.Input("total_len", DT.Int32);
        if (bias)
        {
            b.InputDynamic("bias", DT.Float, slots, 1, width, "total");
        }

        string x = "q";
        for (int l = 0; l < layers; l++)
        {
            b.Input($"pk{l}", DT.Float, slots, kvHeads, capacity, headDim);
            b.Input($"pv{l}", DT.Float, slots, kvHeads, capacity, headDim);

            // Inputs after the seventh: cos_cache, sin_cache, position_ids (RoPE is applied before, as in our graphs), attention_bias.
            string[] inputs = bias ? [x, "k", "v", $"pk{l}", $"pv{l}", "seqlens_k", "total_len", "", "", "", "bias"] : [x, "k", "v", $"pk{l}", $"pv{l}", "seqlens_k", "total_len"];
            string o = l == layers - 1 ? "out" : $"a{l}";
            b.ContribNodeOutputs("GroupQueryAttention", inputs, [o, $"prk{l}", $"prv{l}"], GraphBuilder.Int("num_heads", heads), GraphBuilder.Int("kv_num_heads", kvHeads));
            b.Output($"prk{l}", DT.Float, slots, kvHeads, capacity, headDim);
            b.Output($"prv{l}", DT.Float, slots, kvHeads, capacity, headDim);
            x = o;
        }

        b.Output("out", DT.Float, slots, width, heads * headDim);
        return b.Build(LlamaGraphCompiler.Opset, new Dictionary<string, string>()).ToByteArray();
    }
}
