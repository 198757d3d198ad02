using CoordGen.Engine.Generation;
using CoordGen.Engine.Model;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Speculative;
using CoordGen.Engine.Workloads;

namespace CoordGen.Engine.Tests;

/// <summary>
/// Mixed runs (decision 0026): a prefill chunk and other sessions' width-1 decode steps in one run of a mixed graph.
/// The prompt's session and every rider must generate what each generates alone.
/// </summary>
public class MixedStepTests
{
    /// <summary>
    /// Starts plain sessions on <paramref name="riding"/> (prefilled alone), then prefills <paramref name="prompt"/>
    /// chunk by chunk with every unfinished one riding in each chunk's run, then decodes all of them (packed).
    /// Returns the riders' outputs, the prompt's output, and how many chunks ran mixed.
    /// </summary>
    private static (List<List<int>> Riders, List<int> Prompt, int MixedChunks) Run(OrtModelRuntime rt, Generator gen, int[][] riding, int[] prompt, int chunk, int max, IReadOnlySet<int> stops)
    {
        var sampling = new SamplingOptions();
        var riders = riding.Select(p =>
        {
            var cache = rt.CreateCache();
            float[] logits = gen.Prefill(cache, p);
            return gen.StartDecode(cache, logits, p.Length, 0, max, sampling, stops);
        }).ToList();
        var cacheP = rt.CreateCache();
        PlainSession? mine = null;
        try
        {
            var pre = gen.BeginPrefill(cacheP, prompt);
            int mixed = 0;
            while (!pre.Done)
            {
                var open = riders.Where(r => !r.Done).ToList();
                bool canMix = open.Count > 0 && rt.CanMix(chunk, cacheP, open.Count);
                pre.Step(chunk, open.Count > 0 ? open : null);
                mixed += canMix ? 1 : 0;
            }

            mine = gen.StartDecode(cacheP, pre.LastLogits, prompt.Length, 0, max, sampling, stops);
            List<PlainSession> all = [.. riders, mine];
            while (PlainSession.StepPacked(all) > 0)
            {
            }

            return ([.. riders.Select(r => r.Output.ToList())], [.. mine.Output], mixed);
        }
        finally
        {
            riders.ForEach(r => r.Dispose());
            if (mine is null)
            {
                cacheP.Dispose();
            }
            else
            {
                mine.Dispose();
            }
        }
    }

    private static List<int> Solo(Generator gen, int[] prompt, int max, IReadOnlySet<int> stops) =>
        [.. gen.Generate(prompt, max, new SamplingOptions(), stops).Tokens];

    [Theory]
    [InlineData(2, 8)]
    [InlineData(1, 16)]
    public void A_chunk_and_its_riders_should_generate_what_each_generates_alone_on_a_random_model(int kvHeads, int chunk)
    {
        var weights = ModelWeights.Random(TestModels.Tiny(kvHeads: kvHeads), seed: 31, scale: 0.3f);
        using var rt = new OrtModelRuntime(weights, capacity: 160, widths: [1, 8, 16]);
        Assert.True(rt.PackedInPlace);
        rt.PrepareMixed(chunk);
        var gen = new Generator(rt);
        var rng = new Random(9);

        // Three riders of different lengths (a 4-slot mixed graph), later two (riders finish at different times);
        // a 45-token prompt: its last chunk is partial and runs padded.
        int[][] riding = [.. new[] { 5, 30, 12 }.Select(n => Enumerable.Range(0, n).Select(_ => rng.Next(2, 50)).ToArray())];
        int[] prompt = [.. Enumerable.Range(0, 45).Select(_ => rng.Next(2, 50))];
        var none = new HashSet<int>();
        var (riders, mine, mixedChunks) = Run(rt, gen, riding, prompt, chunk, 40, none);

        Assert.Equal((45 + chunk - 1) / chunk, mixedChunks);
        for (int i = 0; i < riding.Length; i++)
        {
            Assert.Equal(Solo(gen, riding[i], 40, none), riders[i]);
        }

        Assert.Equal(Solo(gen, prompt, 40, none), mine);
    }

    [Fact]
    public void A_chunk_and_its_riders_should_generate_what_each_generates_alone_on_the_demo_model()
    {
        var demo = ModelBundle.Load(Paths.DemoModel);
        using var rt = new OrtModelRuntime(demo.Weights, capacity: 2048, widths: [1, 32, 64]);
        rt.PrepareMixed(32);
        var gen = new Generator(rt);
        int[] Encode(string task, int i)
        {
            var item = WorkloadItem.Load(Path.Combine(Paths.RepoRoot, "workloads", task + ".jsonl")).ElementAt(i);
            return demo.Tokenizer.Encode(PromptTemplate.Render(item.Context, item.Prompt));
        }

        foreach (var (task, i) in new[] { ("summary", 0), ("rag", 1) })
        {
            int[][] riding = [Encode("reply", i), Encode("ui", i), Encode("summary", i + 2)];
            int[] prompt = Encode(task, i);
            var (riders, mine, mixedChunks) = Run(rt, gen, riding, prompt, 32, 24, demo.StopTokens);
            Assert.True(mixedChunks >= 2, $"only {mixedChunks} chunks ran mixed");
            for (int r = 0; r < riding.Length; r++)
            {
                Assert.Equal(Solo(gen, riding[r], 24, demo.StopTokens), riders[r]);
            }

            Assert.Equal(Solo(gen, prompt, 24, demo.StopTokens), mine);
        }
    }

    [Fact]
    public void Without_GroupQueryAttention_packing_a_chunk_should_run_alone_and_its_riders_still_step()
    {
        // Int8 weights pack by joining caches (decision 0025): no mixed graph, so the chunk runs alone and the riders
        // take their steps in their own packed run; everyone still generates what it generates alone.
        var weights = ModelWeights.Random(TestModels.Tiny(), seed: 32, scale: 0.3f);
        using var rt = new OrtModelRuntime(weights, capacity: 160, widths: [1, 8], new RuntimeOptions { Weights = WeightFormat.Int8 });
        Assert.False(rt.PackedInPlace);
        var gen = new Generator(rt);
        var rng = new Random(4);
        int[][] riding = [.. new[] { 7, 20 }.Select(n => Enumerable.Range(0, n).Select(_ => rng.Next(2, 50)).ToArray())];
        int[] prompt = [.. Enumerable.Range(0, 30).Select(_ => rng.Next(2, 50))];
        var none = new HashSet<int>();
        var (riders, mine, mixedChunks) = Run(rt, gen, riding, prompt, 8, 30, none);
        Assert.Equal(0, mixedChunks);
        for (int i = 0; i < riding.Length; i++)
        {
            Assert.Equal(Solo(gen, riding[i], 30, none), riders[i]);
        }

        Assert.Equal(Solo(gen, prompt, 30, none), mine);
    }

    [Theory]
    [InlineData(true, 8, 32)]
    [InlineData(true, 4, 16)]
    [InlineData(false, 8, 16)]
    [InlineData(false, 4, 8)]
    public void Trees_riding_in_a_chunks_run_should_give_each_session_its_plain_greedy_output(bool demoModel, int treeWidth, int chunk)
    {
        // Decision 0029: speculative sessions' trees in the slots beside a prefill chunk, each verified as after a
        // packed tree run; every session's output and the prompt's own equal plain greedy decoding alone. A random
        // model's near-uniform logits turn any difference in a row's attention (its tree block) into another argmax.
        var demo = ModelBundle.Load(Paths.DemoModel);
        var weights = demoModel ? demo.Weights : ModelWeights.Random(TestModels.Tiny(), seed: 35, scale: 0.3f);
        IReadOnlySet<int> stops = demoModel ? demo.StopTokens : new HashSet<int>();
        using var rt = new OrtModelRuntime(weights, capacity: demoModel ? 2048 : 128, widths: [1, 4, 8, 16, 32]);
        rt.PrepareMixed(chunk, treeWidth);
        var plain = new Generator(rt);
        var spec = new SpeculativeDecoder(rt);
        var opts = SpeculationOptions.ForMethod("sam+ours", treeWidth) with { AdaptiveWidth = false }; // trees (reuse of the last rows' candidates) branch
        var rng = new Random(12);
        int[] Encode(string task, int i)
        {
            if (!demoModel)
            {
                // Two phrases that share their first tokens, in turn, so the suffix automaton drafts trees that branch.
                var phrase = Enumerable.Range(0, 5 + i).Select(_ => rng.Next(2, 50)).ToArray();
                int[] other = [.. phrase.Take(2), .. Enumerable.Range(0, 3 + i).Select(_ => rng.Next(2, 50))];
                return [.. Enumerable.Repeat(phrase.Concat(other), 3).SelectMany(x => x)];
            }

            var item = WorkloadItem.Load(Path.Combine(Paths.RepoRoot, "workloads", task + ".jsonl")).ElementAt(i);
            return demo.Tokenizer.Encode(PromptTemplate.Render(item.Context, item.Prompt));
        }

        int[][] riding = [Encode("summary", 1), Encode("reply", 0), Encode("summary", 3)];
        int[] prompt = demoModel ? Encode("rag", 2) : [.. Enumerable.Range(0, 45).Select(_ => rng.Next(2, 50))];
        var sessions = new List<SpeculativeSession>();
        var drafters = new List<SessionDrafter>();
        foreach (var p in riding)
        {
            using var pre = spec.Prefill(p, null);
            sessions.Add(spec.Start(pre, 40, new SamplingOptions(), stops, opts, externalDrafter: true));
            drafters.Add(new SessionDrafter(p, 40, opts, null));
        }

        void Offer()
        {
            for (int i = 0; i < sessions.Count; i++)
            {
                if (sessions[i].NeedsProposal)
                {
                    var (outcome, committed) = sessions[i].TakeAdvance();
                    sessions[i].Offer(drafters[i].Advance(outcome, committed));
                }
            }
        }

        var cacheP = rt.CreateCache();
        var prefill = plain.BeginPrefill(cacheP, prompt);
        int mixed = 0, branchy = 0;
        while (!prefill.Done)
        {
            Offer();
            var live = sessions.Where(s => !s.Done).ToList();
            List<SpeculativeSession> group = [.. live.Where(s => s.NextTreeWidth >= 2 && s.RoomForTree(treeWidth))];
            if (group.Count > 0)
            {
                mixed += rt.CanMix(chunk, cacheP, group.Count, treeWidth) ? 1 : 0;
                var trees = SpeculativeSession.TakeTrees(group, treeWidth);
                prefill.Step(chunk, trees);
                Assert.NotNull(trees.Results);
                for (int i = 0; i < group.Count; i++)
                {
                    var t = trees.Results[i];
                    branchy += t.Parents.Where((p, j) => p != j - 1).Any() ? 1 : 0; // a node beside an earlier one, not under it
                    group[i].Apply(TreeVerifier.Verify(t, null));
                }
            }
            else
            {
                prefill.Step(chunk);
            }

            foreach (var s in live.Except(group))
            {
                s.Step();
            }
        }

        using var mine = plain.StartDecode(cacheP, prefill.LastLogits, prompt.Length, 0, 40, new SamplingOptions(), stops);
        while (!mine.Done)
        {
            mine.Step();
        }

        while (sessions.Any(s => !s.Done))
        {
            Offer();
            foreach (var s in sessions.Where(s => !s.Done))
            {
                s.Step();
            }
        }

        Assert.True(mixed >= 2, $"only {mixed} chunks carried trees");
        Assert.True(!demoModel || branchy > 0, "no tree that rode branched"); // the random model's drafts are chains
        Assert.Equal(Solo(plain, prompt, 40, stops), mine.Output);
        for (int i = 0; i < sessions.Count; i++)
        {
            Assert.Equal(Solo(plain, riding[i], 40, stops), sessions[i].Result().Tokens);
            sessions[i].Dispose();
        }
    }

    [Theory]
    [InlineData(8, 16)]
    [InlineData(4, 8)]
    public void A_mixed_runs_tree_rows_should_match_the_same_trees_in_a_packed_tree_run(int treeWidth, int chunk)
    {
        // Decision 0029 at the runtime: three branching trees beside a chunk in one mixed run, against the same trees in
        // a packed tree run and the chunk alone, from copies of the same caches. A random model's logits move with any
        // change in what a row attends to (a tree block applied to the wrong rows, or not at all).
        var weights = ModelWeights.Random(TestModels.Tiny(), seed: 36, scale: 0.3f);
        using var rt = new OrtModelRuntime(weights, capacity: 128, widths: [1, 4, 8, 16]);
        rt.PrepareMixed(chunk, treeWidth);
        var gen = new Generator(rt);
        var rng = new Random(5);
        int[] Tokens(int n) => [.. Enumerable.Range(0, n).Select(_ => rng.Next(2, 50))];
        int[] parents = [.. new[] { -1, 0, 0, 1, 3, 2, 4, 5 }.Take(treeWidth)]; // each row's parent row; row 0 the root
        var depth = new int[treeWidth];
        for (int j = 1; j < treeWidth; j++)
        {
            depth[j] = depth[parents[j]] + 1;
        }

        var disposables = new List<KvCache>();
        KvCache Prefilled(int[] prompt)
        {
            var c = rt.CreateCache();
            disposables.Add(c);
            gen.Prefill(c, prompt);
            return c;
        }

        KvCache Copy(KvCache from)
        {
            var c = rt.CreateCache();
            disposables.Add(c);
            c.CopyFrom(from);
            return c;
        }

        try
        {
            List<KvCache> mixedCaches = [.. new[] { 10, 23, 31 }.Select(n => Prefilled(Tokens(n)))];
            List<KvCache> packedCaches = [.. mixedCaches.Select(Copy)];
            var chunkCache = Prefilled(Tokens(12));
            var chunkCopy = Copy(chunkCache);
            int[] chunkTokens = Tokens(chunk);
            int[][] trees = [.. mixedCaches.Select(_ => Tokens(treeWidth))];
            void FillTree(StepBuffers b, KvCache c, int[] tokens)
            {
                for (int j = 0; j < treeWidth; j++)
                {
                    b.TokenIds[j] = tokens[j];
                    b.Positions[j] = c.Length + depth[j];
                }

                AttentionMask.FillTree(b.Mask, treeWidth, b.Capacity, c.Length, parents);
            }

            Assert.True(rt.CanMix(chunk, chunkCache, 3, treeWidth));
            var mixed = rt.MixedBuffers(chunk, chunkCache, mixedCaches, treeWidth);
            mixed[0].SetLinear(chunkTokens, chunkCache.Length, chunkCache.Length);
            for (int i = 0; i < 3; i++)
            {
                FillTree(mixed[i + 1], mixedCaches[i], trees[i]);
            }

            rt.RunMixed(chunk, chunkCache, mixedCaches, treeWidth);
            float[][] mixedLogits = [.. mixed.Select(b => b.Logits.ToArray())];

            var packed = rt.PackedBuffers(treeWidth, packedCaches);
            for (int i = 0; i < 3; i++)
            {
                FillTree(packed[i], packedCaches[i], trees[i]);
            }

            Assert.True(rt.RunPacked(treeWidth, packedCaches));
            var alone = rt.Buffers(chunk, chunkCopy);
            alone.SetLinear(chunkTokens, chunkCopy.Length, chunkCopy.Length);
            rt.Run(chunk, chunkCopy);

            int v = rt.Config.VocabSize;
            void Close(ReadOnlySpan<float> expected, ReadOnlySpan<float> actual, string what)
            {
                float worst = 0;
                for (int k = 0; k < expected.Length; k++)
                {
                    worst = Math.Max(worst, Math.Abs(expected[k] - actual[k]));
                }

                Assert.True(worst < 1e-4f, $"{what}: logits differ by up to {worst}");
            }

            for (int i = 0; i < 3; i++)
            {
                Close(packed[i].Logits.AsSpan(0, treeWidth * v), mixedLogits[i + 1].AsSpan(0, treeWidth * v), $"tree {i}");
            }

            Close(alone.Logits.AsSpan(0, chunk * v), mixedLogits[0].AsSpan(0, chunk * v), "the chunk");
        }
        finally
        {
            disposables.ForEach(c => c.Dispose());
        }
    }

    [Fact]
    public void A_chunk_without_room_for_its_padded_rows_should_not_mix()
    {
        var weights = ModelWeights.Random(TestModels.Tiny(), seed: 33, scale: 0.3f);
        using var rt = new OrtModelRuntime(weights, capacity: 64, widths: [1, 16]);
        rt.PrepareMixed(16);
        using var cache = rt.CreateCache();
        cache.EnsureRoom(64);
        cache.Advance(50);
        Assert.False(rt.CanMix(16, cache, 1)); // 50 + 16 > 64
        using var fresh = rt.CreateCache();
        Assert.True(rt.CanMix(16, fresh, 3));
        Assert.False(rt.CanMix(16, fresh, 16)); // one slot is the chunk's: at most 15 riders
    }
}
