using CoordGen.Engine.Generation;
using CoordGen.Engine.Model;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Workloads;

namespace CoordGen.Engine.Tests;

/// <summary>Packed device steps (issue 19): several sessions' rows in one run, each against its own cache, token-identical to running alone.</summary>
public class PackedStepTests
{
    private static List<int> Solo(Generator gen, int[] prompt, int max, SamplingOptions sampling, IReadOnlySet<int> stops) =>
        [.. gen.Generate(prompt, max, sampling, stops).Tokens];

    private static List<List<int>> Packed(OrtModelRuntime rt, Generator gen, int[][] prompts, int max, SamplingOptions sampling, IReadOnlySet<int> stops)
    {
        var sessions = prompts.Select(p =>
        {
            var cache = rt.CreateCache();
            float[] logits = gen.Prefill(cache, p);
            return gen.StartDecode(cache, logits, p.Length, 0, max, sampling, stops);
        }).ToList();
        try
        {
            while (PlainSession.StepPacked(sessions) > 0)
            {
            }

            return [.. sessions.Select(s => s.Output.ToList())];
        }
        finally
        {
            sessions.ForEach(s => s.Dispose());
        }
    }

    [Theory]
    [InlineData(false, 2, 0f, true)]
    [InlineData(true, 1, 0f, true)]
    [InlineData(false, 2, 0.9f, true)]
    [InlineData(false, 2, 0f, false)]
    [InlineData(false, 2, 0.9f, false)]
    public void Packed_sessions_should_generate_what_each_generates_alone_on_random_models(bool bias, int kvHeads, float temperature, bool groupQuery)
    {
        // groupQuery: GroupQueryAttention over each cache in place (the default on the CPU), idle slots writing into
        // the runtime's idle cache; false: the caches joined per layer and the rows committed after the run.
        var weights = ModelWeights.Random(TestModels.Tiny(bias: bias, tied: !bias, kvHeads: kvHeads), seed: 21, scale: 0.3f);
        using var rt = new OrtModelRuntime(weights, capacity: 96, widths: [1, 8], new RuntimeOptions { PackedGroupQuery = groupQuery });
        Assert.Equal(groupQuery, rt.PackedInPlace);
        var gen = new Generator(rt);
        var rng = new Random(5);
        // Five sessions (a 8-slot graph with 3 idle slots), prompts of different lengths so the caches sit in
        // different buckets until the packed step moves them together; one runs past a bucket boundary.
        int[][] prompts = [.. new[] { 3, 17, 40, 9, 60 }.Select(n => Enumerable.Range(0, n).Select(_ => rng.Next(2, 50)).ToArray())];
        var sampling = new SamplingOptions { Temperature = temperature, Seed = 3 };
        var none = new HashSet<int>();
        var packed = Packed(rt, gen, prompts, 30, sampling, none);
        for (int i = 0; i < prompts.Length; i++)
        {
            Assert.Equal(Solo(gen, prompts[i], 30, sampling, none), packed[i]);
        }
    }

    [Theory]
    [InlineData(WeightFormat.F32, KvFormat.F32, true)]
    [InlineData(WeightFormat.Int8, KvFormat.F32, false)]
    [InlineData(WeightFormat.F32, KvFormat.F16, false)]
    public void GroupQueryAttention_packing_should_apply_only_to_float32_weights_and_caches(WeightFormat format, KvFormat kv, bool inPlace)
    {
        // Quantized projections turn the kernel's last-bit differences into different greedy tokens (int8 packed
        // output differed from solo on the 135M twin), and the kernel wants its cache in the query's type.
        var weights = ModelWeights.Random(TestModels.Tiny(), seed: 21, scale: 0.3f);
        using var rt = new OrtModelRuntime(weights, capacity: 96, widths: [1, 8], new RuntimeOptions { Weights = format, Kv = kv });
        Assert.Equal(inPlace, rt.PackedInPlace); // width-1 rows and trees alike (one node per slot)
    }

    [Theory]
    [InlineData(WeightFormat.F32, KvFormat.F32)]
    [InlineData(WeightFormat.Int8, KvFormat.F32)] // joined packs with the attention sums in float64 (decision 0025)
    [InlineData(WeightFormat.Int4, KvFormat.F16)]
    public void Packed_sessions_should_generate_what_each_generates_alone_on_the_demo_model(WeightFormat format, KvFormat kv)
    {
        var demo = ModelBundle.Load(Paths.DemoModel);
        using var rt = new OrtModelRuntime(demo.Weights, capacity: 2048, widths: [1, 64], new RuntimeOptions { Weights = format, Kv = kv });
        var gen = new Generator(rt);
        int[][] prompts = [.. new[] { "summary", "rag", "ui", "reply" }
            .SelectMany(t => WorkloadItem.Load(Path.Combine(Paths.RepoRoot, "workloads", t + ".jsonl")).Take(2))
            .Select(item => demo.Tokenizer.Encode(PromptTemplate.Render(item.Context, item.Prompt)))];
        var packed = Packed(rt, gen, prompts, 24, new SamplingOptions(), demo.StopTokens);
        for (int i = 0; i < prompts.Length; i++)
        {
            Assert.Equal(Solo(gen, prompts[i], 24, new SamplingOptions(), demo.StopTokens), packed[i]);
        }

        Assert.Contains(packed, p => p.Count == 24);
    }

    [Fact]
    public void Packs_should_follow_their_sessions_down_to_a_smaller_bucket_after_a_larger_pack()
    {
        // Packs of long prompts, then packs of short ones: each pack runs on the graph of its own bucket.
        var weights = ModelWeights.Random(TestModels.Tiny(), seed: 8, scale: 0.3f);
        using var rt = new OrtModelRuntime(weights, capacity: 1024, widths: [1, 8]);
        var gen = new Generator(rt);
        var none = new HashSet<int>();
        foreach (int length in new[] { 700, 5, 300, 3 })
        {
            int[][] prompts = [.. Enumerable.Range(0, 3).Select(i => Enumerable.Range(0, length + i).Select(k => 2 + ((k * (i + 5)) % 47)).ToArray())];
            var packed = Packed(rt, gen, prompts, 8, new SamplingOptions(), none);
            for (int i = 0; i < prompts.Length; i++)
            {
                Assert.Equal(Solo(gen, prompts[i], 8, new SamplingOptions(), none), packed[i]);
            }
        }
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void In_place_packs_should_leave_each_cache_in_its_own_bucket(bool groupQuery)
    {
        // A 700-token session packed with a 5-token one: joined, the short one's cache moves up to the long one's
        // bucket; in place (GroupQueryAttention) each keeps its own, and the output is the same either way.
        var weights = ModelWeights.Random(TestModels.Tiny(), seed: 8, scale: 0.3f);
        using var rt = new OrtModelRuntime(weights, capacity: 1024, widths: [1, 8], new RuntimeOptions { PackedGroupQuery = groupQuery });
        var gen = new Generator(rt);
        var none = new HashSet<int>();
        int[][] prompts = [[.. Enumerable.Range(0, 700).Select(k => 2 + (k % 47))], [3, 4, 5, 6, 7]];
        var caches = prompts.Select(_ => rt.CreateCache()).ToList();
        try
        {
            var sessions = prompts.Select((p, i) => gen.StartDecode(caches[i], gen.Prefill(caches[i], p), p.Length, 0, 6, new SamplingOptions(), none)).ToList();
            while (PlainSession.StepPacked(sessions) > 0)
            {
            }

            Assert.Equal(groupQuery ? OrtModelRuntime.SmallestBucket : caches[0].Bucket, caches[1].Bucket);
            for (int i = 0; i < prompts.Length; i++)
            {
                Assert.Equal(Solo(gen, prompts[i], 6, new SamplingOptions(), none), sessions[i].Output.ToList());
            }
        }
        finally
        {
            caches.ForEach(c => c.Dispose());
        }
    }

    [Fact]
    public void A_packed_step_should_refuse_more_sessions_than_its_largest_graph_holds_in_one_run()
    {
        var weights = ModelWeights.Random(TestModels.Tiny(), seed: 2, scale: 0.3f);
        using var rt = new OrtModelRuntime(weights, capacity: 64, widths: [1]);
        var caches = Enumerable.Range(0, OrtModelRuntime.PackedSlotCounts[^1] + 1).Select(_ => rt.CreateCache()).ToList();
        try
        {
            Assert.Throws<ArgumentException>(() => rt.PackedBuffers(1, caches));
            Assert.Throws<ArgumentException>(() => rt.PackedBuffers(4, caches.Take(2).ToList()));
        }
        finally
        {
            caches.ForEach(c => c.Dispose());
        }
    }
}
