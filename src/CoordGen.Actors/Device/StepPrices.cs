using CoordGen.Engine.Runtime;

namespace CoordGen.Actors.Device;

/// <summary>
/// What a step of each width would cost each speculative session, told to it before its width is chosen
/// (<see cref="DeviceSession.PriceSharedSteps"/>): adaptive width then weighs its widths by tokens per millisecond
/// of the device's time, as the device would spend it, not as a run alone would.
/// </summary>
internal static class StepPrices
{
    /// <summary>
    /// Prices every speculative session's widths: width 1 shared with every decoding session in a packed run, and,
    /// with <paramref name="trees"/>, each tree width shared with the speculative ones (<see cref="StepPolicy.PackedShareMs"/>;
    /// under concurrency speculation does not lose to packed plain decoding, and a tree that packs is not priced as a
    /// whole run). While a prompt waits to be prefilled (<paramref name="chunk"/>, with mixed steps), width 1 costs
    /// at most what riding in the chunk's run costs (<see cref="StepPolicy.RiderShareMs"/>, decision 0033): the chunk
    /// runs anyway, so a root alone beside it costs the device a few rows, where a tree of its own costs a run that
    /// delays the prompt.
    /// </summary>
    public static void Price(PackingMode mode, bool trees, OrtModelRuntime runtime, List<DeviceSession> decoding, DeviceSession? chunk, int chunkWidth)
    {
        bool packing = mode != PackingMode.Off && decoding.Count > 1;
        int speculative = decoding.Count(s => s.Speculative && (s.Ready || s.Coming));
        double? riding = chunk is null ? null : RiderShareMs(mode, runtime, chunk, decoding, chunkWidth);
        foreach (var s in decoding.Where(s => s.Speculative && !s.Stepping))
        {
            var shares = new Dictionary<int, double>();
            void Price(int width, int sessions, int bucket)
            {
                sessions = Math.Min(sessions, OrtModelRuntime.PackedSlotCounts[^1]); // one run holds at most the largest graph's slots
                if (StepPolicy.PackedShareMs(packing, sessions, runtime.RecentRunMs(width, bucket),
                    runtime.PackedCostRatio(OrtModelRuntime.PackedSlots(sessions), bucket, width)) is { } ms)
                {
                    shares[width] = ms;
                }
            }

            if (packing)
            {
                Price(1, decoding.Count, s.NarrowBucket);
                if (trees && speculative > 1)
                {
                    foreach (int w in runtime.Widths.Where(w => w >= 2 && w <= OrtModelRuntime.MaxTreeWidth))
                    {
                        Price(w, speculative, s.TreeBucket(w));
                    }
                }
            }

            if (riding is { } ride)
            {
                shares[1] = shares.TryGetValue(1, out double packed) ? Math.Min(packed, ride) : ride;
            }

            s.PriceSharedSteps(shares.Count == 0 ? null : shares, rootAlone: riding is not null);
        }
    }

    /// <summary>
    /// Prices every speculative session for the chunk's run (<see cref="Price"/>), then asks who would ride in it
    /// (<see cref="Packing.Riders"/>, a question that runs nothing). When no one would while a session counts as ready only
    /// because its root may ride without its tree, prices a decode step's instead, so that a decode step is never chosen
    /// with nothing to run.
    /// </summary>
    public static List<DeviceSession>? ForChunk(PackingMode mode, bool packTrees, bool mixedTrees, OrtModelRuntime runtime, DeviceSession chunk, List<DeviceSession> decoding, int chunkWidth)
    {
        Price(mode, packTrees, runtime, decoding, chunk, chunkWidth);
        var riders = Packing.Riders(mode, packTrees && mixedTrees, runtime, chunk, decoding, chunkWidth, chosen: false, out _);
        if (riders is null && decoding.Any(s => s.ReadyWithoutTree))
        {
            Price(mode, packTrees, runtime, decoding, null, 0);
        }

        return riders;
    }

    // What one width-1 rider costs in the next chunk's run, when the decoding sessions would ride in it (Packing.Riders'
    // conditions: packing, in-place caches, room for the chunk, the mixed graph compiled and the mix paying); else null.
    private static double? RiderShareMs(PackingMode mode, OrtModelRuntime runtime, DeviceSession chunk, List<DeviceSession> decoding, int chunkWidth)
    {
        int n = Math.Min(decoding.Count, OrtModelRuntime.PackedSlotCounts[^1] - 1);
        if (mode == PackingMode.Off || n == 0 || chunkWidth < 2 || !runtime.PackedInPlace || chunk.Request.Prompt.Count + chunkWidth > runtime.Capacity
            || !(mode == PackingMode.Always || Packing.MixPays(runtime, chunk, chunkWidth, decoding, n, 1)) || !runtime.MixedReady(n, chunkWidth, 1))
        {
            return null;
        }

        // The chunk alone in its bucket or the nearest smaller one timed, or (until a chunk has run alone at all) a mixed
        // run of as many riders, which is a few rows dearer.
        return StepPolicy.RiderShareMs(Packing.ChunkAloneMs(runtime, chunk, chunkWidth, nearest: true) ?? runtime.RecentMixedRunMs(n, chunkWidth), n, chunkWidth);
    }
}
