namespace CoordGen.Engine.Model;

/// <summary>How the runtime holds the linear layers' weights (docs/decisions/0012-quantized-weights.md).</summary>
public enum WeightFormat
{
    /// <summary>Float32, as loaded: every graph reads 4 bytes per weight.</summary>
    F32,

    /// <summary>8-bit symmetric integers per block of <see cref="WeightQuantizer.BlockSize"/> along the input dimension, one float scale per block.</summary>
    Int8,

    /// <summary>4-bit symmetric integers per block, one float scale per block.</summary>
    Int4,
}

/// <summary>One linear layer's weight [N, K] quantized for ONNX Runtime's <c>com.microsoft.MatMulNBits</c>.</summary>
/// <param name="Packed">[N, K/block, block·bits/8] unsigned codes (4-bit: two per byte, the even element in the low nibble), zero point 2^(bits-1).</param>
/// <param name="Scales">[N · K/block] float scales, row-major by output row then block.</param>
public sealed record QuantizedTensor(string Name, int N, int K, int Bits, int BlockSize, byte[] Packed, float[] Scales)
{
    /// <summary>Blocks per row; the last one is padded with zero codes when K is not a multiple of the block.</summary>
    public int Blocks => (K + BlockSize - 1) / BlockSize;

    public long Bytes => Packed.LongLength + (Scales.LongLength * sizeof(float));

    /// <summary>The float weight the codes stand for (tests and quality reports).</summary>
    public float[] Dequantize()
    {
        var w = new float[(long)N * K];
        int zero = 1 << (Bits - 1), blob = BlockSize * Bits / 8;
        for (int n = 0; n < N; n++)
        {
            for (int b = 0; b < Blocks; b++)
            {
                float s = Scales[(n * Blocks) + b];
                int baseByte = ((n * Blocks) + b) * blob;
                for (int i = 0; i < Math.Min(BlockSize, K - (b * BlockSize)); i++)
                {
                    int code = Bits == 8 ? Packed[baseByte + i] : (Packed[baseByte + (i / 2)] >> ((i % 2) * 4)) & 0xF;
                    w[((long)n * K) + (b * BlockSize) + i] = (code - zero) * s;
                }
            }
        }

        return w;
    }
}

/// <summary>
/// Symmetric per-block quantization of row-major [N, K] weights, in C# at load time (no second copy on
/// disk): each block of <see cref="BlockSize"/> inputs of an output row gets scale max|w| / (2^(bits-1) - 1),
/// codes round(w / scale) stored with zero point 2^(bits-1), the layout MatMulNBits reads.
/// </summary>
public static class WeightQuantizer
{
    /// <summary>Inputs per block: 32 is what the QNN HTP accepts for 4-bit MatMulNBits (32 or 64), and on this CPU 32, 64 and 128 ran within noise of each other (decision 0012).</summary>
    public const int BlockSize = 32;

    public static int Bits(WeightFormat f) => f switch
    {
        WeightFormat.Int8 => 8,
        WeightFormat.Int4 => 4,
        _ => throw new ArgumentException($"{f} is not a quantized format."),
    };

    /// <summary>Parses f32|int8|int4 (case-insensitive), or throws naming the choices.</summary>
    public static WeightFormat Parse(string text) => text.Trim().ToLowerInvariant() switch
    {
        "f32" or "fp32" or "float32" => WeightFormat.F32,
        "int8" or "q8" => WeightFormat.Int8,
        "int4" or "q4" => WeightFormat.Int4,
        _ => throw new ArgumentException($"unknown weight format '{text}'; choose f32, int8 or int4."),
    };

    public static string Name(WeightFormat f) => f.ToString().ToLowerInvariant();

    /// <summary>Weights of a linear layer ([out, in]) that the compiler turns into MatMulNBits when quantizing.</summary>
    public static bool IsLinear(string name) => name.StartsWith("model.layers.", StringComparison.Ordinal)
        && name.EndsWith("_proj.weight", StringComparison.Ordinal);

    /// <summary>A layer's q, k and v rows stacked ([QDim + 2·KvDim, hidden]), under the layer's prefix.</summary>
    public const string QkvProj = "self_attn.qkv_proj.weight";

    /// <summary>A layer's gate and up rows stacked ([2·intermediate, hidden]), under the layer's prefix.</summary>
    public const string GateUpProj = "mlp.gate_up_proj.weight";

    /// <summary>
    /// The linear layers as the quantized graphs multiply them: q/k/v and gate/up stacked (one kernel call each,
    /// one activation quantization), o_proj and down_proj as they are. Stacked tensors are temporary float copies,
    /// one layer at a time.
    /// </summary>
    public static IEnumerable<WeightTensor> QuantizedLinears(ModelWeights w)
    {
        var c = w.Config;
        for (int l = 0; l < c.NumLayers; l++)
        {
            string p = $"model.layers.{l}.";
            yield return Stack(p + QkvProj, w[p + "self_attn.q_proj.weight"], w[p + "self_attn.k_proj.weight"], w[p + "self_attn.v_proj.weight"]);
            yield return w[p + "self_attn.o_proj.weight"];
            yield return Stack(p + GateUpProj, w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]);
            yield return w[p + "mlp.down_proj.weight"];
        }
    }

    private static WeightTensor Stack(string name, params WeightTensor[] parts)
    {
        long cols = parts[0].Shape[1];
        var data = new float[parts.Sum(t => t.Data.LongLength)];
        long at = 0;
        foreach (var t in parts)
        {
            Array.Copy(t.Data, 0, data, at, t.Data.LongLength);
            at += t.Data.LongLength;
        }

        return new WeightTensor(name, [parts.Sum(t => t.Shape[0]), cols], data);
    }

    public static QuantizedTensor Quantize(WeightTensor t, WeightFormat format)
    {
        int bits = Bits(format);
        if (t.Shape.Length != 2)
        {
            throw new ArgumentException($"'{t.Name}' is not a matrix; only linear layers are quantized.");
        }

        int n = checked((int)t.Shape[0]), k = checked((int)t.Shape[1]);
        int blocks = (k + BlockSize - 1) / BlockSize, blob = BlockSize * bits / 8, qmax = (1 << (bits - 1)) - 1, zero = 1 << (bits - 1);
        var packed = GC.AllocateUninitializedArray<byte>(n * blocks * blob, pinned: true);
        var scales = GC.AllocateUninitializedArray<float>(n * blocks, pinned: true);
        Parallel.For(0, n, row =>
        {
            var w = t.Data.AsSpan(row * k, k);
            for (int b = 0; b < blocks; b++)
            {
                var block = w.Slice(b * BlockSize, Math.Min(BlockSize, k - (b * BlockSize)));
                float max = System.Numerics.Tensors.TensorPrimitives.MaxMagnitude(block);
                float scale = max == 0 ? 1f : Math.Abs(max) / qmax;
                scales[(row * blocks) + b] = scale;
                int baseByte = ((row * blocks) + b) * blob;
                if (bits == 4)
                {
                    packed.AsSpan(baseByte, blob).Clear();
                }

                for (int i = 0; i < BlockSize; i++)
                {
                    // Padding past K holds the zero point (value 0).
                    int q = (i < block.Length ? Math.Clamp((int)MathF.Round(block[i] / scale, MidpointRounding.ToEven), -qmax, qmax) : 0) + zero;
                    if (bits == 8)
                    {
                        packed[baseByte + i] = (byte)q;
                    }
                    else
                    {
                        packed[baseByte + (i / 2)] |= (byte)(q << ((i % 2) * 4));
                    }
                }
            }
        });
        return new QuantizedTensor(t.Name, n, k, bits, BlockSize, packed, scales);
    }
}
