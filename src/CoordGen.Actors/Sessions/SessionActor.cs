using System.Collections.Immutable;
using System.Diagnostics;
using System.Threading.Channels;
using Akka.Actor;
using CoordGen.Messages;
using static CoordGen.Messages.GenerationProtocol;
using static CoordGen.Messages.SupervisionProtocol;

namespace CoordGen.Actors.Sessions;

/// <summary>
/// One conversation's request from admission to its last token. It owns the caller's output channel
/// and the committed tokens (<see cref="SessionLog"/>, which outlives restarts of this actor). When the
/// device fails a step, or this actor is killed and restarted by its supervisor, it resumes: the prompt
/// plus the committed tokens are prefilled again (rebuilding the cache) and generation continues with
/// the sampler advanced past the committed draws, so the stream neither loses nor repeats a token.
/// Each attempt writes through an epoch-fenced writer; a superseded attempt can no longer write.
/// </summary>
public sealed class SessionActor : ReceiveActor, IWithTimers
{
    private readonly Generate _request;
    private readonly IActorRef _replyTo;
    private readonly IActorRef _device;
    private readonly IContextSnapshot? _store;
    private readonly SessionLog _log;
    private readonly int _maxAttempts;

    public SessionActor(Generate request, IActorRef replyTo, IActorRef device, IContextSnapshot? store, SessionLog log, int maxAttempts)
    {
        _request = request;
        _replyTo = replyTo;
        _device = device;
        _store = store;
        _log = log;
        _maxAttempts = maxAttempts;
        Receive<DeviceProtocol.Ended>(OnAttemptEnded);

        // From the device's back-off supervisor while the device is down: for the attempt in flight.
        Receive<DeviceRestarting>(_ => OnAttemptEnded(new DeviceProtocol.Ended(_log.Epoch, Restarting: true)));
        Receive<Resubmit>(r =>
        {
            if (r.Epoch == _log.Epoch)
            {
                Submit();
            }
        });
    }

    public ITimerScheduler Timers { get; set; } = null!;

    public static Props Props(Generate request, IActorRef replyTo, IActorRef device, IContextSnapshot? store, SessionLog log, int maxAttempts) =>
        Akka.Actor.Props.Create(() => new SessionActor(request, replyTo, device, store, log, maxAttempts));

    protected override void PreStart() => Submit();

    protected override void PreRestart(Exception reason, object message)
    {
        // Killed or crashed: whatever the running attempt still writes is fenced off by the new epoch.
        _log.MarkFault();
        base.PreRestart(reason, message);
    }

    private void Submit()
    {
        int epoch = _log.NextEpoch(_request.Cancellation, out var attemptToken);
        int[] committed = _log.Snapshot();
        int remaining = _request.MaxTokens - committed.Length;
        if (remaining <= 0)
        {
            Finish(new GenerationCompleted(_request.SessionId, TokenSequence.From(committed), "length", 0, 0, null, [.. _log.Recoveries]));
            return;
        }

        var attempt = _request with
        {
            Prompt = TokenSequence.From(_request.Prompt.Tokens.Concat(committed)),
            MaxTokens = remaining,
            Sampling = _request.Sampling with { Offset = _request.Sampling.Offset + committed.Length },
            Output = new FencedWriter(_log, epoch, _request.Output),
            Cancellation = attemptToken,
        };
        _device.Tell(new DeviceProtocol.Run(attempt, _store, epoch, Resumed: epoch > 1));
    }

    private void OnAttemptEnded(DeviceProtocol.Ended ended)
    {
        if (ended.Attempt != _log.Epoch)
        {
            return; // a superseded attempt (this actor was restarted since)
        }

        switch (ended)
        {
            case { Completed: { } done }:
                Finish(done with { Tokens = TokenSequence.From(_log.Snapshot()), RecoveryMs = [.. _log.Recoveries], Attempts = _log.Epoch });
                break;
            case { Failed.Kind: FailureKind.DeviceFault } when _log.Epoch < _maxAttempts && !_request.Cancellation.IsCancellationRequested:
                _log.MarkFault();
                Submit();
                break;
            case { Restarting: true } when _log.Epoch < _maxAttempts && !_request.Cancellation.IsCancellationRequested:
                // The device is down between a crash and its restart: try again after a growing pause.
                _log.MarkFault();
                var pause = TimeSpan.FromMilliseconds(Math.Min(2000, 100 << Math.Min(_log.Epoch, 5)));
                Timers.StartSingleTimer("resubmit", new Resubmit(_log.Epoch), pause);
                break;
            case { Restarting: true }:
                Finish(new GenerationFailed(_request.SessionId, FailureKind.DeviceFault, $"the device did not come back after {_log.Epoch} attempts; retry the request later."));
                break;
            case { Failed: { } f }:
                Finish(f);
                break;
        }
    }

    private void Finish(object reply)
    {
        _log.EndAttempts();

        // First the supervisor (the request's place is free), then the caller: a caller that sends its next
        // request as soon as this one ends must not find the place still taken.
        Context.Parent.Tell(new SessionFinished(_request.SessionId));
        if (reply is GenerationFailed f)
        {
            _request.Output.TryComplete(f.Kind == FailureKind.Cancelled ? new OperationCanceledException(f.Detail) : new InvalidOperationException(f.Detail));
        }
        else
        {
            _request.Output.TryComplete();
        }

        _replyTo.Tell(reply);
        Context.Stop(Self);
    }

    private sealed record Resubmit(int Epoch);
}


/// <summary>
/// A session's committed tokens and attempt epochs, shared by every incarnation of its actor (so a
/// restart loses nothing) and by the writers of its attempts. Thread-safe.
/// </summary>
public sealed class SessionLog
{
    private readonly object _gate = new();
    private readonly List<int> _committed = [];
    private readonly List<double> _recoveries = [];
    private CancellationTokenSource? _attempt;
    private long _faultAt;

    public int Epoch { get; private set; }

    public IReadOnlyList<double> Recoveries
    {
        get
        {
            lock (_gate)
            {
                return [.. _recoveries];
            }
        }
    }

    public int[] Snapshot()
    {
        lock (_gate)
        {
            return [.. _committed];
        }
    }

    public int NextEpoch(CancellationToken caller, out CancellationToken attempt)
    {
        lock (_gate)
        {
            _attempt?.Cancel();
            _attempt?.Dispose();
            _attempt = CancellationTokenSource.CreateLinkedTokenSource(caller);
            attempt = _attempt.Token;
            return ++Epoch;
        }
    }

    public void MarkFault()
    {
        lock (_gate)
        {
            if (_faultAt == 0)
            {
                _faultAt = Stopwatch.GetTimestamp();
            }
        }
    }

    public void EndAttempts()
    {
        lock (_gate)
        {
            _attempt?.Dispose();
            _attempt = null;
        }
    }

    internal bool TryCommit(int epoch, GeneratedToken token, ChannelWriter<GeneratedToken> output)
    {
        lock (_gate)
        {
            if (epoch != Epoch || !output.TryWrite(token))
            {
                return false;
            }

            _committed.Add(token.Id);
            if (_faultAt != 0)
            {
                _recoveries.Add(Stopwatch.GetElapsedTime(_faultAt).TotalMilliseconds);
                _faultAt = 0;
            }

            return true;
        }
    }

    internal bool IsCurrent(int epoch)
    {
        lock (_gate)
        {
            return epoch == Epoch;
        }
    }
}

/// <summary>An attempt's view of the session's output: writes only while its epoch is current; never completes it.</summary>
internal sealed class FencedWriter(SessionLog log, int epoch, ChannelWriter<GeneratedToken> output) : ChannelWriter<GeneratedToken>
{
    public override bool TryWrite(GeneratedToken item) => log.TryCommit(epoch, item, output);

    public override async ValueTask<bool> WaitToWriteAsync(CancellationToken cancellationToken = default) =>
        log.IsCurrent(epoch) && await output.WaitToWriteAsync(cancellationToken);

    public override bool TryComplete(Exception? error = null) => false;
}
