using Akka.Actor;
using CoordGen.Messages;
using static CoordGen.Messages.GenerationProtocol;

namespace CoordGen.Actors.Tests;

/// <summary>
/// A fake session actor for device tests: forwards each <see cref="Generate"/> to the device as a
/// <see cref="DeviceProtocol.Run"/> (the attempt number doubles as the correlation id) and answers its
/// sender with what the device's <see cref="DeviceProtocol.Ended"/> carried; any other message goes to the device.
/// </summary>
public sealed class DeviceStandIn : ReceiveActor
{
    private readonly Dictionary<int, IActorRef> _callers = [];
    private int _attempts;

    public DeviceStandIn(Props device)
    {
        var target = Context.ActorOf(device, "device");
        Receive<Generate>(g =>
        {
            _callers[++_attempts] = Sender;
            target.Tell(new DeviceProtocol.Run(g, null, _attempts));
        });
        Receive<DeviceProtocol.Ended>(e =>
        {
            if (_callers.Remove(e.Attempt, out var caller))
            {
                caller.Tell((object?)e.Completed ?? (object?)e.Failed ?? SupervisionProtocol.DeviceRestarting.Instance);
            }
        });
        ReceiveAny(m => target.Forward(m));
    }

    public static Props Props(Props device) => Akka.Actor.Props.Create(() => new DeviceStandIn(device));
}
