using CoordGen.Messages;
using CoordGen.Engine.Generation;
using CoordGen.Engine.Model;
using CoordGen.Engine.Onnx;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Speculative;

namespace CoordGen.Engine.Tests;

public class GraphCompilerTests
{
    [Theory]
    [InlineData(false, true, 2)]
    [InlineData(true, false, 1)]
    [InlineData(false, true, 4)]
    public void Compiled_graph_should_match_reference_forward_when_prefilling_in_chunks(bool bias, bool tied, int kvHeads)
    {
        var weights = ModelWeights.Random(TestModels.Tiny(bias, tied, kvHeads), seed: 7, scale: 0.2f);
        int[] tokens = [3, 17, 42, 5, 5, 9, 31, 2, 44, 13, 8];
        var expected = ReferenceForward.Logits(weights, tokens);

        using var rt = new OrtModelRuntime(weights, capacity: 32, widths: [1, 4]);
        TestModels.RunChunked(rt, tokens, 4, (pos, logits) => TestModels.AssertClose(expected[pos], logits, what: $"token {pos}"));
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Both_forms_of_rope_and_norms_should_match_the_reference_forward(bool fused)
    {
        var weights = ModelWeights.Random(TestModels.Tiny(bias: true, kvHeads: 2), seed: 11, scale: 0.2f);
        int[] tokens = [3, 17, 42, 5, 5, 9, 31, 2, 44, 13, 8, 27, 1];
        var expected = ReferenceForward.Logits(weights, tokens);

        // Widths 1 and 4, so the steps cover a chunk's rows and single rows at growing positions.
        using var rt = new OrtModelRuntime(weights, capacity: 32, widths: [1, 4], new RuntimeOptions { FusedOps = fused });
        TestModels.RunChunked(rt, tokens, 4, (pos, logits) => TestModels.AssertClose(expected[pos], logits, what: $"token {pos}"));
    }

    [Fact]
    public void Fused_graphs_should_use_the_contrib_kernels_and_fewer_nodes()
    {
        var c = TestModels.Tiny();
        var plain = LlamaGraphCompiler.Compile(c, new GraphShape(1, 32)).Graph.Node;
        var fused = LlamaGraphCompiler.Compile(c, new GraphShape(1, 32), fused: true).Graph.Node;
        Assert.Equal(2 * c.NumLayers, fused.Count(n => n.OpType == "RotaryEmbedding"));
        Assert.Equal(2 * c.NumLayers, fused.Count(n => n.OpType == "SkipSimplifiedLayerNormalization"));
        Assert.DoesNotContain(plain, n => n.OpType is "RotaryEmbedding" or "SkipSimplifiedLayerNormalization");
        Assert.True(fused.Count <= plain.Count - (10 * c.NumLayers), $"fused {fused.Count} nodes, plain {plain.Count}");
    }

    [Fact]
    public void Graphs_should_write_their_outputs_from_the_nodes_that_compute_them_without_identity_nodes()
    {
        // Each layer's present key and value, the top-k ids and the hidden state were Identity nodes, 60 a step on the twin.
        var c = TestModels.Tiny();
        foreach (var shape in new[] { new GraphShape(1, 32), new GraphShape(8, 32) })
        {
            var g = LlamaGraphCompiler.Compile(c, shape, fused: true).Graph;
            Assert.DoesNotContain(g.Node, n => n.OpType == "Identity");
            var produced = g.Node.SelectMany(n => n.Output).ToHashSet();
            Assert.All(g.Output, o => Assert.Contains(o.Name, produced));
        }
    }

    [Fact]
    public void Packed_graphs_should_run_with_the_contrib_kernels_when_their_rows_outnumber_the_capacity()
    {
        // 16 slots of 8-row trees are 128 rows against a capacity of 64: the rotary kernel wants a table row per run row.
        var weights = ModelWeights.Random(TestModels.Tiny(), seed: 13, scale: 0.2f);
        using var rt = new OrtModelRuntime(weights, capacity: 64, widths: [1, 8], new RuntimeOptions { FusedOps = true });
        rt.PreparePacked(64, trees: true);
        Assert.True(rt.PackedReady(16, 8, 64));
    }

    [Fact]
    public void Width_one_steps_should_equal_one_wide_pass_when_fed_the_same_tokens()
    {
        var weights = ModelWeights.Random(TestModels.Tiny(), seed: 3, scale: 0.2f);
        int[] tokens = [4, 8, 15, 16, 23, 42, 7, 1];
        using var rt = new OrtModelRuntime(weights, capacity: 16, widths: [1, 8]);
        using var wide = rt.CreateCache();
        var wb = rt.Buffers(8, wide);
        wb.SetLinear(tokens, 0, 0);
        rt.Run(8, wide);
        var wideLogits = wb.Logits.ToArray();

        using var narrow = rt.CreateCache();
        var gen = new Generator(rt);
        for (int i = 0; i < tokens.Length; i++)
        {
            var row = gen.Step(narrow, tokens[i]);
            TestModels.AssertClose(wideLogits.AsSpan(i * 50, 50).ToArray(), row, what: $"step {i}");
        }
    }

    [Fact]
    public void Top_k_head_should_give_each_rows_argmax_first_and_its_softmax_probabilities()
    {
        var weights = ModelWeights.Random(TestModels.Tiny(), seed: 5, scale: 0.3f);
        int[] tokens = [4, 8, 15, 16, 23, 42, 7, 1];
        using var rt = new OrtModelRuntime(weights, capacity: 16, widths: [1, 8]);
        using var cache = rt.CreateCache();
        var buf = rt.Buffers(8, cache);
        Assert.Equal(LlamaGraphCompiler.TopCandidates, buf.TopK);
        Assert.Equal(0, rt.Buffers(1, cache).TopK); // plain decoding's graph keeps only logits
        buf.SetLinear(tokens, 0, 0);
        rt.Run(8, cache);

        // Where the host scan and the head agree on a row, the head is right; the scan is the reference.
        var scan = new PrefillTopK(buf.TopK);
        scan.AddRows(buf.Logits, buf.VocabSize);
        var fromHead = new PrefillTopK(buf.TopK);
        fromHead.AddChunk(buf, tokens.Length);
        for (int r = 0; r < tokens.Length; r++)
        {
            Assert.Equal(System.Numerics.Tensors.TensorPrimitives.IndexOfMax(buf.LogitsRow(r)), buf.Argmax(r));
            for (int j = 0; j < buf.TopK; j++)
            {
                Assert.Equal(scan.Token(r, j), fromHead.Token(r, j));
                Assert.Equal(scan.Probability(r, j), fromHead.Probability(r, j), 1e-5f);
            }
        }

        // A chunk handed to a calibrator elsewhere carries the same rows.
        var rows = PrefillTopK.RowsOf(buf, tokens.Length, 2);
        var remote = new PrefillTopK(2);
        remote.Add(rows);
        Assert.Equal(tokens.Length, remote.Positions);
        Assert.Equal(scan.Token(3, 1), remote.Token(3, 1));
    }

    [Fact]
    public void Tree_pass_with_ancestor_masks_should_equal_separate_linear_passes_per_branch()
    {
        var weights = ModelWeights.Random(TestModels.Tiny(), seed: 11, scale: 0.2f);
        int[] prefix = [5, 6, 7];
        // Tree after the prefix: root children a=10 (row 0) and b=20 (row 1); a has children 11 (row 2) and 12 (row 3); 12 has child 13 (row 4).
        int[] treeTokens = [10, 20, 11, 12, 13];
        int[] parents = [-1, -1, 0, 0, 3];
        int[][] branches = [[10, 11], [10, 12, 13], [20]];
        int[][] branchRows = [[0, 2], [0, 3, 4], [1]];

        using var rt = new OrtModelRuntime(weights, capacity: 16, widths: [8]);
        using var cache = rt.CreateCache();
        var buf = rt.Buffers(8, cache);
        buf.SetLinear(prefix, 0, 0);
        rt.Run(8, cache);
        cache.Commit(buf.NewKeys, buf.NewValues, 8, [0, 1, 2]);

        for (int j = 0; j < 8; j++)
        {
            buf.TokenIds[j] = j < treeTokens.Length ? treeTokens[j] : 0;
            int depth = 0;
            for (int a = j < parents.Length ? parents[j] : -1; a >= 0; a = parents[a])
            {
                depth++;
            }

            buf.Positions[j] = prefix.Length + depth;
        }

        AttentionMask.FillTree(buf.Mask, 8, 16, cache.Length, parents);
        rt.Run(8, cache);
        var treeLogits = buf.Logits.ToArray();

        for (int b = 0; b < branches.Length; b++)
        {
            var expected = ReferenceForward.Logits(weights, [.. prefix, .. branches[b]]);
            for (int i = 0; i < branches[b].Length; i++)
            {
                TestModels.AssertClose(expected[prefix.Length + i], treeLogits.AsSpan(branchRows[b][i] * 50, 50), what: $"branch {b} token {i}");
            }
        }
    }
}

public class CapacityBucketTests
{
    [Theory]
    [InlineData(2048, 4, new[] { 256, 512, 768, 1024, 1280, 1536, 1792, 2048 })]
    [InlineData(2048, 1, new[] { 256, 512, 1024, 2048 })]
    [InlineData(4096, 2, new[] { 256, 512, 768, 1024, 1536, 2048, 3072, 4096 })]
    [InlineData(3000, 4, new[] { 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2560, 3000 })]
    [InlineData(600, 4, new[] { 256, 512, 600 })]
    [InlineData(100, 4, new[] { 100 })]
    public void Buckets_should_split_each_doubling_evenly_and_end_at_the_capacity(int capacity, int perOctave, int[] expected) =>
        Assert.Equal(expected, OrtModelRuntime.CapacityBuckets(capacity, perOctave));

    [Fact]
    public void Logits_should_match_the_reference_when_the_cache_grows_across_capacity_buckets()
    {
        var weights = ModelWeights.Random(TestModels.Tiny(), seed: 21, scale: 0.2f);
        using var rt = new OrtModelRuntime(weights, capacity: 600, widths: [1, 64]);
        Assert.Equal([256, 512, 600], rt.Buckets);
        var rng = new Random(3);
        int[] prompt = Enumerable.Range(0, 250).Select(_ => rng.Next(50)).ToArray();
        var gen = new Generator(rt);
        using var cache = rt.CreateCache();
        var logits = gen.Prefill(cache, prompt);
        var seq = prompt.ToList();
        for (int i = 0; i < 12; i++)
        {
            int t = Sampler.Argmax(logits);
            seq.Add(t);
            logits = gen.Step(cache, t).ToArray();
        }

        Assert.Equal(512, cache.Bucket);
        var expected = ReferenceForward.Logits(weights, [.. seq]);
        TestModels.AssertClose(expected[^1], logits, what: "last position after crossing a bucket");
    }
}
