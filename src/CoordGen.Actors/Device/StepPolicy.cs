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
}
