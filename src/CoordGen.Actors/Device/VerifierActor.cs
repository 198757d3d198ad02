using System.Diagnostics;
using Akka.Actor;
using CoordGen.Engine.Generation;
using CoordGen.Engine.Speculative;

namespace CoordGen.Actors.Device;

/// <summary>
/// Applies acceptance: for each verification step the device ran, walks the session's draft tree with
/// the model's tokens (argmax, or one draw per emitted token from the session's random stream) and
/// answers with the accepted path and the tokens to commit (<see cref="TreeVerifier"/>). It owns the
/// sampling streams of the sessions it verifies, so a session's draws continue exactly where its last
/// step left them. The device runs other sessions' steps meanwhile; it keeps the accepted rows' keys
/// and values and writes the tokens to the session's stream when the verdict comes back. A request it
/// cannot verify is answered with <see cref="VerifyFailed"/>, never by crashing.
/// </summary>
public sealed class VerifierActor : ReceiveActor
{
    private readonly Dictionary<object, Sampler> _samplers = [];

    public VerifierActor()
    {
        Receive<VerifyTree>(Verify);
        Receive<ForgetSession>(f => _samplers.Remove(f.Key));
    }

    public static Props Props() => Akka.Actor.Props.Create(() => new VerifierActor());

    private void Verify(VerifyTree v)
    {
        long start = Stopwatch.GetTimestamp();
        using var span = Telemetry.Source.StartActivity("coordgen.verify", ActivityKind.Internal, v.Trace);
        span?.SetTag("coordgen.session", v.Session);
        span?.SetTag("coordgen.step", v.Tree.Step);
        try
        {
            Sampler? sampler = null;
            if (!v.Sampling.IsGreedy)
            {
                // A stream at another position (a new session, a restarted verifier, a resumed request)
                // starts over at the step's position.
                if (!_samplers.TryGetValue(v.Key, out sampler) || sampler.Draws != v.Tree.Draws)
                {
                    sampler = new Sampler(v.Sampling with { Offset = checked((int)v.Tree.Draws) });
                    _samplers[v.Key] = sampler;
                }
            }

            var verdict = TreeVerifier.Verify(v.Tree, sampler);
            span?.SetTag("coordgen.accepted", verdict.Accepted);
            Sender.Tell(new Verified(v.Key, verdict) { Start = start, End = Stopwatch.GetTimestamp() });
        }
        catch (Exception ex) when (ex is not OutOfMemoryException)
        {
            _samplers.Remove(v.Key);
            span?.SetStatus(ActivityStatusCode.Error, ex.Message);
            Sender.Tell(new VerifyFailed(v.Key, v.Tree.Step, ex.Message));
        }
    }
}

/// <summary>
/// Device → verifier: the step <paramref name="Tree"/> of the session <paramref name="Key"/> ran on the
/// device; decide what it accepts. <paramref name="Trace"/> is the request's trace context.
/// </summary>
public sealed record VerifyTree(object Key, TreeToVerify Tree, SamplingOptions Sampling, ActivityContext Trace)
{
    /// <summary>The request's session id (a span attribute).</summary>
    public string? Session { get; init; }
}

/// <summary>Verifier → device: the verdict for one step (its step number lets the device drop stale ones).</summary>
public sealed record Verified(object Key, TreeVerdict Verdict)
{
    /// <summary>When the verifier started and ended this step (Stopwatch timestamps, for the overlap timeline).</summary>
    public long Start { get; init; }

    public long End { get; init; }
}

/// <summary>Verifier → device: the step could not be verified; the request fails with a retryable error.</summary>
public sealed record VerifyFailed(object Key, int Step, string Reason);

/// <summary>Device → verifier: the session ended; drop its sampling stream.</summary>
public sealed record ForgetSession(object Key);
