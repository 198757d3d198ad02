using System.Collections.Immutable;
using CoordGen.Engine.Generation;
using CoordGen.Engine.Speculative;
using CoordGen.Messages;
using static CoordGen.Messages.GenerationProtocol;

namespace CoordGen.Actors.Device;

/// <summary>What a run's session is told at its end: its result, or a failure whose kind decides whether the session retries.</summary>
internal static class DeviceReplies
{
    public static GenerationFailed For(DeviceProtocol.RunRequest r, Exception ex) => ex switch
    {
        OperationCanceledException => new GenerationFailed(r.SessionId, FailureKind.Cancelled, "the request was cancelled by the caller"),
        PromptTooLongException => new GenerationFailed(r.SessionId, FailureKind.CapacityExceeded, ex.Message),
        ArgumentException => new GenerationFailed(r.SessionId, FailureKind.InvalidRequest, ex.Message),
        VerifierFailedException => new GenerationFailed(r.SessionId, FailureKind.DeviceFault, $"{ex.Message}. The request can be retried."),
        _ => new GenerationFailed(r.SessionId, FailureKind.DeviceFault, $"the device failed: {ex.Message}. The request can be retried."),
    };

    /// <summary>A finished run's answer: its tokens and timings, and for a speculative run what each draft source proposed and got accepted.</summary>
    public static GenerationCompleted Completed(DeviceProtocol.RunRequest r, GenerationResult? plain, SpeculativeResult? spec, int cachedTokens)
    {
        if (plain is not null)
        {
            return new GenerationCompleted(r.SessionId, TokenSequence.From(plain.Tokens), plain.Stats.StopReason, plain.Stats.PrefillMs, plain.Stats.DecodeMs, null) { CachedTokens = cachedTokens };
        }

        var s = spec!;
        var a = s.Accounting;
        var sources = Enum.GetValues<DraftSource>();
        var report = new SpeculationReport(r.Method, r.Width, a.Steps, a.MeanAccepted,
            sources.ToImmutableDictionary(x => x.ToString().ToLowerInvariant(), a.Proposed),
            sources.ToImmutableDictionary(x => x.ToString().ToLowerInvariant(), a.Accepted),
            s.DraftMs);
        return new GenerationCompleted(r.SessionId, TokenSequence.From(s.Tokens), s.Stats.StopReason, s.Stats.PrefillMs, s.Stats.DecodeMs, report) { CachedTokens = cachedTokens };
    }

    /// <summary>The verifier answered <see cref="VerifierProtocol.VerifyFailed"/> for a session's step.</summary>
    public sealed class VerifierFailedException(string message) : Exception(message);
}
