using CoordGen.Engine.Generation;
using CoordGen.Engine.Model;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Speculative;
using CoordGen.Messages;
using CsCheck;

namespace CoordGen.Engine.Tests;

/// <summary>The prefix cache (decision 0019): whole blocks, LRU eviction of leaves, and generation identical with it.</summary>
public class PrefixCacheTests
{
    private static (OrtModelRuntime Rt, Generator Plain) Tiny(int capacity = 128)
    {
        var rt = new OrtModelRuntime(ModelWeights.Random(TestModels.Tiny(), seed: 21, scale: 0.25f), capacity: capacity, widths: [1, 8, 16]);
        return (rt, new Generator(rt));
    }

    private static KvCache Prefilled(OrtModelRuntime rt, Generator plain, int[] prompt)
    {
        var cache = rt.CreateCache();
        plain.Prefill(cache, prompt);
        return cache;
    }

    /// <summary>Slots of a float32 cache as <see cref="KvCache.CopySlotsTo"/> lays them out.</summary>
    private static float[] Slots(KvCache cache, int from, int count)
    {
        var rows = new byte[cache.SlotBytesFor(count)];
        cache.CopySlotsTo(from, count, rows);
        return System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(rows).ToArray();
    }

    [Fact]
    public void Lookup_should_find_whole_blocks_of_a_shared_prefix_leave_a_token_to_prefill_and_copy_the_rows_exactly()
    {
        var (rt, plain) = Tiny();
        using var _ = rt;
        var prefix = new PrefixCache(blockTokens: 8);
        int[] doc = [.. Enumerable.Range(0, 27).Select(i => 2 + (i * 7 % 45))];
        using (var first = Prefilled(rt, plain, doc))
        {
            Assert.Equal(3, prefix.Insert(doc, first, null, long.MaxValue)); // 27 tokens: 3 whole blocks
        }

        Assert.Equal(3, prefix.BlockCount);
        Assert.Equal(24, prefix.Lookup([.. doc, 5, 6]).Tokens);
        Assert.Equal(16, prefix.Lookup(doc[..24]).Tokens); // one token must be left to prefill: 23 usable, 2 blocks
        Assert.Equal(16, prefix.Lookup([.. doc[..20], 49, 49, 49, 49, 49]).Tokens); // differs inside the third block
        Assert.Equal(0, prefix.Lookup([49, .. doc]).Tokens);
        Assert.Equal(0, prefix.Lookup([.. doc], calibrationK: 4).Tokens); // no calibration rows kept

        int[] question = [.. doc, 11, 12, 13];
        using var reference = Prefilled(rt, plain, question);
        var hit = prefix.Lookup(question);
        using var copied = rt.CreateCache();
        hit.CopyInto(copied);
        Assert.Equal(24, copied.Length);
        Assert.Equal(Slots(reference, 0, 24), Slots(copied, 0, 24));
    }

    [Fact]
    public void Trim_should_evict_least_recently_used_leaves_first_and_keep_bytes_within_the_room()
    {
        var (rt, plain) = Tiny();
        using var _ = rt;
        var prefix = new PrefixCache(blockTokens: 8);
        int[] shared = [.. Enumerable.Range(3, 16)];
        int[] a = [.. shared, .. Enumerable.Range(20, 9)], b = [.. shared, .. Enumerable.Range(30, 9)];
        using (var ca = Prefilled(rt, plain, a))
        using (var cb = Prefilled(rt, plain, b))
        {
            prefix.Insert(a, ca, null, long.MaxValue);
            prefix.Insert(b, cb, null, long.MaxValue);
        }

        Assert.Equal(4, prefix.BlockCount); // two shared blocks, one leaf each
        long block = prefix.Bytes / 4;
        prefix.Lookup([.. a, 1]); // a is the most recent now
        prefix.Trim(3 * block);
        Assert.Equal(3, prefix.BlockCount);
        Assert.Equal(24, prefix.Lookup([.. a, 1]).Tokens);
        Assert.Equal(16, prefix.Lookup([.. b, 1]).Tokens); // b's leaf went first

        prefix.Trim(block + 1); // leaves only: a's leaf, then the shared second block
        Assert.Equal(1, prefix.BlockCount);
        Assert.Equal(8, prefix.Lookup([.. a, 1]).Tokens);
        Assert.Equal(3, prefix.Evictions);
        prefix.Trim(0);
        Assert.Equal((0, 0L), (prefix.BlockCount, prefix.Bytes));
    }

    [Fact]
    public void Pinned_blocks_should_go_only_after_every_other_leaf_and_be_released_by_their_owner()
    {
        var (rt, plain) = Tiny();
        using var _ = rt;
        var prefix = new PrefixCache(blockTokens: 8);
        int[] store = [.. Enumerable.Range(3, 16)]; // a context store's documents: 2 blocks
        int[] asked = [.. store, .. Enumerable.Range(20, 9)], other = [.. Enumerable.Range(30, 17)];
        using (var ca = Prefilled(rt, plain, asked))
        using (var co = Prefilled(rt, plain, other))
        {
            prefix.Insert(asked, ca, null, long.MaxValue);
            Assert.Equal(2, prefix.Pin("docs", generation: 1, asked, tokens: 18)); // 18 tokens: the 2 whole blocks within
            prefix.Insert(other, co, null, long.MaxValue); // the most recent, unpinned
        }

        long block = prefix.Bytes / 5;
        Assert.Equal(2, prefix.PinnedBlocks);

        // Room for 2 blocks: the unpinned ones go, the more recent "other" included; the store's stay.
        prefix.Trim(2 * block);
        Assert.Equal(2, prefix.BlockCount);
        Assert.Equal(16, prefix.Lookup([.. store, 1]).Tokens);
        Assert.Equal(0, prefix.Lookup([.. other, 1]).Tokens);

        // Sessions need the memory: pinned blocks yield too, leaf first.
        prefix.Trim(block);
        Assert.Equal(1, prefix.BlockCount);
        Assert.Equal(1, prefix.PinnedBlocks);
        Assert.Equal(8, prefix.Lookup([.. store, 1]).Tokens);

        // A stale pin (an older generation) changes nothing; a release makes the block ordinary again.
        Assert.Equal(0, prefix.Pin("docs", generation: 0, asked, tokens: 18));
        prefix.Unpin("docs", throughGeneration: 1);
        Assert.Equal(0, prefix.PinnedBlocks);
        Assert.Equal(0, prefix.Pin("docs", generation: 1, asked, tokens: 18)); // released generations stay released
        Assert.Equal(1, prefix.Pin("docs", generation: 2, asked, tokens: 18));
        prefix.Clear();
        Assert.Equal(0, prefix.PinnedBlocks);
    }

    [Fact]
    public void Pins_of_two_owners_should_share_blocks_and_a_block_stays_pinned_while_either_holds_it()
    {
        var (rt, plain) = Tiny();
        using var _ = rt;
        var prefix = new PrefixCache(blockTokens: 8);
        int[] a = [.. Enumerable.Range(3, 24)];
        using (var ca = Prefilled(rt, plain, a))
        {
            prefix.Insert(a, ca, null, long.MaxValue);
        }

        Assert.Equal(3, prefix.Pin("long", 1, a, 24));
        Assert.Equal(1, prefix.Pin("short", 2, a, 12)); // one whole block within 12 tokens
        Assert.Equal(3, prefix.PinnedBlocks);
        prefix.Unpin("long", 1);
        Assert.Equal(1, prefix.PinnedBlocks);
        long block = prefix.Bytes / 3;
        prefix.Trim(block);
        Assert.Equal(1, prefix.BlockCount); // the two blocks only "long" pinned went first
        Assert.Equal(8, prefix.Lookup([.. a[..8], 1]).Tokens);
        Assert.Equal(1, prefix.Pin("short", 3, a[..8], 8)); // re-pinning replaces, never doubles
        prefix.Unpin("short", 3);
        Assert.Equal(0, prefix.PinnedBlocks);
    }

    [Fact]
    public void One_generation_should_hold_several_chains_and_a_newer_one_replace_them()
    {
        var (rt, plain) = Tiny();
        using var _ = rt;
        var prefix = new PrefixCache(blockTokens: 8);
        int[] chat = [.. Enumerable.Range(3, 16)], completion = [.. Enumerable.Range(20, 16)]; // one store's documents, two renderings
        using (var cc = Prefilled(rt, plain, chat))
        using (var co = Prefilled(rt, plain, completion))
        {
            prefix.Insert(chat, cc, null, long.MaxValue);
            prefix.Insert(completion, co, null, long.MaxValue);
        }

        Assert.Equal(2, prefix.Pin("docs", 4, chat, 16));
        Assert.Equal(2, prefix.Pin("docs", 4, completion, 16)); // the same generation adds its chain
        Assert.Equal(2, prefix.Pin("docs", 4, chat, 16)); // and pinning one again never counts twice
        Assert.Equal(4, prefix.PinnedBlocks);
        Assert.Equal(2, prefix.Pin("docs", 5, chat, 16)); // a newer generation replaces both
        Assert.Equal(2, prefix.PinnedBlocks);
        prefix.Unpin("docs", 5);
        Assert.Equal(0, prefix.PinnedBlocks);
    }

    [Fact]
    public void Calibration_rows_should_travel_with_their_blocks_and_come_back_in_order()
    {
        var (rt, plain) = Tiny();
        using var _ = rt;
        var prefix = new PrefixCache(blockTokens: 4);
        int[] prompt = [.. Enumerable.Range(5, 10)];
        var top = new TopRows(3, [.. Enumerable.Range(0, 30)], [.. Enumerable.Range(0, 30).Select(i => i / 100f)]);
        using (var cache = Prefilled(rt, plain, prompt))
        {
            // Rows split as a prefill's chunks would send them.
            prefix.Insert(prompt, cache, PrefixCache.Join([PrefixCache.Slice(top, 0, 3), PrefixCache.Slice(top, 3, 7)]), long.MaxValue);
        }

        var hit = prefix.Lookup([.. prompt, 1], calibrationK: 2);
        Assert.Equal(8, hit.Tokens);
        var rows = hit.TopRows(2)!;
        Assert.Equal(8, rows.Rows);
        Assert.Equal([0, 1, 3, 4, 6, 7, 9, 10], rows.Ids[..8]);
        Assert.Equal(21, rows.Ids[^2]);
        Assert.Equal(0, prefix.Lookup([.. prompt, 1], calibrationK: 4).Tokens); // rows of 3 cannot serve k = 4
    }

    [Fact]
    public void Generation_should_be_identical_with_the_cache_when_prompts_share_random_prefixes_under_random_budgets()
    {
        // Property: prompts drawn from a few shared stems with random tails; each is generated with the cache
        // (copy the hit, prefill the rest, insert, trim to a random room) and without it. Greedy and seeded
        // sampling both; the cache's books must balance after every step.
        var (rt, plain) = Tiny(capacity: 160);
        using var _ = rt;
        var prefix = new PrefixCache(blockTokens: 8);
        var stems = Enumerable.Range(0, 3).Select(s => Enumerable.Range(0, 40).Select(i => 2 + ((i * (s + 3)) + s) % 47).ToArray()).ToArray();
        long slotBytes = rt.CreateCache().SlotBytes;
        int reused = 0, evictionsSeen = 0;
        var gen = Gen.Select(Gen.Int[0, 2], Gen.Int[1, 40], Gen.Int[2, 48].Array[0, 12], Gen.Int[0, 12], Gen.Bool);
        gen.Sample((stem, keep, tail, roomBlocks, sample) =>
        {
            int[] prompt = [.. stems[stem][..keep], .. tail];
            var sampling = sample ? new SamplingOptions { Temperature = 0.9f, Seed = keep + tail.Length } : new SamplingOptions();
            var expected = plain.Generate(prompt, 12, sampling, new HashSet<int>()).Tokens;

            var cache = rt.CreateCache();
            var hit = prefix.Lookup(prompt);
            hit.CopyInto(cache);
            reused += hit.Tokens;
            var logits = plain.Prefill(cache, prompt[hit.Tokens..]);
            prefix.Insert(prompt, cache, null, roomBlocks * 8 * slotBytes);
            var got = plain.Decode(cache, logits, prompt.Length, 0, 12, sampling, new HashSet<int>()).Tokens;
            cache.Dispose();

            Assert.Equal(expected, got);
            Assert.True(prefix.Bytes <= roomBlocks * 8 * slotBytes, $"{prefix.Bytes} bytes held, room {roomBlocks * 8 * slotBytes}");
            Assert.Equal(prefix.BlockCount * 8 * slotBytes, prefix.Bytes);
            evictionsSeen = (int)prefix.Evictions;
        }, iter: 80, threads: 1);
        Assert.True(reused > 100, $"only {reused} tokens came from the cache: the property did not exercise hits");
        Assert.True(evictionsSeen > 3, $"only {evictionsSeen} evictions: the property did not exercise them");
    }

    [Fact]
    public void Speculative_calibrated_generation_should_be_identical_with_a_cached_prefix()
    {
        var demo = ModelBundle.Load(Paths.DemoModel);
        using var rt = new OrtModelRuntime(demo.Weights, capacity: 1024, widths: [1, 64, 8]);
        var spec = new SpeculativeDecoder(rt);
        var opts = SpeculationOptions.ForMethod("sam+ours", 8);
        var prefix = new PrefixCache();
        bool reusedAcrossBucket = false;
        string doc = string.Join(' ', Enumerable.Range(0, 30).Select(i => $"Item {i} keeps the value {i * 7 % 13} in its field."));
        foreach (string q in new[] { "Summarize the document.", "What does the text say about item 12?", "Find the part about value 5." })
        {
            int[] prompt = demo.Tokenizer.Encode(PromptTemplate.Render(doc, q));
            var expected = spec.Generate(prompt, 40, new SamplingOptions(), demo.StopTokens, opts).Tokens;

            var hit = prefix.Lookup(prompt, opts.Calibration.TopK);
            var (session, finish) = spec.BeginPrefill(prompt, opts.Calibration, prefix: hit);
            while (!session.Step())
            {
            }

            using var pre = finish();

            // Calibration sees the same rows at every position with the cache as without it (cached rows first).
            var (plainSession, plainFinish) = spec.BeginPrefill(prompt, opts.Calibration);
            while (!plainSession.Step())
            {
            }

            using var uncached = plainFinish();
            var (withHit, without) = (pre.TopK!.ToRows(), uncached.TopK!.ToRows());
            Assert.Equal(without.Ids, withHit.Ids);
            TestModels.AssertClose(without.Probs, withHit.Probs, 1e-5, "calibration probabilities");

            // The copied slots (across the 256-slot bucket boundary) hold what a prefill from scratch computes.
            if (hit.Tokens > 0)
            {
                TestModels.AssertClose(Slots(uncached.Cache, 0, hit.Tokens), Slots(pre.Cache, 0, hit.Tokens), 1e-5, "cached keys and values");
                reusedAcrossBucket |= hit.Tokens > 256;
            }

            prefix.Insert(prompt, pre.Cache, pre.TopK!.ToRows(), long.MaxValue);
            var got = spec.Generate(pre, 40, new SamplingOptions(), demo.StopTokens, opts).Tokens;
            Assert.Equal(expected, got);
        }

        Assert.True(reusedAcrossBucket, "no hit crossed the first KV bucket (256 slots): lengthen the document");
    }
}
