using CoordGen.Engine.Model;

namespace CoordGen.Engine.Tests;

/// <summary>
/// A plain, loop-by-loop C# forward pass of a Llama-family decoder over a whole sequence, written from
/// the architecture's definition and used only by tests to check the compiled ONNX graphs.
/// </summary>
internal static class ReferenceForward
{
    /// <summary>Logits [T, V] for the tokens at the given positions, each attending to itself and all earlier tokens.</summary>
    public static float[][] Logits(ModelWeights wts, int[] tokens, int[]? positions = null)
    {
        var c = wts.Config;
        int t = tokens.Length, hd = c.HeadDim, g = c.NumHeads / c.NumKvHeads;
        positions ??= Enumerable.Range(0, t).ToArray();
        var x = new double[t][];
        var emb = wts["model.embed_tokens.weight"].Data;
        for (int i = 0; i < t; i++)
        {
            x[i] = new double[c.HiddenSize];
            for (int j = 0; j < c.HiddenSize; j++)
            {
                x[i][j] = emb[(tokens[i] * c.HiddenSize) + j];
            }
        }

        for (int l = 0; l < c.NumLayers; l++)
        {
            string p = $"model.layers.{l}.";
            var h = x.Select(r => RmsNorm(r, wts[p + "input_layernorm.weight"].Data, c.RmsNormEps)).ToArray();
            var q = h.Select(r => Linear(r, wts[p + "self_attn.q_proj.weight"].Data, c.QDim, Bias(wts, p + "self_attn.q_proj.bias"))).ToArray();
            var k = h.Select(r => Linear(r, wts[p + "self_attn.k_proj.weight"].Data, c.KvDim, Bias(wts, p + "self_attn.k_proj.bias"))).ToArray();
            var v = h.Select(r => Linear(r, wts[p + "self_attn.v_proj.weight"].Data, c.KvDim, Bias(wts, p + "self_attn.v_proj.bias"))).ToArray();
            for (int i = 0; i < t; i++)
            {
                for (int head = 0; head < c.NumHeads; head++)
                {
                    Rotate(q[i], head * hd, hd, positions[i], c.RopeTheta);
                }

                for (int head = 0; head < c.NumKvHeads; head++)
                {
                    Rotate(k[i], head * hd, hd, positions[i], c.RopeTheta);
                }
            }

            var attnOut = new double[t][];
            for (int i = 0; i < t; i++)
            {
                attnOut[i] = new double[c.QDim];
                for (int head = 0; head < c.NumHeads; head++)
                {
                    int kvh = head / g;
                    var scores = new double[i + 1];
                    double max = double.NegativeInfinity;
                    for (int j = 0; j <= i; j++)
                    {
                        double s = 0;
                        for (int d = 0; d < hd; d++)
                        {
                            s += q[i][(head * hd) + d] * k[j][(kvh * hd) + d];
                        }

                        scores[j] = s / Math.Sqrt(hd);
                        max = Math.Max(max, scores[j]);
                    }

                    double sum = 0;
                    for (int j = 0; j <= i; j++)
                    {
                        scores[j] = Math.Exp(scores[j] - max);
                        sum += scores[j];
                    }

                    for (int j = 0; j <= i; j++)
                    {
                        for (int d = 0; d < hd; d++)
                        {
                            attnOut[i][(head * hd) + d] += scores[j] / sum * v[j][(kvh * hd) + d];
                        }
                    }
                }
            }

            for (int i = 0; i < t; i++)
            {
                var o = Linear(attnOut[i], wts[p + "self_attn.o_proj.weight"].Data, c.HiddenSize, null);
                for (int j = 0; j < c.HiddenSize; j++)
                {
                    x[i][j] += o[j];
                }

                var h2 = RmsNorm(x[i], wts[p + "post_attention_layernorm.weight"].Data, c.RmsNormEps);
                var gate = Linear(h2, wts[p + "mlp.gate_proj.weight"].Data, c.IntermediateSize, null);
                var up = Linear(h2, wts[p + "mlp.up_proj.weight"].Data, c.IntermediateSize, null);
                for (int j = 0; j < gate.Length; j++)
                {
                    gate[j] = gate[j] / (1 + Math.Exp(-gate[j])) * up[j];
                }

                var down = Linear(gate, wts[p + "mlp.down_proj.weight"].Data, c.HiddenSize, null);
                for (int j = 0; j < c.HiddenSize; j++)
                {
                    x[i][j] += down[j];
                }
            }
        }

        var head2 = wts[wts.LmHeadName].Data;
        return x.Select(r => Linear(RmsNorm(r, wts["model.norm.weight"].Data, c.RmsNormEps), head2, c.VocabSize, null).Select(d => (float)d).ToArray()).ToArray();
    }

    private static float[]? Bias(ModelWeights w, string name) => w.Contains(name) ? w[name].Data : null;

    private static double[] RmsNorm(double[] x, float[] w, float eps)
    {
        double ms = x.Sum(v => v * v) / x.Length;
        double inv = 1 / Math.Sqrt(ms + eps);
        return x.Select((v, i) => v * inv * w[i]).ToArray();
    }

    private static double[] Linear(double[] x, float[] w, int outDim, float[]? bias)
    {
        var y = new double[outDim];
        int n = x.Length;
        for (int o = 0; o < outDim; o++)
        {
            double s = bias?[o] ?? 0;
            for (int i = 0; i < n; i++)
            {
                s += w[(o * n) + i] * x[i];
            }

            y[o] = s;
        }

        return y;
    }

    // Rotate-half RoPE: pairs (i, i + d/2) rotate by position * theta^(-2i/d).
    private static void Rotate(double[] v, int offset, int hd, int pos, float theta)
    {
        int half = hd / 2;
        for (int i = 0; i < half; i++)
        {
            double freq = pos / Math.Pow(theta, 2.0 * i / hd);
            double cos = Math.Cos(freq), sin = Math.Sin(freq);
            double a = v[offset + i], b = v[offset + half + i];
            v[offset + i] = (a * cos) - (b * sin);
            v[offset + half + i] = (b * cos) + (a * sin);
        }
    }
}
