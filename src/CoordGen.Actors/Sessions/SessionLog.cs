using System.Diagnostics;
using Akka.Actor;
using CoordGen.Messages;

namespace CoordGen.Actors.Sessions;

/// <summary>
/// A session's committed tokens and attempt epochs. It outlives restarts of its session actor: each
/// incarnation takes it over in turn, and only that actor touches it (no lock).
/// </summary>
public sealed class SessionLog
{
    private readonly List<int> _committed = [];
    private readonly List<double> _recoveries = [];
    private long _faultAt;

    private int _incarnations;

    /// <summary>The current attempt's number (0 before the first).</summary>
    public int Epoch { get; private set; }

    /// <summary>The device that admitted the current attempt (null until one has): it takes <see cref="DeviceProtocol.CancelRun"/> directly.</summary>
    public IActorRef? Device { get; set; }

    /// <summary>Numbers each incarnation of the session actor (its outbox's key).</summary>
    public int NextIncarnation() => ++_incarnations;

    /// <summary>Milliseconds from each fault to the next token committed after it.</summary>
    public IReadOnlyList<double> Recoveries => _recoveries;

    public int[] Snapshot() => [.. _committed];

    /// <summary>Begins the next attempt: tokens of earlier ones are no longer committed.</summary>
    public int NextEpoch()
    {
        Device = null;
        return ++Epoch;
    }

    public void MarkFault()
    {
        if (_faultAt == 0)
        {
            _faultAt = Stopwatch.GetTimestamp();
        }
    }

    /// <summary>A token of the current attempt reached the caller's channel.</summary>
    public void Commit(int token)
    {
        _committed.Add(token);
        if (_faultAt != 0)
        {
            _recoveries.Add(Stopwatch.GetElapsedTime(_faultAt).TotalMilliseconds);
            _faultAt = 0;
        }
    }
}
