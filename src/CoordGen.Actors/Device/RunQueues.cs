namespace CoordGen.Actors.Device;

/// <summary>
/// The device's runs by phase: waiting for room under the KV memory budget (they hold no cache yet),
/// prefilling, decoding (in round-robin order). Runs resuming a session after a fault go first in
/// each line (their callers have waited already); while others wait, a newcomer waits behind them even
/// if a cache has just freed. Keeps the queue-depth metric. The device actor's mailbox thread only.
/// </summary>
internal sealed class RunQueues(int maxActive)
{
    private int _next;

    public List<DeviceSession> Waiting { get; } = [];

    public List<DeviceSession> Prefilling { get; } = [];

    public List<DeviceSession> Decoding { get; } = [];

    public IEnumerable<DeviceSession> All => Decoding.Concat(Prefilling).Concat(Waiting);

    /// <summary>A newly admitted run: prefilling if the budget has room, else waiting.</summary>
    public void Admit(DeviceSession s)
    {
        bool wait = maxActive > 0 && (Waiting.Count > 0 || Prefilling.Count + Decoding.Count >= maxActive);
        Enter(wait ? Waiting : Prefilling, wait ? "waiting" : "prefill", s);
    }

    /// <summary>Starts waiting runs while the KV memory budget has room (a finished run frees its cache).</summary>
    public void StartWaiting()
    {
        while (Waiting.Count > 0 && (maxActive <= 0 || Prefilling.Count + Decoding.Count < maxActive))
        {
            var s = Waiting[0];
            Leave(Waiting, "waiting", s);
            Enter(Prefilling, "prefill", s);
        }
    }

    /// <summary>The run's prefill is done: it joins the decoding rotation. False if it was not prefilling.</summary>
    public bool StartDecoding(DeviceSession s)
    {
        if (!Leave(Prefilling, "prefill", s))
        {
            return false;
        }

        Decoding.Add(s);
        Depth("decode", 1);
        return true;
    }

    /// <summary>The next decoding run that is ready, in round-robin order; null when none is.</summary>
    public DeviceSession? NextDecode() => StepPolicy.NextDecode(Decoding, ref _next, s => s.Ready);

    /// <summary>Takes the run out of whichever line holds it.</summary>
    public void Remove(DeviceSession s)
    {
        Leave(Prefilling, "prefill", s);
        Leave(Waiting, "waiting", s);
        if (StepPolicy.Remove(Decoding, s, ref _next))
        {
            Depth("decode", -1);
        }
    }

    private static void Enter(List<DeviceSession> queue, string phase, DeviceSession s)
    {
        queue.Insert(s.Run.Resumed ? queue.Count(q => q.Run.Resumed) : queue.Count, s);
        Depth(phase, 1);
    }

    private static bool Leave(List<DeviceSession> queue, string phase, DeviceSession s)
    {
        bool removed = queue.Remove(s);
        if (removed)
        {
            Depth(phase, -1);
        }

        return removed;
    }

    private static void Depth(string phase, int delta) => Telemetry.QueueDepth.Add(delta, new KeyValuePair<string, object?>("phase", phase));
}
