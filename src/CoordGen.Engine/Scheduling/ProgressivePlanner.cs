namespace CoordGen.Engine.Scheduling;

/// <summary>
/// Profiled costs of a model split into blocks P1..PN (paper §3.2): per block, the time to load its
/// narrow (verification) graph G2, and the time to compute one prefill chunk on the wide graph G1 and
/// on G2 (the chunk run as repeated G2-wide sub-chunks). Milliseconds.
/// </summary>
public sealed record BlockCosts(IReadOnlyList<double> LoadG2, IReadOnlyList<double> ComputeG1, IReadOnlyList<double> ComputeG2)
{
    public int Blocks => LoadG2.Count;

    public void Validate()
    {
        if (Blocks == 0 || ComputeG1.Count != Blocks || ComputeG2.Count != Blocks)
        {
            throw new ArgumentException("block costs need the same non-zero number of load, G1 and G2 entries.");
        }

        if (LoadG2.Concat(ComputeG1).Concat(ComputeG2).Any(x => x < 0 || double.IsNaN(x)))
        {
            throw new ArgumentException("block costs must be non-negative numbers.");
        }
    }
}

/// <summary>One switch: load G2 of <paramref name="Block"/> starting when compute slot <paramref name="StartSlot"/> starts (slot = chunk × N + block; N × chunks = after prefill).</summary>
public readonly record struct SwitchStep(int Block, int StartSlot);

/// <summary>A switching plan and its simulated timeline.</summary>
/// <remarks><paramref name="PeakBothBlocks"/>: the most blocks holding both variants at once (from a load's start until the block first computes on G2, or until decoding starts).</remarks>
public sealed record SwitchPlan(IReadOnlyList<SwitchStep> Steps, double PrefillEndMs, double SwitchEndMs, double StallMs, int PeakBothBlocks = 0)
{
    /// <summary>When decoding can start: prefill done and every block on G2.</summary>
    public double ReadyMs => Math.Max(PrefillEndMs, SwitchEndMs);
}

/// <summary>
/// Progressive graph scheduling (paper §3.2, Eq. 1-2): switch blocks from the wide prefill graph G1 to
/// the narrow verification graph G2 during chunked prefill, last block first, each load hidden behind
/// the computation of the fewest following blocks that covers it. Pure functions over profiled costs.
/// <para>Execution model (the paper's appendix): one load at a time; loads overlap the computation of
/// other blocks; a block being loaded cannot compute (its next slot waits for the load); once switched,
/// a block computes on G2. Objective: the time at which decoding can start, max(prefill end, last
/// switch end).</para>
/// </summary>
public static class ProgressivePlanner
{
    /// <summary>
    /// The paper's greedy (Eq. 1-2), tried from every starting slot (at once, after any block of any
    /// chunk, or only after prefill, which is the synchronous switch), last block first or first block
    /// first, with and without keeping a block's own slot out of its load window; the best simulated
    /// plan wins against back-to-back plans (all loads queued at one slot, in a few orders), and then
    /// <see cref="Improve"/> polishes it by local search. Starting later
    /// matters when G2 is much slower than G1 and many chunks remain.
    /// </summary>
    /// <param name="maxBothBlocks">Memory cap: prefer plans in which at most this many blocks hold both
    /// variants at once (<see cref="SwitchPlan.PeakBothBlocks"/>); the fastest plan wins among those.
    /// When no plan meets the cap, the one closest to it.</param>
    public static SwitchPlan Plan(BlockCosts costs, int chunks, int maxBothBlocks = int.MaxValue)
    {
        costs.Validate();
        if (chunks < 1)
        {
            throw new ArgumentException("prefill needs at least one chunk.");
        }

        SwitchPlan? best = null;
        foreach (bool lastFirst in new[] { true, false })
        {
            foreach (bool otherBlocksOnly in new[] { true, false })
            {
                for (int startSlot = 0; startSlot <= chunks * costs.Blocks; startSlot++)
                {
                    var plan = Greedy(costs, chunks, startSlot, lastFirst, otherBlocksOnly);
                    if (best is null || Better(plan, best, maxBothBlocks))
                    {
                        best = plan;
                    }
                }
            }
        }

        // Back to back: every load queued at one slot, so the loader never idles (best when loads
        // dominate), in a few orders.
        int n = costs.Blocks;
        int[][] orders =
        [
            [.. Enumerable.Range(0, n).Reverse()],
            [.. Enumerable.Range(0, n)],
            [.. Enumerable.Range(0, n).OrderBy(b => costs.LoadG2[b])],
            [.. Enumerable.Range(0, n).OrderByDescending(b => costs.LoadG2[b])],
        ];
        for (int startSlot = 0; startSlot <= chunks * n; startSlot++)
        {
            foreach (var order in orders)
            {
                var plan = Simulate(costs, chunks, [.. order.Select(b => new SwitchStep(b, startSlot))]);
                if (Better(plan, best!, maxBothBlocks))
                {
                    best = plan;
                }
            }
        }

        return Improve(costs, chunks, best!, maxBothBlocks);
    }

    private static bool Better(SwitchPlan a, SwitchPlan b, int maxBothBlocks)
    {
        int overA = Math.Max(0, a.PeakBothBlocks - maxBothBlocks), overB = Math.Max(0, b.PeakBothBlocks - maxBothBlocks);
        return overA != overB ? overA < overB : a.ReadyMs < b.ReadyMs - 1e-9;
    }

    /// <summary>
    /// Hill climbing from a plan: move one load's start slot within its neighbours' range, pull it
    /// back to its predecessor's slot (back to back), or swap two adjacent loads; keep any change that
    /// lowers the ready time, until none does.
    /// </summary>
    public static SwitchPlan Improve(BlockCosts costs, int chunks, SwitchPlan plan, int maxBothBlocks = int.MaxValue)
    {
        int slots = costs.Blocks * chunks;
        var best = plan;
        for (int round = 0; round < 500; round++)
        {
            var steps = best.Steps.ToArray();
            SwitchPlan? better = null;
            void Try(SwitchStep[] candidate)
            {
                var p = Simulate(costs, chunks, candidate);
                if (Better(p, better ?? best, maxBothBlocks))
                {
                    better = p;
                }
            }

            for (int k = 0; k < steps.Length; k++)
            {
                int lo = k == 0 ? 0 : steps[k - 1].StartSlot, hi = k == steps.Length - 1 ? slots : steps[k + 1].StartSlot;
                foreach (int s in new[] { lo, steps[k].StartSlot - 1, steps[k].StartSlot + 1, hi })
                {
                    if (s >= lo && s <= hi && s != steps[k].StartSlot)
                    {
                        var c = (SwitchStep[])steps.Clone();
                        c[k] = c[k] with { StartSlot = s };
                        Try(c);
                    }
                }

                if (k + 1 < steps.Length)
                {
                    var c = (SwitchStep[])steps.Clone();
                    (c[k], c[k + 1]) = (c[k + 1] with { StartSlot = c[k].StartSlot }, c[k] with { StartSlot = c[k + 1].StartSlot });
                    Try(c);
                }
            }

            if (better is null)
            {
                break;
            }

            best = better;
        }

        return best;
    }

    /// <summary>
    /// Eq. 1-2 from a starting slot: for the next block to switch P_j (from the last backwards) and the
    /// next slot to compute P_i, k* = min{k ≥ 1 : load(P_j) ≤ Σ_{l&lt;k} compute(P_{i+l})}; the load of P_j
    /// starts at slot i and the next load at slot i + k*.
    /// </summary>
    /// <param name="lastFirst">Switch P_N first, then backwards (the paper); false switches P_1 first.</param>
    /// <param name="otherBlocksOnly">Keep P_j's own slot out of the window that hides its load (it would stall).</param>
    public static SwitchPlan Greedy(BlockCosts costs, int chunks, int startSlot, bool lastFirst = true, bool otherBlocksOnly = true)
    {
        int n = costs.Blocks, slots = n * chunks;
        var switched = new bool[n];
        var steps = new List<SwitchStep>();
        int i = Math.Min(startSlot, slots);
        foreach (int j in lastFirst ? Enumerable.Range(0, n).Reverse() : Enumerable.Range(0, n))
        {
            // The window must be made of *other* blocks: if P_j itself would compute before its load is
            // covered, start the load right after P_j's slot instead.
            int end;
            while (true)
            {
                end = i;
                double covered = 0;
                bool hitsSelf = false;
                while (end < slots && covered < costs.LoadG2[j])
                {
                    int b = end % n;
                    if (b == j && otherBlocksOnly)
                    {
                        hitsSelf = true;
                        break;
                    }

                    covered += switched[b] ? costs.ComputeG2[b] : costs.ComputeG1[b];
                    end++;
                }

                if (!hitsSelf)
                {
                    break;
                }

                i = end + 1;
            }

            steps.Add(new SwitchStep(j, Math.Min(i, slots)));
            switched[j] = true;
            i = Math.Min(end, slots);
        }

        return Simulate(costs, chunks, steps);
    }

    /// <summary>Plays a plan out: when each load runs, when each slot computes, on which graph, and the stalls.</summary>
    public static SwitchPlan Simulate(BlockCosts costs, int chunks, IReadOnlyList<SwitchStep> steps)
    {
        costs.Validate();
        int n = costs.Blocks, slots = n * chunks;
        if (steps.Select(s => s.Block).Distinct().Count() != steps.Count || steps.Any(s => s.Block < 0 || s.Block >= n || s.StartSlot < 0 || s.StartSlot > slots))
        {
            throw new ArgumentException("a plan switches each block at most once, at slots 0..blocks×chunks.");
        }

        for (int k = 1; k < steps.Count; k++)
        {
            if (steps[k].StartSlot < steps[k - 1].StartSlot)
            {
                throw new ArgumentException("loads run one at a time in plan order: start slots must not decrease.");
            }
        }

        var loadStart = new double[n];
        var loadEnd = new double[n];
        Array.Fill(loadStart, double.PositiveInfinity);
        Array.Fill(loadEnd, double.PositiveInfinity);
        var switchedAt = new double[n];
        Array.Fill(switchedAt, double.NaN);
        double t = 0, loaderFree = 0, stall = 0;
        int next = 0;
        for (int s = 0; s < slots; s++)
        {
            while (next < steps.Count && steps[next].StartSlot == s)
            {
                int b = steps[next++].Block;
                loadStart[b] = Math.Max(loaderFree, t);
                loadEnd[b] = loaderFree = loadStart[b] + costs.LoadG2[b];
            }

            int blk = s % n;
            if (loadStart[blk] <= t || loadStart[blk] < double.PositiveInfinity && loadStart[blk] < t + costs.ComputeG1[blk])
            {
                // Its load has started (or would start during this compute): wait for it, then run G2.
                if (loadEnd[blk] > t)
                {
                    stall += loadEnd[blk] - t;
                    t = loadEnd[blk];
                }

                if (double.IsNaN(switchedAt[blk]))
                {
                    switchedAt[blk] = t;
                }

                t += costs.ComputeG2[blk];
            }
            else
            {
                t += costs.ComputeG1[blk];
            }
        }

        while (next < steps.Count)
        {
            int b = steps[next++].Block;
            loadStart[b] = Math.Max(loaderFree, t);
            loadEnd[b] = loaderFree = loadStart[b] + costs.LoadG2[b];
        }

        // A block whose load starts after its last wide computation frees G1 first (it needs it no more).
        var events = steps.SelectMany(st => new[] { (T: loadStart[st.Block], D: 1), (T: double.IsNaN(switchedAt[st.Block]) ? loadStart[st.Block] : switchedAt[st.Block], D: -1) })
            .OrderBy(e => e.T).ThenBy(e => e.D);
        int both = 0, peak = 0;
        foreach (var e in events)
        {
            both += e.D;
            peak = Math.Max(peak, both);
        }

        return new SwitchPlan(steps, t, steps.Count == 0 ? 0 : loaderFree, stall, peak);
    }

    /// <summary>Loading every G2 after prefill, one after another: the synchronous baseline.</summary>
    public static SwitchPlan Synchronous(BlockCosts costs, int chunks) =>
        Simulate(costs, chunks, [.. Enumerable.Range(0, costs.Blocks).Reverse().Select(b => new SwitchStep(b, costs.Blocks * chunks))]);

    /// <summary>The best plan by exhaustive search (every switch order, every start slot): small instances only, for tests.</summary>
    public static SwitchPlan BruteForce(BlockCosts costs, int chunks)
    {
        costs.Validate();
        int n = costs.Blocks, slots = n * chunks;
        if (n > 6 || slots > 16)
        {
            throw new ArgumentException("brute force is for at most 6 blocks and 16 slots.");
        }

        SwitchPlan? best = null;
        foreach (var order in Permutations(Enumerable.Range(0, n).ToArray()))
        {
            var starts = new int[n];
            void Rec(int k, int min)
            {
                if (k == n)
                {
                    var plan = Simulate(costs, chunks, [.. order.Select((b, idx) => new SwitchStep(b, starts[idx]))]);
                    if (best is null || plan.ReadyMs < best.ReadyMs - 1e-9)
                    {
                        best = plan;
                    }

                    return;
                }

                for (int s = min; s <= slots; s++)
                {
                    starts[k] = s;
                    Rec(k + 1, s);
                }
            }

            Rec(0, 0);
        }

        return best!;
    }

    private static IEnumerable<int[]> Permutations(int[] items)
    {
        if (items.Length <= 1)
        {
            yield return items;
            yield break;
        }

        for (int i = 0; i < items.Length; i++)
        {
            int[] rest = [.. items[..i], .. items[(i + 1)..]];
            foreach (var p in Permutations(rest))
            {
                yield return [items[i], .. p];
            }
        }
    }
}
