using Akka.Actor;
using CoordGen.Actors.Sessions;
using CoordGen.Messages;
using static CoordGen.Messages.GenerationProtocol;

namespace CoordGen.Actors.Tests;

/// <summary>
/// A fake session layer for device tests: forwards each <see cref="Generate"/> to the device as a
/// <see cref="DeviceProtocol.Run"/> (the attempt number doubles as the correlation id), writes the run's
/// <see cref="DeviceProtocol.Tokens"/> to the request's channel as the session actor does (the same
/// <see cref="TokenOutbox"/>), turns the caller's cancellation into <see cref="DeviceProtocol.CancelRun"/>,
/// and answers the caller with what the device's <see cref="DeviceProtocol.Ended"/> carried (completing the
/// channel, with an error on failure); any other message goes to the device. No retries: one attempt per request.
/// </summary>
public sealed class DeviceStandIn : ReceiveActor
{
    private readonly Dictionary<int, Caller> _callers = [];
    private int _attempts;

    public DeviceStandIn(Props device)
    {
        var target = Context.ActorOf(device, "device");
        var self = Self;
        Receive<Generate>(g =>
        {
            int attempt = ++_attempts;
            var caller = new Caller(Sender, g, new TokenOutbox(g.Output, g.Cancellation, attempt));
            _callers[attempt] = caller;
            caller.CancelWake = g.Cancellation.Register(() => target.Tell(new DeviceProtocol.CancelRun(attempt), self));
            target.Tell(new DeviceProtocol.Run(DeviceProtocol.RunRequest.From(g), null, attempt));
        });
        Receive<DeviceProtocol.Admitted>(_ => { }); // the device is the child: cancellations go to it anyway
        Receive<DeviceProtocol.Tokens>(t =>
        {
            if (_callers.TryGetValue(t.Attempt, out var c))
            {
                c.Outbox.Add(t, Sender);
                Drain(t.Attempt, c);
            }
        });
        Receive<TokenOutbox.RoomFreed>(r =>
        {
            if (_callers.TryGetValue(r.Key, out var c))
            {
                c.Outbox.RoomArrived();
                if (!r.HasRoom)
                {
                    c.Outbox.Drop(Self);
                }

                Drain(r.Key, c);
            }
        });
        Receive<DeviceProtocol.Ended>(e =>
        {
            if (_callers.TryGetValue(e.Attempt, out var c))
            {
                c.Ended = e;
                Drain(e.Attempt, c);
            }
        });
        ReceiveAny(m => target.Forward(m));
    }

    public static Props Props(Props device) => Akka.Actor.Props.Create(() => new DeviceStandIn(device));

    private void Drain(int attempt, Caller c)
    {
        c.Outbox.Drain(Self, attempt, _ => { });
        if (!c.Outbox.IsEmpty || c.Ended is not { } e)
        {
            return;
        }

        _callers.Remove(attempt);
        c.CancelWake.Dispose();
        if (e.Failed is { } f)
        {
            c.Request.Output.TryComplete(f.Kind == FailureKind.Cancelled ? new OperationCanceledException(f.Detail) : new InvalidOperationException(f.Detail));
        }
        else
        {
            c.Request.Output.TryComplete();
        }

        c.ReplyTo.Tell((object?)e.Completed ?? (object?)e.Failed ?? SupervisionProtocol.DeviceRestarting.Instance);
    }

    private sealed class Caller(IActorRef replyTo, Generate request, TokenOutbox outbox)
    {
        public IActorRef ReplyTo { get; } = replyTo;

        public Generate Request { get; } = request;

        public TokenOutbox Outbox { get; } = outbox;

        public CancellationTokenRegistration CancelWake { get; set; }

        public DeviceProtocol.Ended? Ended { get; set; }
    }
}
