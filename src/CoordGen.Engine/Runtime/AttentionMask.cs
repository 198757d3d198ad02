using CoordGen.Engine.Onnx;

namespace CoordGen.Engine.Runtime;

/// <summary>
/// Builds the additive attention mask rows [W, C+W] the graphs take: columns 0..C-1 are cache slots,
/// C..C+W-1 the step's own tokens. Padding rows see only themselves, so no row is fully masked.
/// </summary>
public static class AttentionMask
{
    /// <summary>A causal chunk: row j (of <paramref name="valid"/> real rows) sees the cache prefix and rows 0..j.</summary>
    public static void FillLinear(Span<float> mask, int width, int capacity, int cacheLength, int valid)
    {
        FillTree(mask, width, capacity, cacheLength, Parents(valid));
    }

    /// <summary>
    /// A token tree: <paramref name="parents"/>[j] is row j's parent row, or -1 for a child of the last
    /// committed token. Row j sees the cache prefix, its ancestors and itself. Rows past the tree are padding.
    /// </summary>
    public static void FillTree(Span<float> mask, int width, int capacity, int cacheLength, ReadOnlySpan<int> parents)
    {
        int cols = capacity + width;
        if (mask.Length != width * cols)
        {
            throw new ArgumentException($"mask has {mask.Length} entries, expected {width * cols}");
        }

        if (parents.Length > width)
        {
            throw new ArgumentException($"{parents.Length} rows do not fit width {width}");
        }

        mask.Fill(LlamaGraphCompiler.MaskedValue);
        for (int j = 0; j < width; j++)
        {
            var row = mask.Slice(j * cols, cols);
            row[capacity + j] = 0f;
            if (j >= parents.Length)
            {
                continue;
            }

            row[..cacheLength].Clear();
            for (int a = parents[j]; a >= 0; a = parents[a])
            {
                if (a >= j)
                {
                    throw new ArgumentException($"row {j} has parent {a}: parents must precede their children");
                }

                row[capacity + a] = 0f;
            }
        }
    }

    private static int[] Parents(int valid)
    {
        var p = new int[valid];
        for (int i = 0; i < valid; i++)
        {
            p[i] = i - 1;
        }

        return p;
    }
}
