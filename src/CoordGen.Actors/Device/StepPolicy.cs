namespace CoordGen.Actors.Device;

/// <summary>
/// Which kind of work the device runs next, by queue depth: a prefill chunk or a decode step. Decoding
/// sessions are served round-robin; a prefill chunk comes after every <c>max(1, decoding / prefilling)</c>
/// decode steps, so a deep decode queue does not starve new requests' time to first token and a burst
/// of new prompts does not stall running streams for long.
/// </summary>
public static class StepPolicy
{
    public static bool PrefillNext(int prefilling, int decoding, int decodeStepsSinceChunk) =>
        prefilling > 0 && (decoding == 0 || decodeStepsSinceChunk >= Math.Max(1, decoding / prefilling));

    /// <summary>
    /// Tokens in the next prefill chunk: the full prefill width when no session waits to decode (the
    /// prompt goes through fastest), the interleaved width while sessions decode, so a chunk between
    /// their steps costs them about one round of decode steps rather than several.
    /// </summary>
    public static int ChunkWidth(int decoding, int prefillWidth, int interleavedWidth) =>
        decoding > 0 ? Math.Min(interleavedWidth, prefillWidth) : prefillWidth;
}
