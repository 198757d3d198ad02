namespace CoordGen.Engine.Runtime;

/// <summary>The faults a <see cref="FaultPlan"/> can inject, by where they strike.</summary>
public enum FaultKind
{
    /// <summary>A device step throws (a driver or runtime error).</summary>
    DeviceException,

    /// <summary>A device step stalls, then throws as a timed-out step would (a stand-in: no watchdog ends a real hung run yet).</summary>
    DeviceHang,

    /// <summary>A device step returns NaN logits; the runtime's finiteness check catches them.</summary>
    NonFiniteLogits,

    /// <summary>The drafter throws while building a tree; the step degrades to plain verification.</summary>
    DrafterCrash,

    /// <summary>The calibrator throws during prefill; the request continues without calibration.</summary>
    CalibratorCrash,

    /// <summary>A session actor is killed; its supervisor restarts it and it resumes (actor layer).</summary>
    SessionKill,

    /// <summary>The device actor crashes; its back-off supervisor starts a new one (on the same runtime, unless that is turned off) and every request on it resumes (actor layer).</summary>
    DeviceActorCrash,
}

/// <summary>
/// Hooks the runtime calls at the points where real hardware and software fail. Production code runs
/// with none; tests and <c>coordgen bench faults</c> plug in a <see cref="FaultPlan"/>.
/// </summary>
public interface IFaultInjector
{
    /// <summary>Before a device step (may throw, or stall and time out).</summary>
    void OnDeviceStep();

    /// <summary>
    /// Whether the graph run about to start hangs: the device then keeps computing (real runs of the same
    /// graph, one after another) past <see cref="HangLimit"/>, until the runtime's step watchdog ends one
    /// mid-run through <c>RunOptions.Terminate</c>. Asked only of watched runs with the watchdog on.
    /// </summary>
    bool TakeHang();

    /// <summary>The step limit a hung run is held to (the graph's own limit is for real, unforced runs).</summary>
    TimeSpan HangLimit { get; }

    /// <summary>After a device step, on its logits (may corrupt them).</summary>
    void OnLogits(Span<float> logits);

    /// <summary>Before the drafter builds a tree (may throw).</summary>
    void OnDraft();

    /// <summary>Before the calibrator takes a prefill chunk's top-k (may throw).</summary>
    void OnCalibrate();
}

/// <summary>A fault the plan injected on purpose (never thrown in production).</summary>
public sealed class InjectedFaultException(FaultKind kind, string message) : Exception(message)
{
    public FaultKind Kind { get; } = kind;
}

/// <summary>The device misbehaved (bad output, no answer in time). The step's results are discarded.</summary>
public sealed class DeviceFaultException(string message) : Exception(message);

/// <summary>
/// A seeded fault schedule: after a random number of device steps (uniform in 1..2×<see cref="MeanGap"/>)
/// one fault of a random enabled kind is armed, and fires at the next hook of its kind (or is re-picked
/// if that hook does not come within 4 device steps), until
/// <see cref="Budget"/> faults have fired. Session kills are collected by the actor layer through
/// <see cref="TryTakeSessionKill"/>. Thread-safe; the same seed gives the same schedule of kinds.
/// </summary>
public sealed class FaultPlan : IFaultInjector
{
    private readonly object _gate = new();
    private readonly Random _rng;
    private readonly FaultKind[] _kinds;
    private readonly int[] _fired = new int[Enum.GetValues<FaultKind>().Length];
    private int _countdown;
    private FaultKind? _armed;
    private int _armedAge;

    public FaultPlan(int seed, int budget, int meanGap, IEnumerable<FaultKind>? kinds = null, TimeSpan? hang = null)
    {
        _rng = new Random(seed);
        Budget = budget;
        MeanGap = Math.Max(1, meanGap);
        _kinds = [.. kinds ?? Enum.GetValues<FaultKind>()];
        if (_kinds.Length == 0)
        {
            throw new ArgumentException("a fault plan needs at least one fault kind.");
        }

        Hang = hang ?? TimeSpan.FromMilliseconds(20);
        _countdown = NextGap();
    }

    public int Budget { get; }

    private bool _hang;

    public TimeSpan HangLimit => Hang;

    public bool TakeHang()
    {
        lock (_gate)
        {
            bool hang = _hang;
            _hang = false;
            return hang;
        }
    }


    public int MeanGap { get; }

    /// <summary>The kinds this plan picks from.</summary>
    public IReadOnlyList<FaultKind> Kinds => _kinds;

    /// <summary>How long an injected hang runs before the step watchdog ends it (or, with the watchdog off, stalls before the step throws).</summary>
    public TimeSpan Hang { get; }

    public int Injected
    {
        get
        {
            lock (_gate)
            {
                return _fired.Sum();
            }
        }
    }

    public bool Exhausted => Injected >= Budget;

    public IReadOnlyDictionary<FaultKind, int> ByKind
    {
        get
        {
            lock (_gate)
            {
                return Enum.GetValues<FaultKind>().ToDictionary(k => k, k => _fired[(int)k]);
            }
        }
    }

    /// <summary>
    /// Raised (on the device's thread, outside the plan's lock) when a fault that strikes actors is armed
    /// (<see cref="FaultKind.SessionKill"/>, <see cref="FaultKind.DeviceActorCrash"/>): the actor layer takes it
    /// with <see cref="TryTakeSessionKill"/> / <see cref="TryTakeDeviceActorCrash"/> and delivers it.
    /// </summary>
    public event Action<FaultKind>? ActorFaultArmed;

    public void OnDeviceStep()
    {
        FaultKind? fire, actor = null;
        lock (_gate)
        {
            if (_armed is not null && ++_armedAge > 4)
            {
                // Its hook did not come round (no drafting in plain decoding, no prefill in a long
                // decode): pick again, so the plan keeps firing whatever the workload exercises.
                _armed = null;
                _countdown = 0;
            }

            if (_armed is null && _fired.Sum() < Budget && --_countdown <= 0)
            {
                _armed = _kinds[_rng.Next(_kinds.Length)];
                _armedAge = 0;
                _countdown = NextGap();
                actor = _armed is FaultKind.SessionKill or FaultKind.DeviceActorCrash ? _armed : null;
            }

            fire = _armed is FaultKind.DeviceException or FaultKind.DeviceHang ? Take() : null;
        }

        if (actor is { } kind)
        {
            ActorFaultArmed?.Invoke(kind);
        }

        if (fire == FaultKind.DeviceHang)
        {
            // The runtime asks (TakeHang) at its next watched run; one with its watchdog off stalls instead (OrtModelRuntime.StallIfHungUnwatched).
            lock (_gate)
            {
                _hang = true;
            }

            return;
        }

        if (fire == FaultKind.DeviceException)
        {
            throw new InjectedFaultException(FaultKind.DeviceException, "injected: the device step threw");
        }
    }

    public void OnLogits(Span<float> logits)
    {
        lock (_gate)
        {
            if (_armed != FaultKind.NonFiniteLogits)
            {
                return;
            }

            Take();
        }

        logits[_rng.Next(logits.Length)] = float.NaN;
    }

    public void OnDraft() => FireIf(FaultKind.DrafterCrash, "injected: the drafter crashed");

    public void OnCalibrate() => FireIf(FaultKind.CalibratorCrash, "injected: the calibrator crashed");

    /// <summary>True once per armed session kill: the actor layer then kills a live session actor.</summary>
    public bool TryTakeSessionKill() => TryTake(FaultKind.SessionKill);

    /// <summary>True once per armed device-actor crash: the actor layer then crashes the device actor.</summary>
    public bool TryTakeDeviceActorCrash() => TryTake(FaultKind.DeviceActorCrash);

    private bool TryTake(FaultKind kind)
    {
        lock (_gate)
        {
            if (_armed != kind)
            {
                return false;
            }

            Take();
            return true;
        }
    }

    private void FireIf(FaultKind kind, string message)
    {
        lock (_gate)
        {
            if (_armed != kind)
            {
                return;
            }

            Take();
        }

        throw new InjectedFaultException(kind, message);
    }

    private FaultKind Take()
    {
        var k = _armed!.Value;
        _fired[(int)k]++;
        _armed = null;
        return k;
    }

    private int NextGap() => _rng.Next(1, (2 * MeanGap) + 1);
}
