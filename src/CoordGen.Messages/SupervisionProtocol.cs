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

    /// <summary>Device: with packing, let plain sessions' one-token steps and speculative sessions' trees ride in prefill chunks' runs (true) or run chunks alone (false), from the next step on (decisions 0026, 0029); benchmarks compare the two. No reply.</summary>
    public sealed record SetMixedSteps(bool Mixed);

    /// <summary>Device: with packed trees, let the width budget choose each pack's width and members (true, decision 0028) or take the widest pack that pays (false), from the next step on; benchmarks compare the two. No reply.</summary>
    public sealed record SetWidthBudget(bool Budget);

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

    /// <summary>Device: its last width-budget decisions for packed trees with the snapshots they were taken from, oldest first (up to 4,096). Reply: <see cref="WidthDecisions"/>.</summary>
    public sealed record GetWidthDecisions
    {
        public static readonly GetWidthDecisions Instance = new();
    }

    /// <summary>Width-budget decisions: each snapshot and what the device chose from it.</summary>
    public sealed record WidthDecisions(ImmutableArray<(WidthBudgetSnapshot Snapshot, WidthBudgetChoice Choice)> Decisions);

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
/// <param name="ChunkWaiting">A chunk already chosen waits a moment, for the trees on their way to carry them or for the verdicts on their way (decision 0029 and its addendum): it stays the choice as they arrive.</param>
public readonly record struct QueueSnapshot(int Prefilling, int PrefillTokens, int Decoding, int ReadyDecoding, int DecodeStepsSinceChunk, int PrefillWidth, int InterleavedWidth, bool ChunkCarriesReady = false, bool ChunkWaiting = false);

/// <summary>What the device runs next: a prefill chunk of <paramref name="PrefillTokens"/> tokens, a decode step (0), or nothing (-1: no run can step now).</summary>
public readonly record struct StepChoice(int PrefillTokens)
{
    public static readonly StepChoice Decode = new(0);

    public static readonly StepChoice Idle = new(-1);

    public bool Prefill => PrefillTokens > 0;
}

/// <summary>
/// What the width budget across sessions reads when speculative sessions' trees could share one packed run
/// (<c>WidthBudget.Choose</c>, decision 0028), so a logged decision can be replayed.
/// </summary>
/// <param name="Widths">The widths a pack may take, widest first (graph widths of 2 or more, up to the widest any of the sessions wants).</param>
/// <param name="Sessions">The sessions whose next step is a tree and that are ready now, the device's round-robin pick first.</param>
/// <param name="Options">Each pack the device weighed: a width and a number of sessions, widest and most first.</param>
public sealed record WidthBudgetSnapshot(ImmutableArray<int> Widths, ImmutableArray<BudgetSession> Sessions, ImmutableArray<BudgetOption> Options);

/// <summary>
/// One ready tree session in a <see cref="WidthBudgetSnapshot"/>: its expected tokens if its tree is verified at each of
/// the snapshot's widths (the root's token plus each verified node's estimated chance of acceptance), 0 where its cache
/// has no room for a tree that wide.
/// </summary>
public sealed record BudgetSession(SessionRun Session, ImmutableArray<double> Expected);

/// <summary>
/// A pack the device could run: <paramref name="Sessions"/> trees of <paramref name="Width"/> rows in one run.
/// </summary>
/// <param name="Ms">The recent time of such a run in the sessions' KV bucket (null: never measured).</param>
/// <param name="Pays">It costs clearly less per session than a run of one tree (the rule of <c>StepPolicy.PackPays</c>), and its graph is compiled.</param>
/// <param name="Learn">Its time is unknown, or it was refused long enough to be measured again: run it to learn.</param>
/// <param name="Refused">Its measured time says it does not pay (it may be measured again now and then).</param>
public readonly record struct BudgetOption(int Width, int Sessions, double? Ms, bool Pays, bool Learn, bool Refused = false);

/// <summary>
/// The budget's choice: the width and the sessions of the packed tree run, with the tokens it expects and the time it
/// prices the run at; <see cref="None"/> when no pack pays (the pick steps alone).
/// </summary>
public sealed record WidthBudgetChoice(int Width, ImmutableArray<SessionRun> Members, double ExpectedTokens, double? Ms)
{
    public static readonly WidthBudgetChoice None = new(0, [], 0, null);

    public bool Packed => Width >= 2 && Members.Length >= 2;

    /// <summary>Same width and members, in order (records compare arrays by reference).</summary>
    public bool SameAs(WidthBudgetChoice other) => other is not null && Width == other.Width && Members.SequenceEqual(other.Members);
}
