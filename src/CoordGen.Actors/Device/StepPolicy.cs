using CoordGen.Messages;

namespace CoordGen.Actors.Device;

/// <summary>
/// Which kind of work the device runs next, by queue depth: a prefill chunk or a decode step. Decoding
/// sessions are served round-robin; a prefill chunk comes after every <c>max(1, decoding / prefilling)</c>
/// decode steps, so a deep decode queue does not starve new requests' time to first token and a burst
/// of new prompts does not stall running streams for long; and at once when every ready stream would ride
/// in the chunk's run (decision 0026). Whether runs are packed or mixed, and how long a tree waits for a pack,
/// are decided here too. Pure functions, table-tested.
/// </summary>
public static class StepPolicy
{
    /// <summary>
    /// Prefill against decode, from a snapshot of the queues alone: a prefill chunk when one is due
    /// (<see cref="PrefillNext"/>), when no decoding session is ready, or when the chunk's run would carry
    /// every ready session's step too (<see cref="QueueSnapshot.ChunkCarriesReady"/>: then a decode step of
    /// their own would only cost a run), or while a chosen chunk waits for trees to carry or for verdicts on their way
    /// (<see cref="QueueSnapshot.ChunkWaiting"/>), else a decode step; the chunk's width by <see cref="ChunkWidth"/>
    /// (narrow between running streams, so a newcomer's long prompt costs each of them about one chunk per
    /// round of their steps, never the whole prompt at once).
    /// </summary>
    public static StepChoice Rebalance(QueueSnapshot q)
    {
        bool chunkDue = PrefillNext(q.Prefilling, q.Decoding, q.DecodeStepsSinceChunk) || (q.Prefilling > 0 && (q.ChunkCarriesReady || q.ChunkWaiting));
        if (!chunkDue && q.ReadyDecoding > 0)
        {
            return StepChoice.Decode;
        }

        if (q.Prefilling == 0)
        {
            return q.ReadyDecoding > 0 ? StepChoice.Decode : StepChoice.Idle;
        }

        return new StepChoice(ChunkWidth(q.Decoding, q.PrefillWidth, q.InterleavedWidth));
    }

    /// <summary>
    /// Whether <paramref name="sessions"/> plain sessions should share one packed run, given what a packed run
    /// of their slot count costs over a plain step (<paramref name="costRatio"/>, null: never measured, so
    /// pack to learn): only when it promises at least <paramref name="gainRequired"/> of a plain step's time
    /// per session or less. Packed step times swing and the host's work between runs is not in them, so a
    /// pack that merely breaks even is not taken (decision 0016).
    /// </summary>
    /// <param name="plainStepMs">A plain step's recent time: below <paramref name="minPlainStepMs"/> the step is
    /// bound by per-operator and host overhead, not by reading weights, and packing does not pay (the 3M
    /// demo model's 1 ms steps lost 10-36% packed; the 135M twin's 12-26 ms steps gained 1.4x).</param>
    public static bool PackPays(double? costRatio, int sessions, double? plainStepMs = null, double gainRequired = 0.75, double minPlainStepMs = 5) =>
        sessions > 1 && !(plainStepMs < minPlainStepMs) && (costRatio is not { } r || r < gainRequired * sessions);

    /// <summary>
    /// Whether decode steps should ride in a prefill chunk's run (a mixed run, decision 0026) instead of running on their
    /// own: when the mixed run's recent time (<paramref name="mixedMs"/>) is below the chunk alone
    /// (<paramref name="chunkMs"/>) plus <paramref name="gainRequired"/> of the riders' own run
    /// (<paramref name="ridersMs"/>); while any of them is unknown, yes (to learn). Never on steps too short to pack
    /// (<see cref="PackPays"/>'s floor on <paramref name="plainStepMs"/>).
    /// </summary>
    public static bool MixPays(double? mixedMs, double? chunkMs, double? ridersMs, double? plainStepMs, double gainRequired = 0.75, double minPlainStepMs = 5) =>
        !(plainStepMs < minPlainStepMs) && (mixedMs is not { } m || chunkMs is not { } c || ridersMs is not { } r || m < c + (gainRequired * r));

    /// <summary>
    /// What one of <paramref name="riders"/> width-1 steps costs the device when it rides in a prefill chunk's run of
    /// <paramref name="chunkWidth"/> rows (a mixed run, decision 0026): its share of the rows, of the chunk alone's recent
    /// time (<paramref name="chunkMs"/>; null while that is not timed). Not the mixed run's time less the chunk alone:
    /// mixed runs are timed across the prompt's buckets and a chunk alone in one, and late in a long prompt the
    /// difference read 5-20 ms for one rider where a scratch timing in one bucket gave about 1 ms (decision 0033).
    /// Adaptive width weighs a speculative session's root alone at this price while a prompt waits.
    /// </summary>
    public static double? RiderShareMs(double? chunkMs, int riders, int chunkWidth) =>
        riders < 1 || chunkMs is not { } c ? null : c / (chunkWidth + riders);

    /// <summary>
    /// What one session's step of some width costs when it rides in a packed run of that width with the other
    /// sessions: the solo run's time times the packed run's measured cost ratio, shared by the sessions; null
    /// when packing is off, there is no one to pack with, or packing would not pay (<see cref="PackPays"/>).
    /// Adaptive width weighs the width at this cost, so a speculative tree has to beat a share of a packed
    /// width-1 run, and a packed tree costs its session a share too.
    /// </summary>
    public static double? PackedShareMs(bool packing, int sessions, double? soloMs, double? packedCostRatio) =>
        packing && soloMs is { } solo && packedCostRatio is { } ratio && PackPays(ratio, sessions, solo) ? solo * ratio / sessions : null;

    /// <summary>
    /// Whether a speculative session's tree waits a moment before its run, for <paramref name="coming"/> other
    /// speculative sessions whose verdict or next tree is on its way to the device, so that they share one
    /// packed run instead of a lone run and then a late pack: at most <paramref name="share"/> of a solo run
    /// of that width (<paramref name="stepMs"/>) since the wait began (<paramref name="heldMs"/>), never for
    /// steps too short to pack (<see cref="PackPays"/>'s floor) or before the width's time is known.
    /// <paramref name="leftMs"/>: how much longer it may wait.
    /// </summary>
    public static bool HoldForPack(int coming, double heldMs, double? stepMs, out double leftMs, double share = 0.15, double minStepMs = 5)
    {
        leftMs = stepMs is { } ms ? (share * ms) - heldMs : 0;
        return coming > 0 && stepMs >= minStepMs && leftMs > 0;
    }

    /// <summary>
    /// Whether a chosen prefill chunk waits a moment before its run: for <paramref name="ridingTrees"/> speculative
    /// sessions on their way whose trees would ride in it (decision 0029), as a tree waits for a pack
    /// (<see cref="HoldForPack"/>, <paramref name="rideShare"/> of the chunk's own run <paramref name="chunkMs"/>); else
    /// for <paramref name="verdicts"/> verdicts on their way from the verifier, at most <paramref name="verdictShare"/>
    /// of it, so that the verifier does not compete with the chunk's run for the cores (<see cref="Packing.HoldChunk"/>).
    /// </summary>
    public static bool HoldChunk(int ridingTrees, int verdicts, double heldMs, double? chunkMs, out double leftMs, double rideShare = 0.15, double verdictShare = 0.05) =>
        ridingTrees > 0 ? HoldForPack(ridingTrees, heldMs, chunkMs, out leftMs, rideShare) : HoldForPack(verdicts, heldMs, chunkMs, out leftMs, verdictShare);

    public static bool PrefillNext(int prefilling, int decoding, int decodeStepsSinceChunk) =>
        prefilling > 0 && (decoding == 0 || decodeStepsSinceChunk >= Math.Max(1, decoding / prefilling));

    /// <summary>
    /// Tokens in the next prefill chunk: the full prefill width when no session waits to decode (the
    /// prompt goes through fastest), the interleaved width while sessions decode, so a chunk between
    /// their steps costs them about one round of decode steps rather than several.
    /// </summary>
    public static int ChunkWidth(int decoding, int prefillWidth, int interleavedWidth) =>
        decoding > 0 ? Math.Min(interleavedWidth, prefillWidth) : prefillWidth;

    /// <summary>
    /// The next decoding session, round-robin from <paramref name="next"/>: the first ready one. Sessions
    /// not ready at their turn (a draft still on the drafter, a reader behind) move back one place instead
    /// of waiting a whole round: the one picked takes the head's slot in <paramref name="rotation"/> and
    /// <paramref name="next"/> moves past it, so a stream whose draft was late by a moment steps right
    /// after, not a round later. Null when none is ready.
    /// </summary>
    public static T? NextDecode<T>(List<T> rotation, ref int next, Func<T, bool> ready)
        where T : class
    {
        int count = rotation.Count;
        for (int i = 0; i < count; i++)
        {
            var a = rotation[(next + i) % count];
            if (!ready(a))
            {
                continue;
            }

            for (int j = i; j > 0; j--)
            {
                int at = (next + j) % count, before = (next + j - 1) % count;
                (rotation[at], rotation[before]) = (rotation[before], rotation[at]);
            }

            next = (next + 1) % count;
            return a;
        }

        return null;
    }

    /// <summary>
    /// Takes <paramref name="item"/> out of the rotation and keeps <paramref name="next"/> on the session
    /// whose turn it was: the sessions after a removed one move down a place, so without this the one
    /// whose turn came next was passed over for a whole round whenever an earlier session finished.
    /// False when the item was not in the rotation.
    /// </summary>
    public static bool Remove<T>(List<T> rotation, T item, ref int next)
        where T : class
    {
        int at = rotation.IndexOf(item);
        if (at < 0)
        {
            return false;
        }

        rotation.RemoveAt(at);
        if (at < next)
        {
            next--;
        }

        if (next >= rotation.Count)
        {
            next = 0;
        }

        return true;
    }
}
