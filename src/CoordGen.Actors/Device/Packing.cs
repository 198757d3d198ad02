using System.Collections.Immutable;
using System.Diagnostics;
using CoordGen.Engine.Runtime;
using CoordGen.Messages;

namespace CoordGen.Actors.Device;

/// <summary>When plain decoding sessions ready together share one device run.</summary>
public enum PackingMode
{
    /// <summary>Never: one session per run.</summary>
    Off,

    /// <summary>When the runtime's recent step times say a packed run costs clearly less per session (<c>CoordGenOptions.PackedSteps</c>).</summary>
    WhenItPays,

    /// <summary>Whenever two or more are ready (tests of the mechanism; graphs compile on first use).</summary>
    Always,
}

/// <summary>The device's packing decision, from its runtime's measured step times.</summary>
internal static class Packing
{
    /// <summary>
    /// The sessions that ride with <paramref name="pick"/> in one packed run, when that pays: every other session
    /// ready now whose next step is one token on the width-1 graph (plain, or a speculative root alone), or, for a
    /// speculative session whose next step is a tree (with <paramref name="trees"/>), every other one ready now
    /// whose next step is a tree. Trees share one width, up to the widest any of them wants, and which width and which
    /// of them is the width budget's choice (<see cref="WidthBudget.Choose"/>: of the packs that pay, the one that leaves
    /// the fewest of them to runs of their own, then the most expected tokens per millisecond; a wider tree keeps its
    /// first nodes, a narrower one is padded; a session without room in its cache for that width is left out), told to <paramref name="decided"/> with its snapshot; without
    /// <paramref name="budget"/>, the widest pack that pays (<see cref="WidthBudget.Widest"/>, for comparisons). Null: one
    /// session per run. <paramref name="width"/>: the rows per slot.
    /// </summary>
    public static List<DeviceSession>? Group(PackingMode mode, bool trees, OrtModelRuntime runtime, DeviceSession pick, IEnumerable<DeviceSession> decoding, out int width, bool budget = true, Action<WidthBudgetSnapshot, WidthBudgetChoice>? decided = null)
    {
        width = pick.NarrowPackable ? 1 : trees ? pick.NextTreeWidth : 0;
        if (mode == PackingMode.Off || width == 0)
        {
            return null;
        }

        bool narrow = width == 1;
        Func<DeviceSession, bool> alike = narrow ? s => s.NarrowPackable : s => !s.PlainDecoding && s.NextTreeWidth >= 2;
        List<DeviceSession> ready = [pick, .. decoding.Where(s => s != pick && !s.Stepping && s.Ready && !s.Cancellation.IsCancellationRequested && alike(s)).Take(OrtModelRuntime.PackedSlotCounts[^1] - 1)];
        if (ready.Count < 2)
        {
            return null;
        }

        if (narrow)
        {
            // All of them, or else the first of them that fill a smaller graph (a 16-slot run with 4 slots idle
            // may not pay where an 8-slot run of 8 does).
            foreach (int n in PackSizes(ready.Count))
            {
                var first = ready.GetRange(0, n);
                if (mode == PackingMode.Always || Pays(runtime, n, first.Max(s => s.NarrowBucket)))
                {
                    return first;
                }
            }

            return null;
        }

        // Several trees' rows cost more than one tree's (a pack of 8 trees of 8 is 64 rows): the width budget weighs each
        // width's first pack that may run (all the trees it holds, or a smaller graph's worth where that does not pay) by
        // the tokens its members expect per millisecond.
        int widest = ready.Max(s => s.NextTreeWidth);
        int[] widths = [.. runtime.Widths.Where(w => w >= 2 && w <= widest).OrderDescending()];
        var byId = ready.ToDictionary(s => s.Id);
        var snapshot = new WidthBudgetSnapshot([.. widths], [.. ready.Select(s => new BudgetSession(s.Id, [.. widths.Select(w => s.RoomForTree(w) ? s.ExpectedTokens(w) : 0)]))], []);
        var options = ImmutableArray.CreateBuilder<BudgetOption>();
        var buckets = new Dictionary<(int Width, int Sessions), int>();
        for (int at = 0; at < widths.Length; at++)
        {
            int w = widths[at];
            foreach (int n in PackSizes(snapshot.Sessions.Count(s => s.Expected[at] > 0)))
            {
                if (WidthBudget.Members(snapshot, at, n) is { } members)
                {
                    var o = Option(mode, runtime, w, n, buckets[(w, n)] = members.Max(m => byId[m.Session].TreeBucket(w)));
                    options.Add(o);
                    if (o.Pays || o.Learn)
                    {
                        break; // the budget weighs the first pack of each width that may run: no smaller graph is asked after it (nor compiled)
                    }
                }
            }
        }

        snapshot = WidthBudget.WithProbes(snapshot with { Options = options.ToImmutable() },
            o => runtime.ProbeRefusedPack(OrtModelRuntime.PackedSlots(o.Sessions), o.Width, buckets[(o.Width, o.Sessions)]));
        var choice = budget ? WidthBudget.Choose(snapshot) : WidthBudget.Widest(snapshot);
        decided?.Invoke(snapshot, choice);
        if (!choice.Packed)
        {
            return null;
        }

        width = choice.Width;
        return [.. choice.Members.Select(id => byId[id])];
    }

    /// <summary>
    /// The sessions whose next steps ride in <paramref name="chunk"/>'s prefill chunk of <paramref name="width"/>
    /// tokens (a mixed run), with <paramref name="chunk"/> first; null: the chunk runs alone. Every other session ready now
    /// whose next step is one token, one row each: plain sessions (decision 0026) and speculative roots alone, which
    /// ride while a prompt waits (decision 0033); with none, every ready speculative session whose next step is a tree, at
    /// the widest of their widths (<paramref name="riderWidth"/>; those with room for it), each tree in a slot of that
    /// many rows (decision 0029). Up to the largest graph's slots less the chunk's, when the runtime can mix
    /// (GroupQueryAttention packing, the graph compiled, room for the padded chunk in any cache this prompt can fill)
    /// and mixing pays (<see cref="StepPolicy.MixPays"/>, against the riders' own packed run).
    /// <paramref name="trees"/>: trees may ride (packed trees on, <c>CoordGenOptions.PackedTrees</c>).
    /// <paramref name="chosen"/>: the chunk is the step the device runs now, so a refused mix may be tried again
    /// (<see cref="OrtModelRuntime.ProbeRefusedMix"/>) and, while the chunk alone has no recent time in its bucket, a
    /// chunk now and then runs alone to measure it (<see cref="OrtModelRuntime.ProbeChunkAlone"/>); false: a question
    /// that runs nothing.
    /// </summary>
    public static List<DeviceSession>? Riders(PackingMode mode, bool trees, OrtModelRuntime runtime, DeviceSession chunk, IEnumerable<DeviceSession> decoding, int width, bool chosen, out int riderWidth)
    {
        riderWidth = 1;
        if (mode == PackingMode.Off || width < 2 || !runtime.PackedInPlace || chunk.Request.Prompt.Count + width > runtime.Capacity)
        {
            return null;
        }

        // One-token steps first (plain, and speculative roots alone: StepPrices prices them below a tree while a prompt
        // waits, decision 0033), then trees.
        int most = OrtModelRuntime.PackedSlotCounts[^1] - 1;
        var ready = decoding.Where(s => !s.Stepping && s.Ready && !s.Cancellation.IsCancellationRequested).ToList();
        List<DeviceSession> riders = [.. ready.Where(s => s.NarrowPackable).Take(most)];
        if (riders.Count == 0 && trees && ready.Where(s => s.NextTreeWidth >= 2).ToList() is { Count: > 0 } withTrees)
        {
            int w = riderWidth = Math.Min(withTrees.Max(s => s.NextTreeWidth), OrtModelRuntime.MaxTreeWidth);
            riders = [.. withTrees.Where(s => s.RoomForTree(w)).Take(most)];
        }

        if (riders.Count == 0)
        {
            return null;
        }

        // Trees do not wait out a chunk run alone to time it: the chunk comes right after their own run (the chunk waits
        // for them, HoldChunk), so the probe would put two runs in their gap; a mixed run costs less than its parts
        // anyway (62 against 59 + 46 ms, 87 against 54 + 49 on the twin), and its riders are charged by rows till then.
        int rw = riderWidth;
        if (mode != PackingMode.Always && chosen && rw == 1 && ChunkAloneMs(runtime, chunk, width, nearest: true) is null && runtime.ProbeChunkAlone(width))
        {
            return null;
        }

        bool pays = mode == PackingMode.Always || MixPays(runtime, chunk, width, riders, riders.Count, rw) || (chosen && runtime.ProbeRefusedMix(riders.Count, width, rw));
        return pays && runtime.MixedReady(riders.Count, width, rw) ? [chunk, .. riders] : null;
    }

    /// <summary>
    /// How much longer a prefill chunk waits; null: run now. Three waits:
    /// <list type="bullet">
    /// <item>for the speculative sessions whose verdict or next tree is on its way, so that their trees ride in its run
    /// (decision 0029) instead of the chunk running alone between their packed runs (after a tree run every member is on
    /// its way: without the wait no tree would ever ride). Only with <paramref name="trees"/>, while no plain session is
    /// ready (those ride now) and the trees would ride (the mixed graph compiled and the mix paying, as
    /// <see cref="Riders"/> decides), at most as long as <see cref="Hold"/> waits for a pack (a share of the chunk's own
    /// run; <see cref="PackingMode.Always"/>: up to 50 ms, for tests on tiny models);</item>
    /// <item>for the verdicts of speculative sessions whose roots ride without their trees (decision 0033), as long as for
    /// trees: back in time, each rides in this chunk instead of the next;</item>
    /// <item>else for the verdicts of the sessions whose step just ran (<see cref="DeviceSession.AwaitingVerdict"/>), at most
    /// a smaller share of the chunk's own run (<see cref="StepPolicy.HoldChunk"/>). A verdict takes the verifier tens of microseconds on an idle CPU,
    /// but a run holds both cores of this machine: the verifier yields its core after each verdict, and under a run the
    /// yield came back 2.6-4.5 ms later (the spans of <c>bench rebalance</c>'s worst gap), so each next session's
    /// verification waited that long: the streams' tokens reached them later and their next trees were drafted late.</item>
    /// </list>
    /// </summary>
    public static TimeSpan? HoldChunk(PackingMode mode, bool trees, OrtModelRuntime runtime, DeviceSession? chunk, IReadOnlyCollection<DeviceSession> decoding, int chunkWidth, ref long holdSince)
    {
        int coming = trees && chunk is not null && mode != PackingMode.Off && runtime.PackedInPlace && !decoding.Any(s => s.Ready && s.PlainDecoding) ? decoding.Count(s => s.Coming) : 0;
        bool ride = coming > 0 && chunk is not null && (mode == PackingMode.Always || TreesWouldRide(runtime, chunk, decoding, chunkWidth));
        int verdicts = chunk is null || ride ? 0 : decoding.Count(s => s.AwaitingVerdict);
        int roots = verdicts == 0 ? 0 : decoding.Count(s => s.AwaitingVerdict && s.RootAloneRides); // they ride once back: wait as for trees
        if (!ride && verdicts == 0)
        {
            holdSince = 0;
            return null;
        }

        holdSince = holdSince == 0 ? Stopwatch.GetTimestamp() : holdSince;
        double held = Stopwatch.GetElapsedTime(holdSince).TotalMilliseconds;
        double leftMs = 50 - held;
        if ((ride && mode == PackingMode.Always) ? leftMs > 0 : StepPolicy.HoldChunk(ride ? coming : roots, verdicts, held, ChunkAloneMs(runtime, chunk!, chunkWidth, nearest: roots > 0), out leftMs))
        {
            return TimeSpan.FromMilliseconds(leftMs);
        }

        holdSince = 0;
        return null;
    }

    // Whether the ready trees and those on their way would ride in the chunk's run (Riders' rule): at the ready ones'
    // width, or, with none ready yet, at some compiled tree width, the mixed graph compiled and the mix paying.
    private static bool TreesWouldRide(OrtModelRuntime runtime, DeviceSession chunk, IReadOnlyCollection<DeviceSession> decoding, int chunkWidth)
    {
        var trees = decoding.Where(s => s.Coming || (s.Ready && s.NextTreeWidth >= 2)).ToList();
        int n = Math.Min(trees.Count, OrtModelRuntime.PackedSlotCounts[^1] - 1), readyWidth = trees.Max(s => s.NextTreeWidth);
        IEnumerable<int> widths = readyWidth >= 2 ? [Math.Min(readyWidth, OrtModelRuntime.MaxTreeWidth)] : runtime.Widths.Where(w => w >= 2 && w <= OrtModelRuntime.MaxTreeWidth);
        return widths.Any(w => MixPays(runtime, chunk, chunkWidth, trees, n, w) && runtime.MixedReady(n, chunkWidth, w));
    }

    // Whether a mixed run of n riders of rw rows each pays (StepPolicy.MixPays): its recent time against the chunk alone
    // (in the bucket its cache will be in) and the riders' own run (a packed run of them, or one step), in their bucket.
    internal static bool MixPays(OrtModelRuntime runtime, DeviceSession chunk, int chunkWidth, IReadOnlyList<DeviceSession> riders, int n, int rw)
    {
        int bucket = riders.Max(s => rw == 1 ? s.NarrowBucket : s.TreeBucket(rw));
        double? alone = n > 1 ? runtime.RecentPackedRunMs(OrtModelRuntime.PackedSlots(n), bucket, rw) : runtime.RecentRunMs(rw, bucket);
        return StepPolicy.MixPays(runtime.RecentMixedRunMs(n, chunkWidth, rw), ChunkAloneMs(runtime, chunk, chunkWidth), alone, runtime.RecentRunMs(rw, bucket));
    }

    // The recent time of a chunk of this width alone, in the bucket the chunk's cache will be in; with nearest, until a chunk
    // has run alone there, in the nearest smaller bucket where one has (a chunk costs a little more further up a prompt:
    // 39, 46, 55 ms at 2, 35 and 72% of 2,048 on the twin). Riders' probe, the riders' price and the wait for riding roots'
    // verdicts take the nearest, so a chunk runs alone to be timed only while no bucket has a time: every such chunk puts
    // two runs into each rider's gap (decision 0034). The mix's price and the other waits keep to the bucket, as before.
    internal static double? ChunkAloneMs(OrtModelRuntime runtime, DeviceSession chunk, int width, bool nearest = false)
    {
        int done = chunk.Request.Prompt.Count - chunk.PrefillTokensLeft;
        int bucket = runtime.Buckets.FirstOrDefault(b => b >= done + width, runtime.Capacity);
        return runtime.RecentRunMs(width, bucket) ?? (nearest
            ? runtime.Buckets.Where(b => b < bucket).OrderDescending().Select(b => runtime.RecentRunMs(width, b)).FirstOrDefault(ms => ms is not null)
            : null);
    }

    // Sessions to try packing, most first: all of the ready ones, then each smaller graph's slot count.
    private static IEnumerable<int> PackSizes(int ready) =>
        new[] { ready }.Concat(OrtModelRuntime.PackedSlotCounts.Where(s => s < ready).OrderDescending()).Where(n => n >= 2);

    /// <summary>
    /// How much longer a decode step waits for the speculative sessions whose verdict or next tree is on its way
    /// (<see cref="StepPolicy.HoldForPack"/>), so that they share a packed tree run instead of a lone run and then a
    /// late pack; null: step now. Only when every ready session's next step is a tree (a width-1 or plain step
    /// would run now anyway), the pack is not full, and a pack of the ready and coming trees would pay.
    /// <paramref name="holdSince"/>: when the wait began (0: not waiting), kept by the device between calls.
    /// </summary>
    public static TimeSpan? Hold(PackingMode mode, bool trees, OrtModelRuntime runtime, IReadOnlyCollection<DeviceSession> decoding, ref long holdSince)
    {
        int most = OrtModelRuntime.PackedSlotCounts[^1];
        var ready = decoding.Where(s => s.Ready && !s.Cancellation.IsCancellationRequested).ToList();
        int coming = trees && mode != PackingMode.Off && ready.Count > 0 && ready.Count < most && ready.All(s => s.NextTreeWidth >= 2) ? decoding.Count(s => s.Coming) : 0;
        int w = coming > 0 ? ready.Max(s => s.NextTreeWidth) : 0;
        int bucket = coming > 0 ? ready.Max(s => s.TreeBucket(w)) : 0;
        if (coming == 0 || !(mode == PackingMode.Always || Pays(runtime, Math.Min(ready.Count + coming, most), bucket, w, probe: false)))
        {
            holdSince = 0;
            return null;
        }

        holdSince = holdSince == 0 ? Stopwatch.GetTimestamp() : holdSince;
        if (StepPolicy.HoldForPack(coming, Stopwatch.GetElapsedTime(holdSince).TotalMilliseconds, runtime.RecentRunMs(w, bucket), out double leftMs))
        {
            return TimeSpan.FromMilliseconds(leftMs);
        }

        holdSince = 0;
        return null;
    }

    /// <summary>
    /// Packing pays when a packed run costs clearly less per session than a plain run (<see cref="StepPolicy.PackPays"/>): on a model whose steps are
    /// bound by reading its weights, several sessions' rows cost little more than one; on a tiny model bound
    /// by compute and per-operator overhead they may cost more. Decided from the runtime's recent run times
    /// (<see cref="OrtModelRuntime.PackedCostRatio"/>: in the pack's KV bucket, else in the buckets measured so
    /// far); until a slot count is measured at all it packs, to learn, but only onto a graph already compiled (<see cref="OrtModelRuntime.PackedReady"/>
    /// compiles the others in the background): a compile never stalls a step.
    /// </summary>
    /// <param name="bucket">The largest KV bucket among the pack's sessions.</param>
    /// <param name="probe">Whether a refused pack may run anyway to be measured again (<see cref="OrtModelRuntime.ProbeRefusedPack"/>); false for a question that runs nothing.</param>
    public static bool Pays(OrtModelRuntime runtime, int sessions, int bucket, int width = 1, bool probe = true)
    {
        // A refused pack runs now and then all the same, so a bad measurement does not refuse it for good.
        var o = Option(PackingMode.WhenItPays, runtime, width, sessions, bucket);
        return o.Pays || o.Learn || (probe && o.Refused && runtime.ProbeRefusedPack(OrtModelRuntime.PackedSlots(sessions), width, bucket));
    }

    // A pack of <paramref name="sessions"/> slots of <paramref name="width"/> rows as the runtime's recent times classify it
    // (WidthBudget.Option): learned per slot count and width, in this bucket or (until it is measured here) in the others.
    private static BudgetOption Option(PackingMode mode, OrtModelRuntime runtime, int width, int sessions, int bucket)
    {
        int slots = OrtModelRuntime.PackedSlots(sessions);
        double? soloMs = runtime.RecentRunMs(width, bucket);
        bool always = mode == PackingMode.Always;

        // Steps too short to gain are never packed: no graph compiles for them either (PackedReady compiles in the background).
        bool ready = always || (StepPolicy.PackPays(null, sessions, soloMs) && runtime.PackedReady(sessions, width, bucket));
        return WidthBudget.Option(width, sessions, soloMs, runtime.PackedCostRatio(slots, bucket, width), runtime.RecentPackedRunMs(slots, bucket, width), ready, always);
    }
}
