using CoordGen.Engine.Speculative;
using CsCheck;

namespace CoordGen.Engine.Tests;

public class SuffixAutomatonTests
{
    private static int FindFirst(IReadOnlyList<int> text, IReadOnlyList<int> pat)
    {
        for (int i = 0; i + pat.Count <= text.Count; i++)
        {
            bool ok = true;
            for (int k = 0; k < pat.Count && ok; k++)
            {
                ok = text[i + k] == pat[k];
            }

            if (ok)
            {
                return i;
            }
        }

        return -1;
    }

    [Fact]
    public void Running_cursor_should_equal_brute_force_longest_suffix_match_when_text_grows_token_by_token()
    {
        Gen.Int[0, 3].Array[1, 60].Sample(seq =>
        {
            var sam = new SuffixAutomaton();
            var cursor = default(MatchCursor);
            var dest = new int[8];
            for (int i = 0; i < seq.Length; i++)
            {
                // Look up the newest token before inserting it.
                cursor = sam.Advance(cursor, seq[i]);
                var text = seq[..i];
                int best = 0;
                for (int len = 1; len <= i + 1; len++)
                {
                    if (FindFirst(text, seq[(i + 1 - len)..(i + 1)]) >= 0)
                    {
                        best = len;
                    }
                }

                Assert.Equal(best, cursor.Length);
                if (best > 0)
                {
                    int first = FindFirst(text, seq[(i + 1 - best)..(i + 1)]);
                    int n = sam.Continuation(cursor, 8, dest);
                    var expected = text.Skip(first + best).Take(8).ToArray();
                    Assert.Equal(expected, dest[..n]);
                }

                sam.Extend(seq[i]);
            }
        }, iter: 300);
    }

    [Fact]
    public void Occurrence_counts_should_equal_brute_force_counts_for_every_substring()
    {
        Gen.Int[0, 2].Array[1, 40].Sample(seq =>
        {
            var sam = new SuffixAutomaton();
            sam.ExtendAll(seq);
            var counts = sam.OccurrenceCounts();
            for (int a = 0; a < seq.Length; a++)
            {
                for (int b = a + 1; b <= Math.Min(seq.Length, a + 6); b++)
                {
                    var pat = seq[a..b];
                    var c = sam.Match(pat);
                    Assert.Equal(pat.Length, c.Length);
                    int brute = 0;
                    for (int i = 0; i + pat.Length <= seq.Length; i++)
                    {
                        if (seq.AsSpan(i, pat.Length).SequenceEqual(pat))
                        {
                            brute++;
                        }
                    }

                    Assert.Equal(brute, counts[c.State]);
                }
            }
        }, iter: 200);
    }

    [Fact]
    public void Continuation_should_stop_at_separators()
    {
        var sam = new SuffixAutomaton();
        sam.ExtendAll([1, 2, 3, -1, 1, 2, 9]);
        var c = sam.Match([1, 2]);
        var dest = new int[5];
        int n = sam.Continuation(c, 5, dest);
        Assert.Equal([3], dest[..n]);
        Assert.Equal(0, sam.Advance(c, -1).Length);
    }

    [Fact]
    public void Out_tokens_should_be_every_token_that_follows_a_state()
    {
        Gen.Int[0, 4].Array[1, 50].Sample(seq =>
        {
            var sam = new SuffixAutomaton();
            sam.ExtendAll(seq);
            for (int start = 0; start < seq.Length; start++)
            {
                for (int len = 1; start + len <= seq.Length && len <= 4; len++)
                {
                    var pattern = seq.AsSpan(start, len);
                    var cursor = sam.Match(pattern);
                    if (cursor.Length != len)
                    {
                        continue;
                    }

                    // Brute force: the tokens after each occurrence of the state's longest string, by first
                    // occurrence. A state stands for a set of strings with the same end positions, so the
                    // pattern's followers are the state's.
                    var expected = new List<int>();
                    for (int i = 0; i + len < seq.Length; i++)
                    {
                        if (seq.AsSpan(i, len).SequenceEqual(pattern) && !expected.Contains(seq[i + len]))
                        {
                            expected.Add(seq[i + len]);
                        }
                    }

                    Assert.Equal(expected.Order(), sam.OutTokens(cursor.State).Order());
                }
            }
        });
    }

    [Fact]
    public void Out_token_enumeration_should_end_cleanly_and_start_empty_for_a_default_list()
    {
        var sam = new SuffixAutomaton();
        sam.ExtendAll([1, 2, 1, 3]);
        var e = sam.OutTokens(0).GetEnumerator();
        var seen = new List<int>();
        while (e.MoveNext())
        {
            seen.Add(e.Current);
        }

        Assert.Equal([1, 2, 3], seen); // insertion order
        Assert.False(e.MoveNext()); // and again after the end
        Assert.Throws<InvalidOperationException>(() => e.Current);
        Assert.Empty(default(SuffixAutomaton.OutTokenList));
    }
}
