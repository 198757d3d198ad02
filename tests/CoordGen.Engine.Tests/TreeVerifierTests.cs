using CoordGen.Messages;
using CoordGen.Engine.Generation;
using CoordGen.Engine.Model;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Speculative;

namespace CoordGen.Engine.Tests;

/// <summary>Acceptance detached from the device step: <see cref="TreeVerifier"/>, staged KV rows, and a session stepped in halves.</summary>
public class TreeVerifierTests
{
    // Tree: node 0 = 7 (root child), node 1 = 9 (child of 0), node 2 = 4 (root child), node 3 = 5 (child of 2).
    private static readonly int[] Tokens = [7, 9, 4, 5];
    private static readonly int[] Parents = [-1, 0, -1, 2];

    [Theory]
    [InlineData(new[] { 7, 9, 3, 0, 0 }, new[] { 7, 9, 3 }, new[] { 0, 1, 2 })] // main chain fully accepted
    [InlineData(new[] { 4, 0, 0, 5, 6 }, new[] { 4, 5, 6 }, new[] { 0, 3, 4 })] // the branch wins
    [InlineData(new[] { 7, 2, 0, 0, 0 }, new[] { 7, 2 }, new[] { 0, 1 })] // rejected after one
    [InlineData(new[] { 8, 9, 0, 5, 0 }, new[] { 8 }, new[] { 0 })] // nothing accepted: the model's own token
    public void Greedy_acceptance_should_follow_the_models_argmax_through_the_tree(int[] argmax, int[] emitted, int[] rows)
    {
        var verdict = TreeVerifier.Verify(new TreeToVerify(3, Tokens, Parents, argmax, default, 16, 0), null);
        Assert.Equal(3, verdict.Step);
        Assert.Equal(emitted, verdict.Emitted);
        Assert.Equal(rows, verdict.Rows);
        Assert.Equal(emitted.Length - 1, verdict.Accepted);
    }

    [Fact]
    public void Sampling_without_the_rows_logits_should_be_refused_with_what_is_missing()
    {
        var sampler = new Sampler(new SamplingOptions { Temperature = 0.8f, Seed = 1 });
        var ex = Assert.Throws<ArgumentException>(() => TreeVerifier.Verify(new TreeToVerify(1, Tokens, Parents, [7, 9, 3, 0, 0], default, 16, 0), sampler));
        Assert.Contains("every row's logits", ex.Message);
    }

    [Fact]
    public void Sampling_should_draw_once_per_emitted_token_from_each_rows_distribution()
    {
        // Row 0 puts all mass on 7, row 1 on 9, row 2 on 11: the walk takes 7, 9, then draws 11 at row 2.
        const int vocab = 16;
        var logits = new float[5 * vocab];
        Array.Fill(logits, -1e9f);
        logits[(0 * vocab) + 7] = 0;
        logits[(1 * vocab) + 9] = 0;
        logits[(2 * vocab) + 11] = 0;
        var sampler = new Sampler(new SamplingOptions { Temperature = 1f, Seed = 5, Offset = 2 });
        var verdict = TreeVerifier.Verify(new TreeToVerify(1, Tokens, Parents, [0, 0, 0, 0, 0], logits, vocab, 2), sampler);
        Assert.Equal([7, 9, 11], verdict.Emitted);
        Assert.Equal(5, verdict.Draws);
    }

    [Fact]
    public void Keep_should_move_the_accepted_staged_rows_into_consecutive_slots()
    {
        using var cache = new KvCache(layers: 2, kvHeads: 2, headDim: 4, buckets: [16]);
        const int width = 4;
        float[][] Rows(float offset) => [.. Enumerable.Range(0, 2).Select(l => Enumerable.Range(0, 2 * width * 4).Select(i => offset + (l * 1000) + i).ToArray())];
        var keys = Rows(0);
        var values = Rows(0.5f);
        cache.Commit(keys, values, width, [0]); // one committed slot: the staged rows start at slot 1
        cache.WriteLayers(0, 2, keys, values, width, width, cache.Length);
        Assert.Equal(1, cache.Length);

        cache.Keep([0, 2, 3]);
        Assert.Equal(4, cache.Length);
        // Same slots as committing the path directly.
        using var direct = new KvCache(2, 2, 4, [16]);
        direct.Commit(keys, values, width, [0]);
        direct.Commit(keys, values, width, [0, 2, 3]);
        Assert.Equal(Snapshot(direct), Snapshot(cache));
        Assert.Throws<ArgumentException>(() => cache.Keep([1, 0]));
    }

    private static float[] Snapshot(KvCache c)
    {
        var all = new List<float>();
        for (int l = 0; l < c.Layers; l++)
        {
            var k = c.KeyValue(l).GetTensorDataAsSpan<float>();
            var v = c.ValueValue(l).GetTensorDataAsSpan<float>();
            for (int h = 0; h < c.KvHeads; h++)
            {
                all.AddRange(k.Slice(h * c.Bucket * c.HeadDim, c.Length * c.HeadDim).ToArray());
                all.AddRange(v.Slice(h * c.Bucket * c.HeadDim, c.Length * c.HeadDim).ToArray());
            }
        }

        return [.. all];
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void A_session_stepped_in_halves_should_generate_what_whole_steps_do(bool greedy)
    {
        var weights = ModelWeights.Random(TestModels.Tiny(), seed: 21, scale: 0.25f);
        using var rt = new OrtModelRuntime(weights, capacity: 96, widths: [1, 8]);
        var spec = new SpeculativeDecoder(rt);
        int[] prompt = [.. Enumerable.Repeat(new[] { 5, 9, 14, 3 }, 4).SelectMany(p => p), 7, 5, 9];
        var opts = SpeculationOptions.ForMethod("sam+ours", 8);
        var sampling = greedy ? new SamplingOptions() : new SamplingOptions { Temperature = 0.9f, Seed = 3 };
        var whole = spec.Generate(prompt, 24, sampling, new HashSet<int>(), opts).Tokens;

        using var pre = spec.Prefill(prompt, opts.Calibration);
        using var session = spec.Start(pre, 24, sampling, new HashSet<int>(), opts);
        // The verifier's own stream, as the verifier actor keeps it: positioned where the session's is.
        Sampler? stream = null;
        while (session.BeginStep(ownRows: true) is { } tree)
        {
            Assert.Throws<InvalidOperationException>(() => session.BeginStep());
            Assert.Throws<InvalidOperationException>(() => session.Apply(new TreeVerdict(tree.Step + 1, [1], [0], tree.Draws)));
            stream ??= greedy ? null : new Sampler(sampling with { Offset = (int)tree.Draws });
            session.Apply(TreeVerifier.Verify(tree, stream));
        }

        Assert.Equal(whole, session.Output);
    }
}
