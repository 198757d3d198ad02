using CoordGen.Engine.Speculative;

namespace CoordGen.Engine.Tests;

public class DraftingTests
{
    public static TheoryData<int[], int[]> PldCases => new()
    {
        // The last 3-gram (5 6 7) occurs earlier: propose what followed it.
        { new[] { 5, 6, 7, 8, 9, 1, 5, 6, 7 }, new[] { 8, 9, 1, 5, 6, 7 } },
        // No 3-gram or 2-gram match; the 1-gram 4 matches its earliest occurrence.
        { new[] { 4, 1, 2, 3, 4 }, new[] { 1, 2, 3, 4 } },
        // Earliest match wins when the n-gram repeats.
        { new[] { 1, 2, 10, 1, 2, 20, 1, 2 }, new[] { 10, 1, 2, 20, 1, 2 } },
        // Nothing matches: empty draft.
        { new[] { 1, 2, 3 }, Array.Empty<int>() },
    };

    [Theory]
    [MemberData(nameof(PldCases))]
    public void Prompt_lookup_should_propose_the_continuation_of_the_earliest_longest_ngram(int[] sequence, int[] expected)
    {
        var dest = new int[10];
        int n = PromptLookup.Draft(sequence, dest);
        Assert.Equal(expected, dest[..n]);
    }

    [Fact]
    public void Prompt_lookup_should_cap_drafts_at_ten_tokens()
    {
        var seq = Enumerable.Range(0, 30).Concat(Enumerable.Range(0, 3)).ToArray();
        var dest = new int[16];
        Assert.Equal(10, PromptLookup.Draft(seq, dest));
        Assert.Equal(Enumerable.Range(3, 10), dest[..10]);
    }

    [Fact]
    public void Tree_should_share_prefixes_and_lay_out_parents_for_rows()
    {
        var tree = new DraftTree(capacity: 7);
        tree.AddPath([1, 2, 3], DraftSource.Prompt);
        tree.AddPath([1, 2, 4], DraftSource.Calibrated);
        tree.AddPath([5], DraftSource.Reused);
        Assert.Equal(5, tree.Count);
        Span<int> rows = stackalloc int[6];
        tree.RowParents(rows);
        // Row 0 is the root; nodes 1,2,3 chain; node 4 (token 4) hangs off node 2 (token 2); node 5 off the root.
        Assert.Equal([-1, 0, 1, 2, 2, 0], rows.ToArray());
        Assert.Equal(3, tree.Depth(3));
        Assert.Equal(DraftSource.Calibrated, tree.Source(3));
        Assert.Equal(3, tree.Child(1, 4));
        Assert.Equal(-1, tree.Child(-1, 9));
    }

    [Fact]
    public void Tree_should_stop_adding_when_the_width_is_full()
    {
        var tree = new DraftTree(capacity: 3);
        Assert.Equal(3, tree.AddPath([1, 2, 3, 4, 5], DraftSource.Prompt));
        Assert.Equal(0, tree.AddPath([9, 9], DraftSource.History));
        Assert.Equal(3, tree.Count);
    }

    public static TheoryData<int[], int[], int, int[]> ReuseCases => new()
    {
        // Synonym case: x2 replaced, then the draft resumes and the model agrees on x3..x5.
        { new[] { 10, 11, 12, 13, 14 }, new[] { 10, 99, 12, 13, 14 }, 1, new[] { 12, 13, 14 } },
        // Two agreeing runs after the mismatch: the longer one is kept.
        { new[] { 1, 2, 3, 4, 5, 6, 7 }, new[] { 9, 2, 0, 4, 5, 6, 0 }, 0, new[] { 4, 5, 6 } },
        // Redundant case: nothing agrees after the mismatch.
        { new[] { 1, 2, 3 }, new[] { 1, 8, 8 }, 1, Array.Empty<int>() },
    };

    [Theory]
    [MemberData(nameof(ReuseCases))]
    public void Reuse_should_keep_the_longest_agreeing_run_after_the_first_mismatch(int[] draft, int[] predicted, int e, int[] expected)
    {
        var reuse = new DraftReuse(threshold: 15);
        reuse.Observe(draft, predicted, e);
        Assert.Equal(expected, reuse.Offer().ToArray());
    }

    [Fact]
    public void Reuse_should_survive_one_step_and_drop_past_the_threshold()
    {
        var reuse = new DraftReuse(threshold: 10);
        reuse.Observe([1, 2, 3, 4], [1, 9, 3, 4], 1);
        reuse.EndStep([7], proposedDraftTokens: 12);
        Assert.Equal(0, reuse.Offer().Length);

        reuse.Observe([1, 2, 3, 4], [1, 9, 3, 4], 1);
        reuse.EndStep([7], proposedDraftTokens: 4);
        Assert.Equal([3, 4], reuse.Offer().ToArray());
        reuse.EndStep([3], proposedDraftTokens: 4);
        Assert.Equal([4], reuse.Offer().ToArray());
    }

    [Fact]
    public void History_store_should_rank_continuations_by_count_and_round_trip_on_disk()
    {
        var store = new HistoryStore();
        store.Add([1, 2, 3, 4]);
        store.Add([1, 2, 3, 4]);
        store.Add([1, 2, 7, 8]);
        var c = store.Automaton.Match([1, 2]);
        var conts = store.Continuations(c, branches: 2, length: 2);
        Assert.Equal([3, 4], conts[0]);
        Assert.Equal([7, 8], conts[1]);

        string path = Path.GetTempFileName();
        try
        {
            store.Save(path);
            var loaded = HistoryStore.Load(path);
            Assert.Equal(3, loaded.Responses);
            Assert.Equal([3, 4], loaded.Continuations(loaded.Automaton.Match([1, 2]), 1, 2)[0]);
        }
        finally
        {
            File.Delete(path);
        }
    }

    [Fact]
    public void History_store_should_drop_the_oldest_responses_when_over_budget()
    {
        var store = new HistoryStore(maxTokens: 10);
        store.Add([1, 2, 3, 4]);
        store.Add([5, 6, 7, 8]);
        store.Add([9, 10, 11]);
        Assert.Equal(2, store.Responses);
        Assert.Equal(0, store.Automaton.Match([1, 2]).Length >= 2 ? 1 : 0);
    }
}

public class NgramIndexTests
{
    [Fact]
    public void Continuations_should_list_distinct_continuations_of_the_last_bigram_most_recent_first()
    {
        var idx = new NgramIndex();
        foreach (int t in new[] { 1, 2, 3, 4, 1, 2, 5, 6, 1, 2, 3, 9, 1, 2 })
        {
            idx.Add(t);
        }

        var result = new List<int[]>();
        Span<int> firsts = stackalloc int[4];
        int n = idx.Continuations(4, 2, firsts, result);
        // Occurrences of (1,2) end at 1, 5, 9 (and the last, 13, which has no continuation).
        // Most recent first: 3 9 (from 9), 5 6 (from 5); 3 4 (from 1) repeats first token 3 and is skipped.
        Assert.Equal(2, n);
        Assert.Equal([3, 9], result[0]);
        Assert.Equal([5, 6], result[1]);
    }

    [Fact]
    public void Continuations_should_be_empty_when_the_bigram_is_new()
    {
        var idx = new NgramIndex();
        foreach (int t in new[] { 1, 2, 3, 4 })
        {
            idx.Add(t);
        }

        var result = new List<int[]>();
        Span<int> firsts = stackalloc int[4];
        Assert.Equal(0, idx.Continuations(4, 3, firsts, result));
    }
}
