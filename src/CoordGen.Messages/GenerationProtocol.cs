using System.Collections.Immutable;
using System.Threading.Channels;

namespace CoordGen.Messages;

/// <summary>Why a request failed: the caller decides from this whether to retry.</summary>
public enum FailureKind
{
    InvalidRequest,
    CapacityExceeded,
    DeviceFault,
    Cancelled,

    /// <summary>Every slot and queue place is taken; retry after <see cref="GenerationProtocol.GenerationFailed.RetryAfterSeconds"/>.</summary>
    Overloaded,

    /// <summary>The request named a context store that does not exist.</summary>
    UnknownContextStore,
}

/// <summary>Messages between the host edge, the generation supervisor and the device actor.</summary>
public static class GenerationProtocol
{
    /// <summary>
    /// Host → supervisor: generate for <paramref name="Prompt"/>. Tokens are written to
    /// <paramref name="Output"/> (with their log-probabilities when <see cref="Sampling.Logprobs"/> asks) as they are produced and the channel is completed at the end (with an
    /// exception on failure). Reply: <see cref="GenerationCompleted"/> or <see cref="GenerationFailed"/>.
    /// <paramref name="Method"/> is "ar" (plain decoding) or a speculative method (pld, sam, sam+history,
    /// pld+ours, sam+ours); greedy output is the same token for token whichever is chosen.
    /// <paramref name="ContextStore"/> names a store whose documents the drafter retrieves from.
    /// </summary>
    public sealed record Generate(
        SessionId SessionId,
        TokenSequence Prompt,
        int MaxTokens,
        Sampling Sampling,
        string Method,
        int Width,
        string? ContextStore,
        ChannelWriter<GeneratedToken> Output,
        CancellationToken Cancellation)
    {
        /// <summary>The caller's trace context: device spans for this request are its children.</summary>
        public System.Diagnostics.ActivityContext Trace { get; init; }

        /// <summary>Speculative methods: verify each step on the compiled width (up to <paramref name="Width"/>, 1 = plain) that gives the most tokens per millisecond for this session. Greedy output is the same either way.</summary>
        public bool AdaptiveWidth { get; init; }

        /// <summary>
        /// The prompt starts with a named context store's documents: once prefilled, the device keeps their
        /// keys and values in its prefix cache, pinned for the store, until the store changes or is deleted.
        /// </summary>
        public PrefixPin? KeepPrefix { get; init; }
    }

    /// <summary>
    /// The first <paramref name="Tokens"/> prompt tokens are <paramref name="Owner"/>'s (a context store's
    /// documents, rendered), as the store stood at <paramref name="Generation"/>.
    /// </summary>
    public sealed record PrefixPin(string Owner, long Generation, int Tokens);

    /// <summary>Sampling settings: temperature 0 is greedy. Offset skips random draws (for resuming).</summary>
    public sealed record Sampling(float Temperature = 0f, int TopK = 0, float TopP = 1f, int Seed = 0, int Offset = 0)
    {
        /// <summary>Report each token's log-probability with this many likeliest alternatives (0-20); null reports none.</summary>
        public int? Logprobs { get; init; }
    }

    /// <summary>One generated token on its way to the caller; <paramref name="Logprob"/> only when the request asked for log-probabilities.</summary>
    public readonly record struct GeneratedToken(int Id, TokenLogprob? Logprob = null);

    /// <summary>
    /// A token's log-probability under the model (log-softmax of the raw logits, before temperature, top-k
    /// or top-p; under speculation from the verification row that chose it) and the likeliest tokens at its position, best first.
    /// </summary>
    public sealed record TokenLogprob(float Logprob, ImmutableArray<TokenAlternative> Top);

    /// <summary>One of the likeliest tokens at a position.</summary>
    public readonly record struct TokenAlternative(int Id, float Logprob);

    /// <summary>
    /// Supervisor/device → requester: the request finished; counts and timings for reports.
    /// <paramref name="Attempts"/> is 1 unless the session resumed after faults; <paramref name="RecoveryMs"/>
    /// holds, per fault, the time from the fault to the next committed token.
    /// </summary>
    public sealed record GenerationCompleted(SessionId SessionId, TokenSequence Tokens, string StopReason, double PrefillMs, double DecodeMs, SpeculationReport? Speculation,
        ImmutableArray<double> RecoveryMs = default, int Attempts = 1)
    {
        /// <summary>Prompt tokens whose keys and values came from the device's prefix cache instead of a prefill.</summary>
        public int CachedTokens { get; init; }
    }

    /// <summary>What speculation did for one request: verification steps, tokens per step, drafts by source.</summary>
    public sealed record SpeculationReport(
        string Method,
        int Width,
        int Steps,
        double TokensPerStep,
        ImmutableDictionary<string, long> ProposedBySource,
        ImmutableDictionary<string, long> AcceptedBySource,
        double DraftMs);

    /// <summary>Supervisor/device → requester: the request failed; the system keeps serving others.</summary>
    public sealed record GenerationFailed(SessionId SessionId, FailureKind Kind, string Detail, int RetryAfterSeconds = 0);
}
