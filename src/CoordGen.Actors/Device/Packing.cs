using System.Diagnostics;
using CoordGen.Engine.Runtime;

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
    /// whose next step is a tree, at <paramref name="pick"/>'s width or, when a pack of that width does not pay,
    /// the widest narrower tree width that does (a wider tree keeps its first nodes, a narrower one is padded);
    /// null: one session per run. <paramref name="width"/>: the rows per slot.
    /// </summary>
    public static List<DeviceSession>? Group(PackingMode mode, bool trees, OrtModelRuntime runtime, DeviceSession pick, IEnumerable<DeviceSession> decoding, out int width)
    {
        width = pick.NarrowPackable ? 1 : trees ? pick.NextTreeWidth : 0;
        if (mode == PackingMode.Off || width == 0)
        {
            return null;
        }

        bool narrow = width == 1;
        Func<DeviceSession, bool> alike = narrow ? s => s.NarrowPackable : s => !s.PlainDecoding && s.NextTreeWidth >= 2;
        List<DeviceSession> group = [pick, .. decoding.Where(s => s != pick && !s.Stepping && s.Ready && !s.Cancellation.IsCancellationRequested && alike(s)).Take(OrtModelRuntime.PackedSlotCounts[^1] - 1)];
        if (group.Count < 2)
        {
            return null;
        }

        // Several trees' rows cost more than one tree's (a pack of 8 trees of 8 is 64 rows): a narrower pack may pay where the pick's width does not.
        int widest = width;
        int[] widths = narrow ? [1] : [.. runtime.Widths.Where(w => w >= 2 && w <= widest).OrderDescending()];
        foreach (int w in widths)
        {
            int bucket = group.Max(s => narrow ? s.NarrowBucket : s.TreeBucket(w));
            if (mode == PackingMode.Always || Pays(runtime, group.Count, bucket, w))
            {
                width = w;
                return group;
            }
        }

        return null;
    }

    /// <summary>
    /// How much longer <paramref name="pick"/>'s tree waits for the speculative sessions whose verdict or next tree is
    /// on its way, so that they share its packed run (<see cref="StepPolicy.HoldForPack"/>); null: run now.
    /// <paramref name="holdSince"/>: when the wait began (0: not waiting), kept by the device between calls.
    /// </summary>
    public static TimeSpan? Hold(PackingMode mode, bool trees, OrtModelRuntime runtime, DeviceSession pick, IEnumerable<DeviceSession> decoding, ref long holdSince)
    {
        int w = pick.NextTreeWidth;
        int coming = w >= 2 && trees && mode != PackingMode.Off ? decoding.Count(s => s.Coming) : 0;
        holdSince = coming == 0 ? 0 : holdSince == 0 ? Stopwatch.GetTimestamp() : holdSince;
        double held = holdSince == 0 ? 0 : Stopwatch.GetElapsedTime(holdSince).TotalMilliseconds;
        if (StepPolicy.HoldForPack(coming, held, runtime.RecentRunMs(w, pick.TreeBucket(w)), out double leftMs))
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
    public static bool Pays(OrtModelRuntime runtime, int sessions, int bucket, int width = 1)
    {
        double? soloMs = runtime.RecentRunMs(width, bucket);

        // Steps too short to gain are never packed: no graph compiles for them either.
        if (!StepPolicy.PackPays(null, sessions, soloMs) || !runtime.PackedReady(sessions, width, bucket))
        {
            return false;
        }

        // Learned per slot count and width, in this bucket or (until it is measured here) in the others.
        return StepPolicy.PackPays(runtime.PackedCostRatio(OrtModelRuntime.PackedSlots(sessions), bucket, width), sessions, soloMs);
    }

    /// <summary>
    /// Tells each speculative session what a step would cost it in a packed run with the others decoding now
    /// (<see cref="StepPolicy.PackedShareMs"/>), before its width is chosen: width 1 shared with every decoding
    /// session, and, with <paramref name="trees"/>, each tree width shared with the speculative ones. The width
    /// budget across sessions: under concurrency speculation does not lose to packed plain decoding, and a
    /// tree that packs is not priced as a whole run.
    /// </summary>
    public static void PriceSharedSteps(PackingMode mode, bool trees, OrtModelRuntime runtime, List<DeviceSession> decoding)
    {
        bool packing = mode != PackingMode.Off && decoding.Count > 1;
        int speculative = decoding.Count(s => s.Speculative);
        foreach (var s in decoding.Where(s => s.Speculative && !s.Stepping))
        {
            if (!packing)
            {
                s.PriceSharedSteps(null);
                continue;
            }

            var shares = new Dictionary<int, double>();
            void Price(int width, int sessions, int bucket)
            {
                if (StepPolicy.PackedShareMs(packing, sessions, runtime.RecentRunMs(width, bucket),
                    runtime.PackedCostRatio(OrtModelRuntime.PackedSlots(sessions), bucket, width)) is { } ms)
                {
                    shares[width] = ms;
                }
            }

            Price(1, decoding.Count, s.NarrowBucket);
            if (trees && speculative > 1)
            {
                foreach (int w in runtime.Widths.Where(w => w >= 2 && w <= TreeWidthLimit))
                {
                    Price(w, speculative, s.TreeBucket(w));
                }
            }

            s.PriceSharedSteps(shares.Count == 0 ? null : shares);
        }
    }

    // Verification widths (prefill chunk widths above it are never a tree's).
    private const int TreeWidthLimit = 16;
}
