using System.Runtime.InteropServices;
using System.Text.Json;
using CoordGen.Engine.Model;
using CoordGen.Engine.Onnx.Proto;
using Google.Protobuf;
using DT = CoordGen.Engine.Onnx.Proto.TensorProto.Types.DataType;

namespace CoordGen.Engine.Onnx;

/// <summary>
/// Writes a model folder that ONNX Runtime GenAI loads (<c>coordgen model export --format ort-genai</c>):
/// <c>model.onnx</c>, its weights in <c>model.onnx.data</c>, and <c>genai_config.json</c>. Unlike our static
/// graphs, GenAI's default decoder contract has lengths that vary per run: <c>input_ids</c> [1, S],
/// <c>attention_mask</c> int64 [1, T] of ones, <c>position_ids</c> [1, S], <c>past_key_values.i.key/value</c>
/// [1, Hkv, P, D] (P = 0 on the first run), and <c>present.i.key/value</c> [1, Hkv, T, D] = past followed by
/// the new tokens; the graph builds the causal mask itself. The arithmetic is the same as
/// <see cref="LlamaGraphCompiler"/>'s (RMSNorm, rotate-half RoPE, grouped-query attention, SwiGLU), so both
/// engines compute the same logits up to float rounding.
/// </summary>
public static class GenAiExport
{
    public const string GraphFile = "model.onnx";
    public const string DataFile = "model.onnx.data";
    public const string ConfigFile = "genai_config.json";

    /// <param name="stopTokens">Tokens that end generation (GenAI's eos_token_id list): the config's eos ids and the chat template's end token.</param>
    public static void Write(ModelWeights weights, string dir, int contextLength, int threads, IReadOnlySet<int> stopTokens)
    {
        var c = weights.Config;
        Directory.CreateDirectory(dir);
        var offsets = new Dictionary<string, long>(StringComparer.Ordinal);
        using (var data = File.Create(Path.Combine(dir, DataFile)))
        {
            foreach (var t in weights.Tensors.OrderBy(t => t.Name, StringComparer.Ordinal))
            {
                offsets[t.Name] = data.Position;
                data.Write(MemoryMarshal.AsBytes(t.Data.AsSpan()));
                long pad = (64 - (data.Position % 64)) % 64; // aligned, as ONNX Runtime prefers for mapping
                data.Write(new byte[pad]);
            }
        }

        File.WriteAllBytes(Path.Combine(dir, GraphFile), Compile(c, weights.LmHeadName == "lm_head.weight", offsets).ToByteArray());
        File.WriteAllText(Path.Combine(dir, ConfigFile), Config(c, contextLength, threads, stopTokens));
    }

    internal static string Config(ModelConfig c, int contextLength, int threads, IReadOnlySet<int> stopTokens)
    {
        int[] stops = stopTokens.Count > 0 ? [.. stopTokens.Order()] : [.. c.EosTokenIds.DefaultIfEmpty(0)];
        int eos = stops[0];
        var config = new Dictionary<string, object>
        {
            ["model"] = new Dictionary<string, object>
            {
                ["type"] = "llama",
                ["bos_token_id"] = c.BosTokenId ?? 0,
                ["eos_token_id"] = stops,
                ["pad_token_id"] = eos,
                ["vocab_size"] = c.VocabSize,
                ["context_length"] = contextLength,
                ["decoder"] = new Dictionary<string, object>
                {
                    ["filename"] = GraphFile,
                    ["session_options"] = new Dictionary<string, object>
                    {
                        ["log_id"] = "onnxruntime-genai",
                        ["intra_op_num_threads"] = threads,
                        ["inter_op_num_threads"] = 1,
                        ["graph_optimization_level"] = "ORT_ENABLE_ALL",
                        ["provider_options"] = Array.Empty<object>(),
                    },
                    ["head_size"] = c.HeadDim,
                    ["hidden_size"] = c.HiddenSize,
                    ["num_attention_heads"] = c.NumHeads,
                    ["num_hidden_layers"] = c.NumLayers,
                    ["num_key_value_heads"] = c.NumKvHeads,
                    ["inputs"] = new Dictionary<string, string>
                    {
                        ["input_ids"] = "input_ids",
                        ["attention_mask"] = "attention_mask",
                        ["position_ids"] = "position_ids",
                        ["past_key_names"] = "past_key_values.%d.key",
                        ["past_value_names"] = "past_key_values.%d.value",
                    },
                    ["outputs"] = new Dictionary<string, string>
                    {
                        ["logits"] = "logits",
                        ["present_key_names"] = "present.%d.key",
                        ["present_value_names"] = "present.%d.value",
                    },
                },
            },
            ["search"] = new Dictionary<string, object>
            {
                ["do_sample"] = false,
                ["num_beams"] = 1,
                ["max_length"] = contextLength,
                ["top_k"] = 1,
                ["past_present_share_buffer"] = false,
            },
        };
        return JsonSerializer.Serialize(config, new JsonSerializerOptions { WriteIndented = true });
    }

    internal static ModelProto Compile(ModelConfig c, bool hasLmHead, IReadOnlyDictionary<string, long> offsets)
    {
        int d = c.HeadDim, hkv = c.NumKvHeads, g = c.NumHeads / c.NumKvHeads;
        var b = new GraphBuilder("coordgen_ort_genai");
        b.InputDynamic("input_ids", DT.Int64, 1, "sequence_length");
        b.InputDynamic("attention_mask", DT.Int64, 1, "total_sequence_length");
        b.InputDynamic("position_ids", DT.Int64, 1, "sequence_length");
        for (int i = 0; i < c.NumLayers; i++)
        {
            b.InputDynamic($"past_key_values.{i}.key", DT.Float, 1, hkv, "past_sequence_length", d);
            b.InputDynamic($"past_key_values.{i}.value", DT.Float, 1, hkv, "past_sequence_length", d);
        }

        string W(string name) => b.FileWeight(name, ModelWeights.ExpectedTensors(c).First(e => e.Name == name).Shape, DataFile, offsets[name]);

        string embed = W("model.embed_tokens.weight");
        string x = b.Node("Reshape", [b.Node("Gather", [embed, "input_ids"], attrs: GraphBuilder.Int("axis", 0)), b.ConstInt64([-1, c.HiddenSize])]);

        // RoPE tables from the positions: [1, 1, S, D].
        string pos = b.Node("Reshape", [b.Node("Cast", ["position_ids"], attrs: GraphBuilder.Int("to", (long)DT.Float)), b.ConstInt64([-1, 1])]);
        string freqs = b.Node("Mul", [pos, b.ConstFloat(c.RopeInverseFrequencies(), [1, d / 2], "inv_freq")]);
        string emb = b.Node("Reshape", [b.Node("Concat", [freqs, freqs], attrs: GraphBuilder.Int("axis", -1)), b.ConstInt64([1, 1, -1, d])]);
        string cos = b.Node("Cos", [emb]);
        string sin = b.Node("Sin", [emb]);

        // Causal mask [S, T]: key j is visible to the query at position p when j <= p and attention_mask[j] is 1;
        // repeated for the G query heads of a kv group (rows g·S + s), as the scores are laid out.
        string keys = b.Node("Reshape", [b.Node("Cast", [b.Node("Range", [b.ConstInt64([0], []), b.Node("Gather", [b.Node("Shape", ["attention_mask"]), b.ConstInt64([1], [])], attrs: GraphBuilder.Int("axis", 0)), b.ConstInt64([1], [])])],
            attrs: GraphBuilder.Int("to", (long)DT.Float)), b.ConstInt64([1, -1])]);
        string visible = b.Node("And", [b.Node("LessOrEqual", [keys, pos]), b.Node("Cast", ["attention_mask"], attrs: GraphBuilder.Int("to", (long)DT.Bool))]);
        string mask = b.Node("Where", [visible, b.ConstFloat([0f], [], "zero"), b.ConstFloat([LlamaGraphCompiler.MaskedValue], [], "masked")]);
        string maskG = b.Node("Tile", [mask, b.ConstInt64([g, 1])]);

        string eps = b.ConstFloat([c.RmsNormEps], [1], "eps");
        string scale = b.ConstFloat([(float)(1.0 / Math.Sqrt(d))], [1], "scale");
        string halves = b.ConstInt64([d / 2, d / 2], hint: "halves");
        string two = b.ConstFloat([2f], [1], "two");

        string RmsNorm(string input, string weight)
        {
            string ms = b.Node("ReduceMean", [b.Node("Pow", [input, two])], attrs: [GraphBuilder.Ints("axes", -1), GraphBuilder.Int("keepdims", 1)]);
            return b.Node("Mul", [b.Node("Div", [input, b.Node("Sqrt", [b.Node("Add", [ms, eps])])]), weight]);
        }

        string Linear(string input, string weight, string? bias = null)
            => b.Node("Gemm", bias is null ? [input, W(weight)] : [input, W(weight), W(bias)], attrs: GraphBuilder.Int("transB", 1));

        string Rope(string t)
        {
            var parts = b.NodeMulti("Split", [t, halves], 2, GraphBuilder.Int("axis", -1));
            string rotated = b.Node("Concat", [b.Node("Neg", [parts[1]]), parts[0]], attrs: GraphBuilder.Int("axis", -1));
            return b.Node("Add", [b.Node("Mul", [t, cos]), b.Node("Mul", [rotated, sin])]);
        }

        string ToHeads(string t, int heads) => b.Node("Transpose", [b.Node("Reshape", [t, b.ConstInt64([1, -1, heads, d])])], attrs: GraphBuilder.Ints("perm", 0, 2, 1, 3));

        for (int i = 0; i < c.NumLayers; i++)
        {
            string p = $"model.layers.{i}.";
            string h = RmsNorm(x, W(p + "input_layernorm.weight"));
            string q = Rope(ToHeads(Linear(h, p + "self_attn.q_proj.weight", c.AttentionBias ? p + "self_attn.q_proj.bias" : null), c.NumHeads));
            string k = Rope(ToHeads(Linear(h, p + "self_attn.k_proj.weight", c.AttentionBias ? p + "self_attn.k_proj.bias" : null), hkv));
            string v = ToHeads(Linear(h, p + "self_attn.v_proj.weight", c.AttentionBias ? p + "self_attn.v_proj.bias" : null), hkv);
            string presentK = b.Node("Concat", [$"past_key_values.{i}.key", k], $"present.{i}.key", GraphBuilder.Int("axis", 2));
            string presentV = b.Node("Concat", [$"past_key_values.{i}.value", v], $"present.{i}.value", GraphBuilder.Int("axis", 2));

            // Grouped-query attention over past and new keys: [1, Hkv, G·S, D] · [1, Hkv, D, T].
            string qg = b.Node("Mul", [b.Node("Reshape", [q, b.ConstInt64([1, hkv, -1, d])]), scale]);
            string scores = b.Node("Add", [b.Node("MatMul", [qg, b.Node("Transpose", [presentK], attrs: GraphBuilder.Ints("perm", 0, 1, 3, 2))]), maskG]);
            string att = b.Node("MatMul", [b.Node("Softmax", [scores], attrs: GraphBuilder.Int("axis", -1)), presentV]);
            string merged = b.Node("Reshape", [b.Node("Transpose", [b.Node("Reshape", [att, b.ConstInt64([1, c.NumHeads, -1, d])])], attrs: GraphBuilder.Ints("perm", 0, 2, 1, 3)), b.ConstInt64([-1, c.QDim])]);
            x = b.Node("Add", [x, Linear(merged, p + "self_attn.o_proj.weight")]);

            string h2 = RmsNorm(x, W(p + "post_attention_layernorm.weight"));
            string gate = Linear(h2, p + "mlp.gate_proj.weight");
            string up = Linear(h2, p + "mlp.up_proj.weight");
            string act = b.Node("Mul", [b.Node("Mul", [gate, b.Node("Sigmoid", [gate])]), up]);
            x = b.Node("Add", [x, Linear(act, p + "mlp.down_proj.weight")]);
        }

        string final = RmsNorm(x, W("model.norm.weight"));
        string head = hasLmHead ? W("lm_head.weight") : embed;
        b.Node("Reshape", [b.Node("Gemm", [final, head], attrs: GraphBuilder.Int("transB", 1)), b.ConstInt64([1, -1, c.VocabSize])], "logits");
        b.OutputDynamic("logits", DT.Float, 1, "sequence_length", c.VocabSize);
        for (int i = 0; i < c.NumLayers; i++)
        {
            b.OutputDynamic($"present.{i}.key", DT.Float, 1, hkv, "total_sequence_length", d);
            b.OutputDynamic($"present.{i}.value", DT.Float, 1, hkv, "total_sequence_length", d);
        }

        return b.Build(LlamaGraphCompiler.Opset, new Dictionary<string, string> { ["coordgen.export"] = "ort-genai", ["coordgen.architecture"] = c.Architecture });
    }
}
