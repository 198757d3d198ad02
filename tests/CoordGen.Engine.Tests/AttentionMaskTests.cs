using CoordGen.Engine.Runtime;

namespace CoordGen.Engine.Tests;

public class AttentionMaskTests
{
    private static bool[,] Visible(float[] mask, int width, int cols)
    {
        var v = new bool[width, cols];
        for (int r = 0; r < width; r++)
        {
            for (int c = 0; c < cols; c++)
            {
                v[r, c] = mask[(r * cols) + c] == 0f;
            }
        }

        return v;
    }

    [Fact]
    public void Linear_mask_should_show_the_cache_prefix_and_earlier_rows_when_the_chunk_is_partial()
    {
        const int w = 4, cap = 6;
        var mask = new float[w * (cap + w)];
        AttentionMask.FillLinear(mask, w, cap, cacheLength: 2, valid: 3);
        var v = Visible(mask, w, cap + w);
        // Row 0: slots 0,1 and itself; row 2: slots 0,1 and rows 0..2; row 3 is padding: only itself.
        Assert.True(v[0, 0] && v[0, 1] && !v[0, 2] && v[0, cap] && !v[0, cap + 1]);
        Assert.True(v[2, 0] && v[2, 1] && v[2, cap] && v[2, cap + 1] && v[2, cap + 2] && !v[2, cap + 3]);
        Assert.True(!v[3, 0] && !v[3, cap] && v[3, cap + 3]);
    }

    [Fact]
    public void Tree_mask_should_show_each_node_its_ancestors_and_itself_only()
    {
        const int w = 5, cap = 3;
        int[] parents = [-1, -1, 0, 2];
        var mask = new float[w * (cap + w)];
        AttentionMask.FillTree(mask, w, cap, cacheLength: 3, parents);
        var v = Visible(mask, w, cap + w);
        Assert.True(v[3, cap + 0] && v[3, cap + 2] && v[3, cap + 3] && !v[3, cap + 1]);
        Assert.True(v[1, cap + 1] && !v[1, cap + 0]);
        Assert.True(v[3, 0] && v[3, 2]);
        Assert.True(!v[4, 0] && v[4, cap + 4]);
    }

    [Fact]
    public void Tree_mask_should_reject_a_parent_after_its_child()
    {
        var mask = new float[3 * 5];
        Assert.Throws<ArgumentException>(() => AttentionMask.FillTree(mask, 3, 2, 0, [1, -1]));
    }
}
