using Akka.Actor;
using Akka.Event;
using Akka.Pattern;
using CoordGen.Actors.Contexts;
using CoordGen.Actors.Device;
using CoordGen.Actors.Sessions;
using CoordGen.Messages;
using static CoordGen.Messages.GenerationProtocol;
using static CoordGen.Messages.DiagnosticsProtocol;
using static CoordGen.Messages.SupervisionProtocol;

namespace CoordGen.Actors.Supervision;

/// <summary>
/// The front door of the runtime: admits requests up to a bound (running plus queued) and refuses the
/// rest with a retry hint, resolves named context stores to snapshots, and supervises the device and
/// store actors and one <see cref="SessionActor"/> per admitted request (restart on failure; a restarted
/// session resumes from its committed tokens). The device actor runs behind a back-off supervisor: a
/// device that crashes is stopped and started again after a growing pause (100 ms doubling to 5 s), its
/// requests fail with a retryable fault that their sessions resume from, and requests that reach it
/// while it is down are answered <see cref="DeviceRestarting"/>. Replies go straight to the requester.
/// </summary>
public sealed class GenerationSupervisor : ReceiveActor
{
    private readonly int _maxPending;
    private readonly int _maxAttempts;
    private readonly Random _rng = new(17);
    private long _sessions;
    private readonly Dictionary<IActorRef, (Generate Request, IActorRef ReplyTo)> _live = [];
    private readonly IActorRef _device;
    private readonly IActorRef _stores;

    // Requests waiting for a named store's snapshot, by name (one GetSnapshot per name in flight).
    private readonly Dictionary<string, List<(Generate Request, IActorRef ReplyTo)>> _resolving = new(StringComparer.Ordinal);
    private int _pending;

    public GenerationSupervisor(Props device, int maxPending, int maxAttempts)
    {
        _maxPending = maxPending;
        _maxAttempts = maxAttempts;
        // The back-off supervisor takes the device's name, so "supervisor/device" reaches the device
        // through it (messages are forwarded; the device replies to their senders directly).
        _device = Context.ActorOf(DeviceBackoff(device), "device");
        _stores = Context.ActorOf(ContextStoreActor.Props(device: _device), "context-stores");
        Receive<Generate>(Admit);
        Receive<ContextStoreProtocol.Snapshot>(m => Resolved(m.Name, m.Context));
        Receive<ContextStoreProtocol.StoreMissing>(m => Resolved(m.Name, null));
        // A finished session frees its place at once: it says so before its caller sees the end of the stream,
        // so a caller's next request, sent after that, finds the place free (Terminated comes later).
        Receive<SessionFinished>(_ =>
        {
            if (_live.Remove(Sender))
            {
                _pending--;
            }
        });
        Receive<Terminated>(t =>
        {
            if (_live.Remove(t.ActorRef, out var lost))
            {
                _pending--;
                // Stopped without finishing (it failed too often): the caller still gets an answer.
                lost.Request.Output.TryComplete(new InvalidOperationException("session failed"));
                lost.ReplyTo.Tell(new GenerationFailed(lost.Request.SessionId, FailureKind.DeviceFault, "the session failed repeatedly and was stopped; retry the request."));
            }
        });
        Receive<KillRandomSession>(_ =>
        {
            var live = Context.GetChildren().Where(c => c.Path.Name.StartsWith("session-", StringComparison.Ordinal)).ToList();
            if (live.Count > 0)
            {
                live[_rng.Next(live.Count)].Tell(Kill.Instance);
            }

            Sender.Tell(live.Count > 0);
        });
        Receive<GetLoad>(_ => Sender.Tell(new Load(_pending, _maxPending)));
        Receive<CrashDevice>(m => _device.Tell(m));
        Receive<DeadLetter>(OnDeadLetter);
        Receive<GetDevice>(_ => Sender.Tell(_device));
        Context.System.EventStream.Subscribe(Self, typeof(DeadLetter));
        Receive<ContextStoreProtocol.CreateStore>(m => _stores.Forward(m));
        Receive<ContextStoreProtocol.AddDocument>(m => _stores.Forward(m));
        Receive<ContextStoreProtocol.ListStores>(m => _stores.Forward(m));
        Receive<ContextStoreProtocol.DeleteStore>(m => _stores.Forward(m));
        Receive<ContextStoreProtocol.GetPromptDocuments>(m => _stores.Forward(m));
    }

    /// <param name="maxAttempts">Device attempts per request: a request resumes after a device fault until this many.</param>
    public static Props Props(Props device, int maxPending, int maxAttempts = 5) => Akka.Actor.Props.Create(() => new GenerationSupervisor(device, maxPending, maxAttempts));

    protected override void PostStop() => Context.System.EventStream.Unsubscribe(Self);

    // A run forwarded to this supervisor's device in the instant between a crash and the back-off
    // supervisor seeing it gone is a dead letter: answer it as the back-off supervisor would, so the
    // session retries instead of waiting for a reply that cannot come.
    private void OnDeadLetter(DeadLetter d)
    {
        if (d.Message is DeviceProtocol.Run run && d.Recipient.Path.ToString().StartsWith(Self.Path.ToString() + "/", StringComparison.Ordinal))
        {
            d.Sender.Tell(new DeviceProtocol.Ended(run.Attempt, Restarting: true));
        }
    }

    /// <summary>The device under a back-off supervisor that restarts it on failure (never gives up).</summary>
    /// While the device is down, the back-off supervisor answers <see cref="DeviceRestarting"/> (a session takes it for its current attempt).
    internal static Props DeviceBackoff(Props device) => BackoffSupervisor.Props(
        Backoff.OnFailure(device, "device", TimeSpan.FromMilliseconds(100), TimeSpan.FromSeconds(5), 0.2, -1)
            .WithReplyWhileStopped(DeviceRestarting.Instance));

    // Sessions resume from their log when restarted, and a killed one (ActorKilledException) is
    // restarted too, not stopped. A child failing more than 100 times a minute is stopped.
    protected override SupervisorStrategy SupervisorStrategy() =>
        new OneForOneStrategy(100, TimeSpan.FromMinutes(1), _ => Directive.Restart);

    private void Admit(Generate request)
    {
        if (_pending >= _maxPending)
        {
            request.Output.TryComplete(new InvalidOperationException("overloaded"));
            Sender.Tell(new GenerationFailed(request.SessionId, FailureKind.Overloaded,
                $"the server is busy ({_pending} requests running or queued, the limit is {_maxPending}); retry shortly.", RetryAfterSeconds: 2));
            return;
        }

        _pending++;
        var replyTo = Sender;
        if (request.ContextStore is null)
        {
            Dispatch(request, replyTo, null);
            return;
        }

        if (!_resolving.TryGetValue(request.ContextStore, out var waiting))
        {
            _resolving[request.ContextStore] = waiting = [];
            _stores.Tell(new ContextStoreProtocol.GetSnapshot(request.ContextStore));
        }

        waiting.Add((request, replyTo));
    }

    private void Resolved(string name, IContextSnapshot? snapshot)
    {
        if (_resolving.Remove(name, out var waiting))
        {
            waiting.ForEach(w => Dispatch(w.Request, w.ReplyTo, snapshot));
        }
    }

    private void Dispatch(Generate request, IActorRef replyTo, IContextSnapshot? snapshot)
    {
        if (request.ContextStore is not null && snapshot is null)
        {
            _pending--;
            request.Output.TryComplete(new InvalidOperationException("unknown context store"));
            replyTo.Tell(new GenerationFailed(request.SessionId, FailureKind.UnknownContextStore,
                $"context store '{request.ContextStore}' does not exist; create it with POST /v1/context_stores first."));
            return;
        }

        var session = Context.ActorOf(SessionActor.Props(request, replyTo, _device, snapshot, new SessionLog(), _maxAttempts), $"session-{++_sessions}");
        Context.Watch(session);
        _live[session] = (request, replyTo);
    }
}
