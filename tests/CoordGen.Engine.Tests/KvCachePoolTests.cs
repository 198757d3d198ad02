using CoordGen.Engine.Generation;
using CoordGen.Engine.Model;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Workloads;

namespace CoordGen.Engine.Tests;

/// <summary>The runtime keeps ended sessions' cache memory for the next sessions (decision 0030): reused, bounded, never after a fault, and invisible in the output.</summary>
public class KvCachePoolTests
{
    private static readonly Lazy<ModelBundle> Demo = new(() => ModelBundle.Load(Paths.DemoModel));

    private static KvCache Cache(KvCachePool pool) => new(layers: 2, kvHeads: 2, headDim: 4, buckets: [8, 16], KvFormat.F32, pool);

    private static void Append(KvCache cache, int count, float value)
    {
        var rows = new byte[cache.SlotBytesFor(count)];
        System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(rows.AsSpan()).Fill(value);
        cache.AppendSlots(rows, count);
    }

    [Fact]
    public void A_disposed_cache_memory_should_serve_the_next_cache_from_length_zero()
    {
        using var pool = new KvCachePool(limit: 4);
        var first = Cache(pool);
        Append(first, 10, 7f);                          // moves into the 16-slot bucket
        Assert.Equal(16, first.Bucket);
        first.Dispose();
        first.Dispose();                                // twice: kept once
        Assert.Equal(1, pool.Idle);

        using var second = Cache(pool);
        Assert.Equal(0, pool.Idle);
        Assert.Equal(1, pool.Reused);
        Assert.Equal(0, second.Length);
        Assert.Equal(8, second.Bucket);
        // The same memory, old rows and all (past the new cache's length, where every graph masks them).
        Assert.Contains(7f, second.KeyValue(0).GetTensorDataAsSpan<float>().ToArray());

        var ex = Assert.Throws<ObjectDisposedException>(() => first.KeyValue(0));
        Assert.Contains("disposed", ex.Message);
    }

    [Fact]
    public void The_pool_should_keep_at_most_its_limit_and_never_a_poisoned_cache()
    {
        using var pool = new KvCachePool(limit: 1);
        var a = Cache(pool);
        var b = Cache(pool);
        var c = Cache(pool);
        c.Poisoned = true;
        c.Dispose();
        Assert.Equal(0, pool.Idle);
        a.Dispose();
        b.Dispose();
        Assert.Equal(1, pool.Idle);

        using var none = new KvCachePool(limit: 0);
        Cache(none).Dispose();
        Assert.Equal(0, none.Idle);
        Assert.Throws<ArgumentOutOfRangeException>(() => new KvCachePool(-1));
    }

    [Fact]
    public void Trim_should_free_the_kept_caches_beyond_its_count()
    {
        using var pool = new KvCachePool(limit: 4);
        var caches = Enumerable.Range(0, 3).Select(_ => Cache(pool)).ToList();
        caches.ForEach(c => c.Dispose());
        Assert.Equal(3, pool.Idle);
        pool.Trim(1);
        Assert.Equal(1, pool.Idle);
        pool.Trim(-5);
        Assert.Equal(0, pool.Idle);
    }

    [Fact]
    public void A_packed_run_with_non_finite_logits_should_poison_every_cache_it_wrote_into()
    {
        // In place (GroupQueryAttention) every slot's rows were written before the logits were checked: none is kept.
        var weights = ModelWeights.Random(TestModels.Tiny(), seed: 8, scale: 0.3f);
        using var rt = new OrtModelRuntime(weights, capacity: 256, widths: [1, 8]);
        var gen = new Generator(rt);
        var none = new HashSet<int>();
        int[][] prompts = [[3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14]];
        var caches = prompts.Select(_ => rt.CreateCache()).ToList();
        var sessions = prompts.Select((p, i) => gen.StartDecode(caches[i], gen.Prefill(caches[i], p), p.Length, 0, 6, new SamplingOptions(), none)).ToList();
        rt.Faults = new FaultPlan(seed: 1, budget: 1, meanGap: 1, kinds: [FaultKind.NonFiniteLogits]);
        Assert.Throws<DeviceFaultException>(() => PlainSession.StepPacked(sessions));
        Assert.All(caches, c => Assert.True(c.Poisoned));
        caches.ForEach(c => c.Dispose());
        Assert.Equal(0, rt.CachePool.Idle);
    }

    [Fact]
    public void A_cache_handed_back_after_the_pool_is_disposed_should_be_freed()
    {
        var pool = new KvCachePool(limit: 2);
        var a = Cache(pool);
        pool.Dispose();
        a.Dispose();
        Assert.Equal(0, pool.Idle);
    }

    [Fact]
    public void A_reused_cache_should_give_the_logits_and_tokens_of_a_fresh_one_bit_for_bit()
    {
        var demo = Demo.Value;
        var item = WorkloadItem.Load(Path.Combine(Paths.RepoRoot, "workloads", "summary.jsonl")).First();
        int[] prompt = demo.Tokenizer.Encode(PromptTemplate.Render(item.Context, item.Prompt, demo.HasRoleTokens));
        // A longer session first, so the short one's masked slots hold its old keys and values.
        int[] longer = [.. Enumerable.Repeat(prompt, 700 / prompt.Length + 1).SelectMany(p => p).Take(700)];
        using var pooled = new OrtModelRuntime(demo.Weights, capacity: 2048, widths: [1, 4, 8, 64]);
        using var fresh = new OrtModelRuntime(demo.Weights, capacity: 2048, widths: [1, 64], new RuntimeOptions { KvPool = 0 });

        using (var c = pooled.CreateCache())
        {
            new Generator(pooled).Prefill(c, longer);
        }

        Assert.Equal(1, pooled.CachePool.Idle);
        float[] reused, clean;
        using (var c = pooled.CreateCache())
        {
            reused = new Generator(pooled).Prefill(c, prompt);
        }

        using (var c = fresh.CreateCache())
        {
            clean = new Generator(fresh).Prefill(c, prompt);
        }

        Assert.True(pooled.CachePool.Reused >= 1);
        Assert.Equal(0, fresh.CachePool.Idle);
        Assert.Equal(clean, reused);

        var a = new Generator(pooled).Generate(prompt, 48, new SamplingOptions(), demo.StopTokens);
        var b = new Generator(fresh).Generate(prompt, 48, new SamplingOptions(), demo.StopTokens);
        Assert.Equal(b.Tokens, a.Tokens);

        // Speculation on reused caches (trees staged past the length, then kept) stays lossless.
        TestModels.AssertSpeculationLossless(demo, pooled, true);
        Assert.True(pooled.CachePool.Reused >= 3);
    }
}
