using System.Collections.Immutable;
using Akka.Actor;
using CoordGen.Engine.Generation;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Speculative;
using CoordGen.Messages;
using static CoordGen.Messages.GenerationProtocol;

namespace CoordGen.Actors.Device;

/// <summary>
/// Owns the accelerator: the compiled graphs (an <see cref="OrtModelRuntime"/>) and every running
/// request's KV cache. Runs one request at a time off the mailbox thread (stashing the rest) and pipes
/// the outcome back, so the mailbox stays responsive. A request's failure is a reply, not a crash.
/// Plain requests decode token by token; speculative ones draft from the context (and an optional
/// context store) and verify token trees, with the same greedy output.
/// </summary>
public sealed class DeviceActor : ReceiveActor
{
    // Waiting runs: resumed ones (recovering from a fault, their callers already waiting) go first.
    private readonly Queue<(DeviceRun Run, IActorRef ReplyTo)> _resumed = new();
    private readonly Queue<(DeviceRun Run, IActorRef ReplyTo)> _fresh = new();
    private readonly Func<OrtModelRuntime> _createRuntime;
    private readonly IReadOnlySet<int> _stopTokens;
    private OrtModelRuntime? _runtime;

    public DeviceActor(Func<OrtModelRuntime> createRuntime, IReadOnlySet<int> stopTokens)
    {
        _createRuntime = createRuntime;
        _stopTokens = stopTokens;
        Become(Idle);
    }

    public static Props Props(Func<OrtModelRuntime> createRuntime, IReadOnlySet<int> stopTokens)
        => Akka.Actor.Props.Create(() => new DeviceActor(createRuntime, stopTokens));

    protected override void PreStart() => _runtime = _createRuntime();

    protected override void PostStop() => _runtime?.Dispose();

    private void Idle()
    {
        Receive<Generate>(g => Start(new DeviceRun(g, null), Sender));
        Receive<DeviceRun>(r => Start(r, Sender));
    }

    private void Busy()
    {
        Receive<Generate>(g => _fresh.Enqueue((new DeviceRun(g, null), Sender)));
        Receive<DeviceRun>(r => (r.Resumed ? _resumed : _fresh).Enqueue((r, Sender)));
        Receive<Finished>(HandleFinished);
    }

    private void Start(DeviceRun run, IActorRef replyTo)
    {
        var self = Self;
        var runtime = _runtime!;
        var stops = _stopTokens;
        Become(Busy);
        Task.Run(() => Run(runtime, stops, run))
            .PipeTo(self, success: reply => new Finished(replyTo, reply), failure: ex => new Finished(replyTo, Fail(run.Request, ex)));
    }

    private void HandleFinished(Finished f)
    {
        f.ReplyTo.Tell(f.Reply);
        Become(Idle);
        if (_resumed.TryDequeue(out var next) || _fresh.TryDequeue(out next))
        {
            Start(next.Run, next.ReplyTo);
        }
    }

    private static GenerationFailed Fail(Generate r, Exception ex)
    {
        r.Output.TryComplete(ex);
        return new GenerationFailed(r.SessionId, FailureKind.DeviceFault, $"the device failed: {ex.Message}. The request can be retried.");
    }

    private static object Run(OrtModelRuntime runtime, IReadOnlySet<int> stops, DeviceRun run)
    {
        var r = run.Request;
        try
        {
            var sampling = new SamplingOptions { Temperature = r.Sampling.Temperature, TopK = r.Sampling.TopK, TopP = r.Sampling.TopP, Seed = r.Sampling.Seed, Offset = r.Sampling.Offset };
            sampling.Validate();
            bool Emit(int id)
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
            }

            object reply;
            if (r.Method == "ar")
            {
                var result = new Generator(runtime).Generate(r.Prompt.Tokens.AsSpan(), r.MaxTokens, sampling, stops, Emit, r.Cancellation);
                reply = new GenerationCompleted(r.SessionId, TokenSequence.From(result.Tokens), result.Stats.StopReason, result.Stats.PrefillMs, result.Stats.DecodeMs, null);
            }
            else
            {
                var spec = SpeculationOptions.ForMethod(r.Method, r.Width);
                if (run.Store is not null)
                {
                    spec = spec with { UseHistory = true };
                }

                var result = new SpeculativeDecoder(runtime).Generate(r.Prompt.Tokens.AsSpan(), r.MaxTokens, sampling, stops, spec, run.Store, Emit, r.Cancellation);
                reply = new GenerationCompleted(r.SessionId, TokenSequence.From(result.Tokens), result.Stats.StopReason, result.Stats.PrefillMs, result.Stats.DecodeMs,
                    Report(r, result));
            }

            r.Output.TryComplete();
            return reply;
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

    private static SpeculationReport Report(Generate r, SpeculativeResult result)
    {
        var a = result.Accounting;
        var sources = Enum.GetValues<DraftSource>();
        return new SpeculationReport(
            r.Method,
            r.Width,
            a.Steps,
            a.MeanAccepted,
            sources.ToImmutableDictionary(s => s.ToString().ToLowerInvariant(), a.Proposed),
            sources.ToImmutableDictionary(s => s.ToString().ToLowerInvariant(), a.Accepted),
            result.DraftMs);
    }

    private sealed record Finished(IActorRef ReplyTo, object Reply);
}

/// <summary>
/// Supervisor → device: run <paramref name="Request"/>, drafting also from <paramref name="Store"/> (a
/// snapshot never mutated after it is published, so the device may read it while the store actor
/// builds the next one).
/// </summary>
/// <paramref name="Resumed"/> marks a run that continues a session after a fault: it is served first.
public sealed record DeviceRun(Generate Request, HistoryStore? Store, bool Resumed = false);
