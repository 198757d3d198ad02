namespace CoordGen.Engine.Runtime;

/// <summary>
/// How a session's KV cache holds its keys and values: float32, or float16 (half the bytes; the graphs
/// convert at the boundary: they read float16 caches, compute attention in float32, and write the new rows
/// as float16, the same values plain and speculative decoding both read afterwards). Decision 0020.
/// </summary>
public enum KvFormat
{
    F32,
    F16,
}

/// <summary>Bytes of one element of each <see cref="KvFormat"/>.</summary>
public static class KvFormats
{
    public static int ElementBytes(this KvFormat format) => format == KvFormat.F16 ? 2 : 4;

    /// <summary>The name in file names, reports and options (f32, f16).</summary>
    public static string Name(this KvFormat format) => format == KvFormat.F16 ? "f16" : "f32";
}
