using CoordGen.Engine.Generation;
using CoordGen.Messages;
using static CoordGen.Messages.GenerationProtocol;

namespace CoordGen.Actors.Device;

/// <summary>What a run's caller is told when its step fails: the kind decides whether the session retries.</summary>
internal static class DeviceFailures
{
    public static GenerationFailed For(DeviceProtocol.RunRequest r, Exception ex) => ex switch
    {
        OperationCanceledException => new GenerationFailed(r.SessionId, FailureKind.Cancelled, "the request was cancelled by the caller"),
        PromptTooLongException => new GenerationFailed(r.SessionId, FailureKind.CapacityExceeded, ex.Message),
        ArgumentException => new GenerationFailed(r.SessionId, FailureKind.InvalidRequest, ex.Message),
        VerifierFailedException => new GenerationFailed(r.SessionId, FailureKind.DeviceFault, $"{ex.Message}. The request can be retried."),
        _ => new GenerationFailed(r.SessionId, FailureKind.DeviceFault, $"the device failed: {ex.Message}. The request can be retried."),
    };

    /// <summary>The verifier answered <see cref="VerifierProtocol.VerifyFailed"/> for a session's step.</summary>
    public sealed class VerifierFailedException(string message) : Exception(message);
}
