using System.Collections.Immutable;

namespace CoordGen.Messages;

/// <summary>Messages about the runtime's load and its sessions' lifecycle (supervisor, sessions, device back-off).</summary>
public static class SupervisionProtocol
{
    /// <summary>Host → supervisor: how loaded is the runtime? Reply: <see cref="Load"/>.</summary>
    public sealed record GetLoad
    {
        public static readonly GetLoad Instance = new();
    }

    /// <summary>Requests running or queued, and the most admitted at once (<c>MaxPending</c>).</summary>
    public sealed record Load(int Pending, int MaxPending);

    /// <summary>Session → supervisor: the session ended (its place in the admission count is free).</summary>
    public sealed record SessionFinished(SessionId SessionId);

    /// <summary>
    /// The device's back-off supervisor → requester, instead of a reply, while the device is down between a
    /// crash and its restart: try again shortly.
    /// </summary>
    public sealed record DeviceRestarting
    {
        public static readonly DeviceRestarting Instance = new();
    }
}

/// <summary>
/// Diagnostics and fault hooks, kept out of the production protocol: benchmarks, tests and the fault
/// injection of apps that host CoordGen use them; a server that is not testing never sends them.
/// </summary>
public static class DiagnosticsProtocol
{
    /// <summary>Fault injection: kill one live session actor (it is restarted and resumes). Reply: bool, whether one was live.</summary>
    public sealed record KillRandomSession
    {
        public static readonly KillRandomSession Instance = new();
    }

    /// <summary>Fault injection: crash the device actor (its back-off supervisor starts a new one; its requests resume). The supervisor forwards it to the device, which throws on it.</summary>
    public sealed record CrashDevice
    {
        public static readonly CrashDevice Instance = new();
    }

    /// <summary>Device: pack plain decoding sessions into one device run (true) or run one session per step (false), from the next step on; benchmarks compare the two on one loaded runtime. No reply.</summary>
    public sealed record SetPackedSteps(bool Packed);

    /// <summary>Device: with packing, let one-token steps ride in prefill chunks' runs (true) or run chunks alone (false), from the next step on (decision 0026); benchmarks compare the two. No reply.</summary>
    public sealed record SetMixedSteps(bool Mixed);

    /// <summary>
    /// Device: use the prefix cache (true) or prefill every prompt whole (false), from the next prompt on;
    /// either way the cache is emptied first, so benchmarks start each variant cold. No reply.
    /// </summary>
    public sealed record SetPrefixCache(bool Enabled);

    /// <summary>Device: what its prefix cache holds and has done. Reply: <see cref="PrefixCacheStats"/> (after the step under way, if any).</summary>
    public sealed record GetPrefixCache
    {
        public static readonly GetPrefixCache Instance = new();
    }

    /// <summary>
    /// The device's prefix cache: whether it is in use, its blocks and bytes now, and since the device
    /// started: prompts looked up, hits, prompt tokens reused and prefilled, blocks evicted.
    /// </summary>
    public sealed record PrefixCacheStats(bool Enabled, int Blocks, long Bytes, long Lookups, long Hits, long TokensReused, long TokensPrefilled, long Evictions)
    {
        /// <summary>Blocks pinned for in-prompt context stores.</summary>
        public int PinnedBlocks { get; init; }
    }

    /// <summary>Ask the supervisor for the device (its back-off supervisor, which forwards to it), for benchmarks that read its timeline. Reply: the actor reference.</summary>
    public sealed record GetDevice
    {
        public static readonly GetDevice Instance = new();
    }

    /// <summary>Device: the queue depths. Reply: <see cref="Queues"/>.</summary>
    public sealed record GetQueues
    {
        public static readonly GetQueues Instance = new();
    }

    /// <summary>Runs prefilling, decoding, and admitted but waiting for room under the KV memory budget.</summary>
    public sealed record Queues(int Prefilling, int Decoding, int Waiting);

    /// <summary>Device: its last rebalancing decisions with the snapshots they were taken from, oldest first (up to 4,096). Reply: <see cref="StepDecisions"/>.</summary>
    public sealed record GetStepDecisions
    {
        public static readonly GetStepDecisions Instance = new();
    }

    /// <summary>Rebalancing decisions: each snapshot and what the device chose from it.</summary>
    public sealed record StepDecisions(ImmutableArray<(QueueSnapshot Snapshot, StepChoice Choice)> Decisions);

    /// <summary>Device: the timeline of device steps, drafts and verifications (Stopwatch timestamps). Reply: <see cref="Overlap"/>.</summary>
    public sealed record GetOverlap
    {
        public static readonly GetOverlap Instance = new();
    }

    /// <summary>
    /// Device step, drafter and verifier intervals since the device started. <paramref name="Paced"/>: steps paced
    /// by a device profile; <paramref name="Overran"/>: those whose real compute took longer than the profile
    /// allowed. <paramref name="PrefillMs"/> / <paramref name="DecodeMs"/>: device time in prefill chunks and decode steps.
    /// <paramref name="DraftsAhead"/>: trees the drafter drafted ahead (for the likely outcome of the step in flight) that were used.
    /// <paramref name="DecodeRuns"/> / <paramref name="DecodeSessionSteps"/>: decode runs, and the sessions they stepped (more than one a run when packed).
    /// </summary>
    public sealed record Overlap(ImmutableArray<Interval> Device, ImmutableArray<Interval> Drafts, ImmutableArray<Interval> Verifies,
        int Paced, int Overran, double PrefillMs, double DecodeMs, int DraftsAhead, int DecodeRuns = 0, int DecodeSessionSteps = 0);
}

/// <summary>
/// The device's queues when it chooses its next step: everything the rebalancing of prefill against
/// decode reads (<c>StepPolicy.Rebalance</c>), so a logged decision can be replayed.
/// </summary>
/// <param name="Prefilling">Runs admitted and not yet decoding (each gets chunks until its prompt is in).</param>
/// <param name="PrefillTokens">Prompt tokens left over all of them (reported with each decision; the rule spaces chunks by runs, not tokens).</param>
/// <param name="Decoding">Decoding sessions, ready or not (one briefly waiting still counts toward the chunk's spacing).</param>
/// <param name="ReadyDecoding">Decoding sessions ready for a step now.</param>
/// <param name="DecodeStepsSinceChunk">Decode steps since the last prefill chunk.</param>
/// <param name="PrefillWidth">The widest prefill graph.</param>
/// <param name="InterleavedWidth">Tokens per chunk between other sessions' decode steps.</param>
/// <param name="ChunkCarriesReady">Every ready decoding session would take its step in the next chunk's run (a mixed run, decision 0026), and no speculative session is about to be ready: the chunk serves the streams too.</param>
public readonly record struct QueueSnapshot(int Prefilling, int PrefillTokens, int Decoding, int ReadyDecoding, int DecodeStepsSinceChunk, int PrefillWidth, int InterleavedWidth, bool ChunkCarriesReady = false);

/// <summary>What the device runs next: a prefill chunk of <paramref name="PrefillTokens"/> tokens, a decode step (0), or nothing (-1: no run can step now).</summary>
public readonly record struct StepChoice(int PrefillTokens)
{
    public static readonly StepChoice Decode = new(0);

    public static readonly StepChoice Idle = new(-1);

    public bool Prefill => PrefillTokens > 0;
}
