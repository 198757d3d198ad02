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
    /// <summary>The sessions that ride with <paramref name="pick"/> in one packed run: every other plain decoding session ready now, when that pays; null: one session per run.</summary>
    public static List<DeviceSession>? Group(PackingMode mode, OrtModelRuntime runtime, DeviceSession pick, IEnumerable<DeviceSession> decoding)
    {
        if (mode == PackingMode.Off || !pick.PlainDecoding)
        {
            return null;
        }

        List<DeviceSession> group = [pick, .. decoding.Where(s => s != pick && s.PlainDecoding && !s.Stepping && s.Ready && !s.Request.Cancellation.IsCancellationRequested).Take(OrtModelRuntime.PackedSlotCounts[^1] - 1)];
        bool pays = mode == PackingMode.Always || Pays(runtime, group.Count, group.Max(s => s.PlainBucket));
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
    public static bool Pays(OrtModelRuntime runtime, int sessions, int bucket)
    {
        double? plainMs = runtime.RecentRunMs(1, bucket);

        // Steps too short to gain are never packed: no graph compiles for them either.
        if (!StepPolicy.PackPays(null, sessions, plainMs) || !runtime.PackedReady(sessions, 1, bucket))
        {
            return false;
        }

        // Learned per slot count, in this bucket or (until it is measured here) in the others.
        return StepPolicy.PackPays(runtime.PackedCostRatio(OrtModelRuntime.PackedSlots(sessions), bucket), sessions, plainMs);
    }
}
