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
    public int Blocks => K / BlockSize;

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
                for (int i = 0; i < BlockSize; i++)
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
    /// <summary>Inputs per block: 32 divides every K of the catalog shapes and the demo model.</summary>
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

    public static QuantizedTensor Quantize(WeightTensor t, WeightFormat format)
    {
        int bits = Bits(format);
        if (t.Shape.Length != 2)
        {
            throw new ArgumentException($"'{t.Name}' is not a matrix; only linear layers are quantized.");
        }

        int n = checked((int)t.Shape[0]), k = checked((int)t.Shape[1]);
        if (k % BlockSize != 0)
        {
            throw new ArgumentException($"'{t.Name}' has {k} inputs, not a multiple of the quantization block of {BlockSize}; use --weights f32 for this model.");
        }

        int blocks = k / BlockSize, blob = BlockSize * bits / 8, qmax = (1 << (bits - 1)) - 1, zero = 1 << (bits - 1);
        var packed = GC.AllocateUninitializedArray<byte>(n * blocks * blob, pinned: true);
        var scales = GC.AllocateUninitializedArray<float>(n * blocks, pinned: true);
        Parallel.For(0, n, row =>
        {
            var w = t.Data.AsSpan(row * k, k);
            for (int b = 0; b < blocks; b++)
            {
                var block = w.Slice(b * BlockSize, BlockSize);
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
                    int q = Math.Clamp((int)MathF.Round(block[i] / scale, MidpointRounding.ToEven), -qmax, qmax) + zero;
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
