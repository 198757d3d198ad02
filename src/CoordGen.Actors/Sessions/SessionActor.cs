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
/// and the committed tokens (<see cref="SessionLog"/>, which outlives restarts of this actor): the device
/// sends each attempt's tokens here (<see cref="DeviceProtocol.Tokens"/>), and this actor alone writes
/// them to the channel, commits them and completes the channel. When the device fails a step, or this
/// actor is killed and restarted by its supervisor, it resumes: the prompt plus the committed tokens are
/// prefilled again (rebuilding the cache) and generation continues with the sampler advanced past the
/// committed draws, so the stream neither loses nor repeats a token. Each attempt has an epoch; tokens
/// of a superseded attempt are dropped.
/// </summary>
public sealed class SessionActor : ReceiveActor, IWithTimers
{
    private readonly Generate _request;
    private readonly IActorRef _replyTo;
    private readonly IActorRef _device;
    private readonly IContextSnapshot? _store;
    private readonly SessionLog _log;
    private readonly int _maxAttempts;
    private readonly TokenOutbox _outbox;

    // The current attempt: sent and not yet ended; admitted by a device (which then takes CancelRun directly).
    private bool _attemptRunning;
    private bool _admitted;

    // An attempt's end that came while its tokens still waited for room in the channel: handled once they are written.
    private DeviceProtocol.Ended? _endedAfterOutbox;
    private CancellationTokenRegistration _callerCancel;

    public SessionActor(Generate request, IActorRef replyTo, IActorRef device, IContextSnapshot? store, SessionLog log, int maxAttempts)
    {
        _request = request;
        _replyTo = replyTo;
        _device = device;
        _store = store;
        _log = log;
        _maxAttempts = maxAttempts;
        _outbox = new TokenOutbox(request.Output, request.Cancellation, log.NextIncarnation());
        Receive<DeviceProtocol.Admitted>(OnAdmitted);
        Receive<DeviceProtocol.Tokens>(OnTokens);
        Receive<TokenOutbox.RoomFreed>(OnRoomFreed);
        Receive<DeviceProtocol.Ended>(OnAttemptEnded);

        // From the device's back-off supervisor while the device is down. Only a Run goes through it, so
        // this answers a Run: the current attempt's if no device has admitted it yet (else a stale one's).
        Receive<DeviceRestarting>(_ =>
        {
            if (_attemptRunning && !_admitted)
            {
                OnAttemptEnded(new DeviceProtocol.Ended(_log.Epoch, Restarting: true));
            }
        });
        Receive<Resubmit>(r =>
        {
            if (r.Epoch == _log.Epoch && !_attemptRunning)
            {
                Submit();
            }
        });
        Receive<CallerCancelled>(_ => OnCallerCancelled());
    }

    public ITimerScheduler Timers { get; set; } = null!;

    public static Props Props(Generate request, IActorRef replyTo, IActorRef device, IContextSnapshot? store, SessionLog log, int maxAttempts) =>
        Akka.Actor.Props.Create(() => new SessionActor(request, replyTo, device, store, log, maxAttempts));

    protected override void PreStart()
    {
        // The caller's cancellation reaches the device as a message (the device holds no caller's token).
        _callerCancel = _request.Cancellation.Register(static self => ((IActorRef)self!).Tell(CallerCancelled.Instance), Self);

        // Restarted mid-attempt: that attempt stops (if no device has admitted it yet, its admission is answered so).
        if (_log.Epoch > 0)
        {
            _log.Device?.Tell(new DeviceProtocol.CancelRun(_log.Epoch));
        }

        Submit();
    }

    protected override void PostStop() => _callerCancel.Dispose();

    protected override void PreRestart(Exception reason, object message)
    {
        // Killed or crashed: tokens the running attempt still sends are dropped once the next attempt's epoch begins.
        _log.MarkFault();
        base.PreRestart(reason, message);
    }

    private void Submit()
    {
        if (_request.Cancellation.IsCancellationRequested)
        {
            Finish(Cancelled());
            return;
        }

        _outbox.Drop(Self); // an earlier attempt's tokens, if any: the new attempt starts after the committed ones
        _endedAfterOutbox = null;
        int epoch = _log.NextEpoch();
        int[] committed = _log.Snapshot();
        int remaining = _request.MaxTokens - committed.Length;
        if (remaining <= 0)
        {
            Finish(new GenerationCompleted(_request.SessionId, TokenSequence.From(committed), "length", 0, 0, null, [.. _log.Recoveries]));
            return;
        }

        var attempt = DeviceProtocol.RunRequest.From(_request) with
        {
            Prompt = TokenSequence.From(_request.Prompt.Tokens.Concat(committed)),
            MaxTokens = remaining,
            Sampling = _request.Sampling with { Offset = _request.Sampling.Offset + committed.Length },
        };
        (_attemptRunning, _admitted) = (true, false);
        _device.Tell(new DeviceProtocol.Run(attempt, _store, epoch, Resumed: epoch > 1));
    }

    private void OnAdmitted(DeviceProtocol.Admitted a)
    {
        if (a.Attempt != _log.Epoch || !_attemptRunning)
        {
            Sender.Tell(new DeviceProtocol.CancelRun(a.Attempt)); // superseded before it was admitted
            return;
        }

        _log.Device = Sender;
        _admitted = true;
        if (_request.Cancellation.IsCancellationRequested)
        {
            Sender.Tell(new DeviceProtocol.CancelRun(a.Attempt));
        }
    }

    private void OnCallerCancelled()
    {
        if (!_attemptRunning)
        {
            Timers.Cancel("resubmit"); // between attempts: nothing runs, so end now
            Finish(Cancelled());
        }
        else if (_admitted)
        {
            _log.Device!.Tell(new DeviceProtocol.CancelRun(_log.Epoch));
        }

        // Else the attempt's admission is answered with CancelRun.
    }

    private void OnTokens(DeviceProtocol.Tokens t)
    {
        if (t.Attempt != _log.Epoch)
        {
            Sender.Tell(new DeviceProtocol.Delivered(t.Attempt, t.Items.Length)); // a superseded attempt's: dropped
            return;
        }

        _outbox.Add(t, Sender);
        DrainOutbox();
    }

    private void OnRoomFreed(TokenOutbox.RoomFreed r)
    {
        if (r.Key != _outbox.Key)
        {
            return; // awaited by this actor before a restart
        }

        _outbox.RoomArrived();
        if (!r.HasRoom)
        {
            _outbox.Drop(Self); // the caller cancelled (its attempt ends cancelled) or the channel was closed
        }

        DrainOutbox();
    }

    private void DrainOutbox()
    {
        _outbox.Drain(Self, _log.Epoch, t => _log.Commit(t.Id));
        if (_outbox.IsEmpty && _endedAfterOutbox is { } ended)
        {
            _endedAfterOutbox = null;
            OnAttemptEnded(ended);
        }
    }

    private void OnAttemptEnded(DeviceProtocol.Ended ended)
    {
        if (ended.Attempt != _log.Epoch || !_attemptRunning)
        {
            return; // a superseded attempt (this actor was restarted since), or one already ended
        }

        if (!_outbox.IsEmpty)
        {
            _endedAfterOutbox ??= ended; // its last tokens first: a resumed attempt starts after them
            return;
        }

        _attemptRunning = false;
        if (_request.Cancellation.IsCancellationRequested)
        {
            Finish(Cancelled()); // whatever the attempt's end, the caller asked to stop
            return;
        }

        switch (ended)
        {
            case { Completed: { } done }:
                Finish(done with { Tokens = TokenSequence.From(_log.Snapshot()), RecoveryMs = [.. _log.Recoveries], Attempts = _log.Epoch });
                break;
            case { Failed.Kind: FailureKind.DeviceFault } when _log.Epoch < _maxAttempts:
                _log.MarkFault();
                Submit();
                break;
            case { Restarting: true } when _log.Epoch < _maxAttempts:
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

    private GenerationFailed Cancelled() => new(_request.SessionId, FailureKind.Cancelled, "the request was cancelled by the caller");

    private void Finish(object reply)
    {
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

    /// <summary>The caller's cancellation token fired.</summary>
    private sealed class CallerCancelled
    {
        public static readonly CallerCancelled Instance = new();
    }
}
