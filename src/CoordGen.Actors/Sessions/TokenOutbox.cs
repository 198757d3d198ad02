using System.Threading.Channels;
using Akka.Actor;
using CoordGen.Messages;
using static CoordGen.Messages.GenerationProtocol;

namespace CoordGen.Actors.Sessions;

/// <summary>
/// The tokens a session actor has received from the device (<see cref="DeviceProtocol.Tokens"/>) and not yet
/// written to its caller's channel, in order. It writes what the channel takes, acknowledges those to the
/// device (<see cref="DeviceProtocol.Delivered"/>), and when the channel is full awaits room once, piping
/// <see cref="RoomFreed"/> to its actor: backpressure by awaiting the channel, never by polling. Touched by
/// its actor's thread alone.
/// </summary>
internal sealed class TokenOutbox(ChannelWriter<GeneratedToken> output, CancellationToken cancellation, int key = 0)
{
    private readonly Queue<(GeneratedToken Token, int Attempt, IActorRef Device)> _queue = new();
    private bool _awaitingRoom;

    /// <summary>Tags this outbox's <see cref="RoomFreed"/> notices (an actor's earlier incarnation had its own).</summary>
    public int Key => key;

    /// <summary>Every token received has been written (or dropped).</summary>
    public bool IsEmpty => _queue.Count == 0;

    /// <summary>Queues a batch from <paramref name="device"/>.</summary>
    public void Add(DeviceProtocol.Tokens tokens, IActorRef device)
    {
        foreach (var t in tokens.Items)
        {
            _queue.Enqueue((t, tokens.Attempt, device));
        }
    }

    /// <summary>
    /// Writes what the channel takes of attempt <paramref name="current"/>'s tokens, calling
    /// <paramref name="written"/> for each, and drops any of other attempts; tells each device how many of
    /// its tokens left its window. If some remain, <paramref name="self"/> gets a <see cref="RoomFreed"/>
    /// when the channel has room (or never will).
    /// </summary>
    public void Drain(IActorRef self, int current, Action<GeneratedToken> written)
    {
        var acks = new Acks(self);
        while (_queue.TryPeek(out var e) && (e.Attempt != current || output.TryWrite(e.Token)))
        {
            _queue.Dequeue();
            if (e.Attempt == current)
            {
                written(e.Token);
            }

            acks.Add(e.Attempt, e.Device);
        }

        acks.Send();
        if (_queue.Count > 0 && !_awaitingRoom)
        {
            _awaitingRoom = true;
            output.WaitToWriteAsync(cancellation).AsTask().PipeTo(self, success: ok => new RoomFreed(key, ok), failure: _ => new RoomFreed(key, false));
        }
    }

    /// <summary>A <see cref="RoomFreed"/> arrived: the next full channel is awaited again.</summary>
    public void RoomArrived() => _awaitingRoom = false;

    /// <summary>Drops every queued token (no room will come: the caller cancelled or the channel was closed), acknowledged so no device waits on them.</summary>
    public void Drop(IActorRef self)
    {
        var acks = new Acks(self);
        while (_queue.TryDequeue(out var e))
        {
            acks.Add(e.Attempt, e.Device);
        }

        acks.Send();
    }

    /// <summary>The channel of outbox <paramref name="Key"/> has room again, or never will (<paramref name="HasRoom"/> false: completed, or the caller cancelled).</summary>
    public sealed record RoomFreed(int Key, bool HasRoom);

    /// <summary>Acknowledgements gathered per run, in order.</summary>
    private struct Acks(IActorRef self)
    {
        private (int Attempt, IActorRef Device)? _run;
        private int _count;

        public void Add(int attempt, IActorRef device)
        {
            if (_run is { } r && (r.Attempt != attempt || !r.Device.Equals(device)))
            {
                Send();
            }

            _run = (attempt, device);
            _count++;
        }

        public void Send()
        {
            if (_run is { } r && _count > 0)
            {
                r.Device.Tell(new DeviceProtocol.Delivered(r.Attempt, _count), self);
            }

            _count = 0;
        }
    }
}
