using CoordGen.Engine.Runtime;

namespace CoordGen.Actors.Device;

/// <summary>
/// Keeps the device's runtime (its compiled graphs) across device-actor restarts. Building a runtime
/// compiles every graph and takes seconds; a device actor that crashed in its own code left the
/// runtime as it was, so the next device borrows the same one and resumes sessions in milliseconds.
/// <para>A runtime comes back only when the device that held it is done with it: after the step still
/// running off its mailbox thread has ended. If that step threw, the runtime is disposed and the next
/// device builds a new one, so a runtime that failed mid-run is never trusted again. Only one device
/// holds the runtime at a time.</para>
/// </summary>
public sealed class RuntimeKeeper : IDisposable
{
    private readonly Func<OrtModelRuntime> _create;
    private readonly bool _reuse;
    private readonly TimeSpan _waitForReturn;
    private readonly object _gate = new();
    private OrtModelRuntime? _kept;
    private TaskCompletionSource? _returning;
    private bool _disposed;

    /// <param name="create">Builds a runtime (compiles its graphs).</param>
    /// <param name="reuse">False: every device builds its own runtime and disposes it when it stops.</param>
    /// <param name="waitForReturn">How long a starting device waits for the previous device's last step to end before it builds a runtime of its own.</param>
    public RuntimeKeeper(Func<OrtModelRuntime> create, bool reuse = true, TimeSpan? waitForReturn = null)
    {
        _create = create;
        _reuse = reuse;
        _waitForReturn = waitForReturn ?? TimeSpan.FromSeconds(5);
    }

    /// <summary>Runtimes built so far (1 while every restart reused the first).</summary>
    public int Built { get; private set; }

    /// <summary>Times a device got the runtime a previous device held.</summary>
    public int Reused { get; private set; }

    /// <summary>
    /// The runtime for a starting device: the one the previous device gave back, or a new one. Waits,
    /// at most the configured time, for a runtime still finishing a step under a stopped device.
    /// </summary>
    public OrtModelRuntime Borrow()
    {
        Task? returning;
        lock (_gate)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            returning = _returning?.Task;
        }

        if (returning is not null && !returning.IsCompleted)
        {
            returning.Wait(_waitForReturn);
        }

        lock (_gate)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            _returning = null;
            if (_kept is { } kept)
            {
                _kept = null;
                Reused++;
                return kept;
            }

            Built++;
        }

        var built = _create();
        lock (_gate)
        {
            _built.Add(built);
        }

        return built;
    }

    private readonly List<OrtModelRuntime> _built = [];
    private int _endedTerminations;

    /// <summary>Graph runs the step watchdog ended, over every runtime built (injected hangs among them).</summary>
    public int WatchdogTerminations
    {
        get
        {
            lock (_gate)
            {
                return _endedTerminations + _built.Sum(r => r.WatchdogTerminations);
            }
        }
    }

    /// <summary>
    /// A stopping device gives its runtime back once <paramref name="lastStep"/> (its step still running,
    /// or null) has ended. Kept for the next device when reuse is on and that step did not fail.
    /// </summary>
    public void GiveBack(OrtModelRuntime runtime, Task? lastStep)
    {
        if (lastStep is null || lastStep.IsCompleted)
        {
            Return(runtime, lastStep is null || lastStep.IsCompletedSuccessfully);
            return;
        }

        var returned = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        lock (_gate)
        {
            _returning = returned;
        }

        lastStep.ContinueWith(
            t =>
            {
                Return(runtime, t.IsCompletedSuccessfully);
                returned.TrySetResult();
            },
            TaskScheduler.Default);
    }

    private void Return(OrtModelRuntime runtime, bool healthy)
    {
        lock (_gate)
        {
            if (_reuse && healthy && !_disposed && _kept is null)
            {
                _kept = runtime;
                return;
            }

            // Disposed: only its count stays.
            if (_built.Remove(runtime))
            {
                _endedTerminations += runtime.WatchdogTerminations;
            }
        }

        runtime.Dispose();
    }

    public void Dispose()
    {
        OrtModelRuntime? kept;
        lock (_gate)
        {
            _disposed = true;
            kept = _kept;
            _kept = null;
        }

        kept?.Dispose();
    }
}
