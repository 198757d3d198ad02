using Akka.Actor;
using CoordGen.Actors.Contexts;
using CoordGen.Actors.Device;
using CoordGen.Messages;
using static CoordGen.Messages.GenerationProtocol;

namespace CoordGen.Actors.Supervision;

/// <summary>
/// The front door of the runtime: admits requests up to a bound (running plus queued) and refuses the
/// rest with a retry hint, resolves named context stores to snapshots, and supervises the device and
/// store actors (restart on failure, at most 10 times a minute). Replies go straight to the requester.
/// </summary>
public sealed class GenerationSupervisor : ReceiveActor
{
    private readonly int _maxPending;
    private readonly IActorRef _device;
    private readonly IActorRef _stores;
    private int _pending;

    public GenerationSupervisor(Props device, int maxPending)
    {
        _maxPending = maxPending;
        _device = Context.ActorOf(device, "device");
        _stores = Context.ActorOf(ContextStoreActor.Props(), "context-stores");
        Receive<Generate>(Admit);
        Receive<Resolved>(r => Dispatch(r.Request, r.ReplyTo, r.Snapshot));
        Receive<Done>(d =>
        {
            _pending--;
            d.ReplyTo.Tell(d.Reply);
        });
        Receive<GetLoad>(_ => Sender.Tell(new Load(_pending, _maxPending)));
        Receive<ContextStoreProtocol.CreateStore>(m => _stores.Forward(m));
        Receive<ContextStoreProtocol.AddDocument>(m => _stores.Forward(m));
        Receive<ContextStoreProtocol.ListStores>(m => _stores.Forward(m));
    }

    public static Props Props(Props device, int maxPending) => Akka.Actor.Props.Create(() => new GenerationSupervisor(device, maxPending));

    protected override SupervisorStrategy SupervisorStrategy() =>
        new OneForOneStrategy(10, TimeSpan.FromMinutes(1), _ => Directive.Restart);

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

        var self = Self;
        _stores.Ask<object>(new ContextStoreProtocol.GetSnapshot(request.ContextStore), TimeSpan.FromSeconds(30))
            .PipeTo(self, success: reply => new Resolved(request, replyTo, reply as StoreSnapshot),
                failure: _ => new Resolved(request, replyTo, null));
    }

    private void Dispatch(Generate request, IActorRef replyTo, StoreSnapshot? snapshot)
    {
        if (request.ContextStore is not null && snapshot is null)
        {
            _pending--;
            request.Output.TryComplete(new InvalidOperationException("unknown context store"));
            replyTo.Tell(new GenerationFailed(request.SessionId, FailureKind.UnknownContextStore,
                $"context store '{request.ContextStore}' does not exist; create it with POST /v1/context_stores first."));
            return;
        }

        var self = Self;
        _device.Ask<object>(new DeviceRun(request, snapshot?.Store), Timeout.InfiniteTimeSpan)
            .PipeTo(self, success: reply => new Done(replyTo, reply),
                failure: ex => new Done(replyTo, new GenerationFailed(request.SessionId, FailureKind.DeviceFault, $"the device failed: {ex.Message}. The request can be retried.")));
    }

    private sealed record Resolved(Generate Request, IActorRef ReplyTo, StoreSnapshot? Snapshot);

    private sealed record Done(IActorRef ReplyTo, object Reply);

    /// <summary>Ask for the current load. Reply: <see cref="Load"/>.</summary>
    public sealed record GetLoad;

    public sealed record Load(int Pending, int MaxPending);
}
