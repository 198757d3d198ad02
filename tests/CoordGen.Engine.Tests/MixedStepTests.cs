using CoordGen.Engine.Generation;
using CoordGen.Engine.Model;
using CoordGen.Engine.Runtime;
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
