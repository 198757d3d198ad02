using System.Collections.Immutable;
using Akka.Actor;
using CoordGen.Engine.Generation;
using CoordGen.Messages;
using static CoordGen.Messages.GenerationProtocol;

namespace CoordGen.Actors.Device;

/// <summary>
/// One run's tokens on their way to its session actor: queued as a step emits them (off the mailbox
/// thread, while the run is stepping), sent from the mailbox as <see cref="DeviceProtocol.Tokens"/> while
/// the run's window has room, and counted down as the session acknowledges them.
/// </summary>
internal sealed class RunOutput(int window)
{
    private readonly Queue<GeneratedToken> _pending = new();
    private TokenLogprob? _logprob;

    /// <summary>Tokens emitted and not yet sent.</summary>
    public int Pending => _pending.Count;

    /// <summary>Tokens sent and not yet acknowledged (<see cref="DeviceProtocol.Delivered"/>).</summary>
    public int InFlight { get; private set; }

    /// <summary>The window has room for another step's tokens.</summary>
    public bool HasRoom => InFlight < window;

    /// <summary>A token's log-probabilities, reported just before the token (on the step's thread).</summary>
    public void KeepLogprob(TokenLogprobs lp) =>
        _logprob = new TokenLogprob(lp.Logprob, [.. lp.Top.Select(t => new TokenAlternative(t.Token, t.Logprob))]);

    /// <summary>A token the step emitted (on the step's thread).</summary>
    public void Add(int token)
    {
        _pending.Enqueue(new GeneratedToken(token, _logprob));
        _logprob = null;
    }

    /// <summary>The session acknowledged <paramref name="count"/> tokens.</summary>
    public void Delivered(int count) => InFlight = Math.Max(0, InFlight - count);

    /// <summary>Sends what the window allows, or everything when <paramref name="all"/> (mailbox thread).</summary>
    public void Send(IActorRef session, IActorRef device, int attempt, bool all)
    {
        int n = all ? _pending.Count : Math.Min(_pending.Count, window - InFlight);
        if (n <= 0)
        {
            return;
        }

        var batch = new GeneratedToken[n];
        for (int i = 0; i < n; i++)
        {
            batch[i] = _pending.Dequeue();
        }

        InFlight += n;
        session.Tell(new DeviceProtocol.Tokens(attempt, ImmutableArray.Create(batch)), device);
    }
}
