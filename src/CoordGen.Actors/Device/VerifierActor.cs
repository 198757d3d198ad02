using System.Diagnostics;
using Akka.Actor;
using CoordGen.Engine.Generation;
using CoordGen.Engine.Speculative;
using CoordGen.Messages;
using static CoordGen.Messages.VerifierProtocol;

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
    private readonly Dictionary<SessionRun, Sampler> _samplers = [];
    private readonly IActorRef _drafter;

    /// <param name="drafter">Where each verified step's outcome goes, so the next tree is drafted while the device applies the verdict.</param>
    public VerifierActor(IActorRef drafter)
    {
        _drafter = drafter;
        Receive<Verify>(OnVerify);
        Receive<Forget>(f => _samplers.Remove(f.Run));
    }

    public static Props Props(IActorRef drafter) => Akka.Actor.Props.Create(() => new VerifierActor(drafter));

    private void OnVerify(Verify v)
    {
        long start = Stopwatch.GetTimestamp();
        using var span = Telemetry.Source.StartActivity("coordgen.verify", ActivityKind.Internal, v.Trace);
        span?.SetTag("coordgen.session", v.Run.Session.Value);
        span?.SetTag("coordgen.step", v.Tree.Step);
        try
        {
            Sampler? sampler = null;
            var sampling = v.Sampling.ToEngine();
            if (!sampling.IsGreedy)
            {
                // A stream at another position (a new session, a restarted verifier, a resumed request)
                // starts over at the step's position.
                if (!_samplers.TryGetValue(v.Run, out sampler) || sampler.Draws != v.Tree.Draws)
                {
                    sampler = new Sampler(sampling with { Offset = checked((int)v.Tree.Draws) });
                    _samplers[v.Run] = sampler;
                }
            }

            var verdict = TreeVerifier.Verify(v.Tree, sampler);
            span?.SetTag("coordgen.accepted", verdict.Accepted);
            // The drafter first: its next tree is what the device will wait for, the verdict's application is quick.
            var outcome = v.OutcomeWidth == 0 ? null : new StepOutcome(v.OutcomeWidth, [.. verdict.Emitted], [.. verdict.Rows], [.. v.Tree.RowArgmax]);
            _drafter.Tell(new DrafterProtocol.Advance(v.Run, verdict.Step, outcome, [.. verdict.Emitted]));
            Sender.Tell(new Verified(v.Run, verdict, start, Stopwatch.GetTimestamp()));

            // ONNX Runtime's threads may still hold both cores: let the drafter's worker have this one now.
            Thread.Yield();
        }
        catch (Exception ex) when (ex is not OutOfMemoryException)
        {
            _samplers.Remove(v.Run);
            span?.SetStatus(ActivityStatusCode.Error, ex.Message);
            Sender.Tell(new VerifyFailed(v.Run, v.Tree.Step, ex.Message));
        }
    }
}

/// <summary>The engine's sampling settings for a request's.</summary>
internal static class SamplingConversion
{
    public static SamplingOptions ToEngine(this GenerationProtocol.Sampling s) =>
        new() { Temperature = s.Temperature, TopK = s.TopK, TopP = s.TopP, Seed = s.Seed, Offset = s.Offset, Logprobs = s.Logprobs };
}
