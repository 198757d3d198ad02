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
    /// ready now whose next step is one token on the width-1 graph (plain, or a speculative root alone), or, for a speculative session whose next step is a tree, every other one ready
    /// now whose next tree has the same width; null: one session per run. <paramref name="width"/>: the rows per slot.
    /// </summary>
    public static List<DeviceSession>? Group(PackingMode mode, bool trees, OrtModelRuntime runtime, DeviceSession pick, IEnumerable<DeviceSession> decoding, out int width)
    {
        width = pick.NarrowPackable ? 1 : trees ? pick.NextTreeWidth : 0;
        if (mode == PackingMode.Off || width == 0)
        {
            return null;
        }

        int w = width;
        Func<DeviceSession, bool> alike = w == 1 ? s => s.NarrowPackable : s => !s.PlainDecoding && s.NextTreeWidth == w;
        List<DeviceSession> group = [pick, .. decoding.Where(s => s != pick && !s.Stepping && s.Ready && !s.Cancellation.IsCancellationRequested && alike(s)).Take(OrtModelRuntime.PackedSlotCounts[^1] - 1)];
        int bucket = group.Max(s => w == 1 ? s.NarrowBucket : s.TreeBucket(w));
        bool pays = mode == PackingMode.Always || Pays(runtime, group.Count, bucket, w);
        return group.Count > 1 && pays ? group : null;
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
    /// Tells each speculative session what a width-1 step would cost it in a packed run with the others
    /// decoding now (<see cref="StepPolicy.NarrowShareMs"/>), before its width is chosen: the width budget
    /// across sessions, so that under concurrency speculation does not lose to packed plain decoding.
    /// </summary>
    public static void PriceNarrowSteps(PackingMode mode, OrtModelRuntime runtime, List<DeviceSession> decoding)
    {
        bool packing = mode != PackingMode.Off && decoding.Count > 1;
        foreach (var s in decoding.Where(s => s.Speculative && !s.Stepping))
        {
            int bucket = s.NarrowBucket;
            s.PriceNarrowStep(packing ? StepPolicy.NarrowShareMs(packing, decoding.Count, runtime.RecentRunMs(1, bucket),
                runtime.PackedCostRatio(OrtModelRuntime.PackedSlots(decoding.Count), bucket)) : null);
        }
    }
}
