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

    [Theory]
    // The passage "11 12 13 14 15 16 17" copied as "11 12 99": 99 replaced 13 (resume at 14) or was inserted before it (resume at 13).
    [InlineData(new[] { 99 }, new[] { 14, 15, 16 }, new[] { 13, 14, 15 }, null)]
    // Copied as "11 12 14": 13 was dropped (resume at 15), besides the other two readings.
    [InlineData(new[] { 14 }, new[] { 14, 15, 16 }, new[] { 13, 14, 15 }, new[] { 15, 16, 17 })]
    public void Edit_continuations_should_resume_the_passage_after_a_one_token_edit(int[] last, int[] replaced, int[] inserted, int[]? dropped)
    {
        var idx = new NgramIndex();
        foreach (int t in new[] { 10, 11, 12, 13, 14, 15, 16, 17, 5, 11, 12 }.Concat(last))
        {
            idx.Add(t);
        }

        var result = new List<int[]>();
        int n = idx.EditContinuations(2, 3, result);
        Assert.Equal(dropped is null ? 2 : 3, n);
        Assert.Equal(replaced, result[0]);
        Assert.Equal(inserted, result[1]);
        if (dropped is not null)
        {
            Assert.Equal(dropped, result[2]);
        }
    }

    [Fact]
    public void Edit_continuations_should_be_empty_when_the_copy_is_exact()
    {
        var idx = new NgramIndex();
        foreach (int t in new[] { 10, 11, 12, 13, 14, 15, 5, 11, 12, 13 })
        {
            idx.Add(t);
        }

        Assert.Equal(0, idx.EditContinuations(2, 3, []));
    }
}

public class CopyCeilingTests
{
    [Theory]
    // Output "3 4 5 6" is a copy of the prompt after an earlier 2 (its last token): one step.
    [InlineData(new[] { 1, 2, 3, 4, 5, 6, 2 }, new[] { 3, 4, 5, 6 }, 12, true, 4.0)]
    // The same with drafts capped at 2 tokens: steps take 3 tokens, then 1.
    [InlineData(new[] { 1, 2, 3, 4, 5, 6, 2 }, new[] { 3, 4, 5, 6 }, 2, true, 2.0)]
    // Nothing to copy: one token per step.
    [InlineData(new[] { 1, 2 }, new[] { 7, 8, 9 }, 12, true, 1.0)]
    // "5 6" follows 4, not the last token 9: after last tokens, step 1 gets only the model's 5, step 2
    // copies 6 (after the earlier 5) and adds 7: 3 tokens in 2 steps. From anywhere: "5 6" then 7, one step.
    [InlineData(new[] { 4, 5, 6, 9 }, new[] { 5, 6, 7 }, 12, true, 1.5)]
    [InlineData(new[] { 4, 5, 6, 9 }, new[] { 5, 6, 7 }, 12, false, 3.0)]
    // Copies come from the output so far, never from tokens not yet generated: 1, 2, then "1 2" + 1, then 2.
    [InlineData(new[] { 0 }, new[] { 1, 2, 1, 2, 1, 2 }, 12, false, 1.5)]
    public void Ceiling_should_take_the_longest_copy_at_every_step(int[] prompt, int[] output, int maxDraft, bool afterLastToken, double expected) =>
        Assert.Equal(expected, CopyCeiling.TokensPerStep(prompt, output, maxDraft, afterLastToken), 6);
}

public class ConsensusIndexTests
{
    private static int[] Draft(int[] indexed, int[] sequence, int maxLength)
    {
        var index = new ConsensusIndex();
        foreach (int t in indexed)
        {
            index.Add(t);
        }

        var dest = new int[maxLength];
        return dest[..index.Draft(sequence, maxLength, dest)];
    }

    [Fact]
    public void Among_equally_long_matches_the_chain_should_follow_the_recurring_and_recent_continuation()
    {
        // 5 is followed by "1 2", "1 3" and "1 3 9": a first-occurrence continuation would say 1 2.
        int[] s = [5, 1, 2, 5, 1, 3, 5, 1, 3, 9, 5];
        Assert.Equal([1, 3, 9, 5], Draft(s, s, 12));
    }

    [Fact]
    public void A_longer_suffix_match_should_outvote_several_short_ones()
    {
        // "7 8 1" occurred once (then 2); "0 1" three times (then 3): the longer match wins.
        int[] s = [7, 8, 1, 2, 0, 1, 3, 0, 1, 3, 0, 1, 3, 7, 8, 1];
        Assert.Equal([2, 0, 1], Draft(s, s, 3));
    }

    [Fact]
    public void Tokens_past_the_index_should_be_searched_too()
    {
        // Drafting ahead for a hypothetical outcome: the index holds 4 5 6, the sequence goes on.
        Assert.Equal([5, 6, 4, 5, 6], Draft([4, 5, 6], [4, 5, 6, 4, 5, 6, 4], 5));
    }

    [Fact]
    public void No_earlier_occurrence_should_give_no_draft()
    {
        Assert.Empty(Draft([1, 2, 3], [1, 2, 3], 8));
    }
}
