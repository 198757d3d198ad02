using System.Threading.Channels;

namespace CoordGen.Messages;

/// <summary>Why a request failed: the caller decides from this whether to retry.</summary>
public enum FailureKind
{
    InvalidRequest,
    CapacityExceeded,
    DeviceFault,
    Cancelled,
}

/// <summary>Messages between the host edge and the device actor for plain generation.</summary>
public static class GenerationProtocol
{
    /// <summary>
    /// Host → device actor: generate for <paramref name="Prompt"/>. Tokens are written to
    /// <paramref name="Output"/> as they are produced and the channel is completed at the end (with an
    /// exception on failure). Reply: <see cref="GenerationCompleted"/> or <see cref="GenerationFailed"/>.
    /// </summary>
    public sealed record Generate(
        string SessionId,
        TokenSequence Prompt,
        int MaxTokens,
        float Temperature,
        int Seed,
        ChannelWriter<int> Output,
        CancellationToken Cancellation);

    /// <summary>Device actor → requester: the request finished; counts and timings for reports.</summary>
    public sealed record GenerationCompleted(string SessionId, TokenSequence Tokens, string StopReason, double PrefillMs, double DecodeMs);

    /// <summary>Device actor → requester: the request failed; the actor keeps serving others.</summary>
    public sealed record GenerationFailed(string SessionId, FailureKind Kind, string Detail);
}
