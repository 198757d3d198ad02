using Akka.Actor;
using CoordGen.Engine.Generation;
using CoordGen.Engine.Runtime;
using CoordGen.Messages;
using static CoordGen.Messages.GenerationProtocol;

namespace CoordGen.Actors.Device;

/// <summary>
/// Owns the accelerator: the compiled graphs (an <see cref="OrtModelRuntime"/>) and every running
/// request's KV cache. Runs one request at a time off the mailbox thread (stashing the rest) and pipes
/// the outcome back, so the mailbox stays responsive. A request's failure is a reply, not a crash.
/// This is the plain-generation slice the speculative pipeline (drafter, calibrator, verifier) builds on.
/// </summary>
public sealed class DeviceActor : ReceiveActor, IWithStash
{
    private readonly Func<OrtModelRuntime> _createRuntime;
    private readonly IReadOnlySet<int> _stopTokens;
    private OrtModelRuntime? _runtime;

    public DeviceActor(Func<OrtModelRuntime> createRuntime, IReadOnlySet<int> stopTokens)
    {
        _createRuntime = createRuntime;
        _stopTokens = stopTokens;
        Become(Idle);
    }

    public IStash Stash { get; set; } = null!;

    public static Props Props(Func<OrtModelRuntime> createRuntime, IReadOnlySet<int> stopTokens)
        => Akka.Actor.Props.Create(() => new DeviceActor(createRuntime, stopTokens));

    protected override void PreStart() => _runtime = _createRuntime();

    protected override void PostStop() => _runtime?.Dispose();

    private void Idle()
    {
        Receive<Generate>(HandleGenerate);
    }

    private void Busy()
    {
        Receive<Generate>(_ => Stash.Stash());
        Receive<Finished>(HandleFinished);
    }

    private void HandleGenerate(Generate request)
    {
        var replyTo = Sender;
        var self = Self;
        var runtime = _runtime!;
        var stops = _stopTokens;
        Become(Busy);
        Task.Run(() => Run(runtime, stops, request))
            .PipeTo(self, success: reply => new Finished(replyTo, reply), failure: ex => new Finished(replyTo, new GenerationFailed(request.SessionId, FailureKind.DeviceFault, ex.Message)));
    }

    private void HandleFinished(Finished f)
    {
        f.ReplyTo.Tell(f.Reply);
        Stash.UnstashAll();
        Become(Idle);
    }

    private static object Run(OrtModelRuntime runtime, IReadOnlySet<int> stops, Generate r)
    {
        try
        {
            var gen = new Generator(runtime);
            var sampling = new SamplingOptions { Temperature = r.Temperature, Seed = r.Seed };
            var result = gen.Generate(r.Prompt.Tokens.AsSpan(), r.MaxTokens, sampling, stops, id =>
            {
                // Bounded channels are written with WaitToWrite so a slow reader pauses only this request.
                while (!r.Output.TryWrite(id))
                {
                    if (!r.Output.WaitToWriteAsync(r.Cancellation).AsTask().GetAwaiter().GetResult())
                    {
                        return false;
                    }
                }

                return true;
            }, r.Cancellation);
            r.Output.TryComplete();
            return new GenerationCompleted(r.SessionId, TokenSequence.From(result.Tokens), result.Stats.StopReason, result.Stats.PrefillMs, result.Stats.DecodeMs);
        }
        catch (OperationCanceledException)
        {
            r.Output.TryComplete(new OperationCanceledException("the request was cancelled"));
            return new GenerationFailed(r.SessionId, FailureKind.Cancelled, "the request was cancelled by the caller");
        }
        catch (PromptTooLongException ex)
        {
            r.Output.TryComplete(ex);
            return new GenerationFailed(r.SessionId, FailureKind.CapacityExceeded, ex.Message);
        }
        catch (ArgumentException ex)
        {
            r.Output.TryComplete(ex);
            return new GenerationFailed(r.SessionId, FailureKind.InvalidRequest, ex.Message);
        }
    }

    private sealed record Finished(IActorRef ReplyTo, object Reply);
}
