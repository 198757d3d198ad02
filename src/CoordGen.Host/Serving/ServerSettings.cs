using System.Text.RegularExpressions;
using CoordGen.Engine.Speculative;

namespace CoordGen.Host.Serving;

/// <summary>
/// <c>coordgen serve</c> settings, bound from configuration section <c>Server</c>: appsettings.json
/// in the working directory, a file given with --config, environment variables
/// (<c>COORDGEN_Server__Port=9000</c>), then command-line options, each overriding the one before.
/// </summary>
public sealed class ServerSettings
{
    public const string Section = "Server";

    /// <summary>Model directory; empty = the embedded models/coordgen-demo.</summary>
    public string? Model { get; set; }

    /// <summary>Address to bind. Loopback by default: set 0.0.0.0 (and an ApiKey) to serve other machines.</summary>
    public string Host { get; set; } = "127.0.0.1";

    /// <summary>TCP port; 0 picks a free one (the chosen address is printed).</summary>
    public int Port { get; set; } = 8080;

    public int Capacity { get; set; } = 2048;

    public int PrefillWidth { get; set; } = 64;

    /// <summary>
    /// Tokens per prefill chunk while other sessions are decoding: a narrower chunk between their steps
    /// keeps their inter-token gaps short (a prompt with no one else decoding goes PrefillWidth at a
    /// time). At PrefillWidth or above = off.
    /// </summary>
    public int InterleavedChunkWidth { get; set; } = 32;

    /// <summary>The interleaved chunk width in effect: never wider than the prefill width.</summary>
    public int EffectiveChunkWidth => Math.Min(InterleavedChunkWidth, PrefillWidth);

    /// <summary>
    /// ONNX Runtime intra-op threads of the device; 0 (default) = one per core. The drafter, calibrator and
    /// actors share the cores with it. On this 2-core machine two threads gave 1.10x (plain) and 1.19-1.24x
    /// (speculative) the aggregate tokens/s of one in `coordgen bench sessions --sessions 8 --threads N`,
    /// once all graphs shared one thread pool (docs/serving.md). (Before that fix, idle per-graph pools
    /// spun on the cores and one thread was faster.)
    /// </summary>
    public int Threads { get; set; }

    /// <summary>Linear layers' weight format (F32, Int8, Int4; quantized at load time; docs/decisions/0012-quantized-weights.md).</summary>
    public Engine.Model.WeightFormat Weights { get; set; } = Engine.Model.WeightFormat.F32;

    /// <summary>The intra-op thread count in effect (<see cref="Threads"/>, or one per core).</summary>
    public int EffectiveThreads => Threads > 0 ? Threads : Math.Max(1, Environment.ProcessorCount);

    /// <summary>Default decoding method for requests that do not choose one.</summary>
    public string Method { get; set; } = "sam+ours";

    public int Width { get; set; } = 8;

    /// <summary>Speculative requests verify each step on the compiled width (1, 4 or Width) that gives the most tokens per millisecond for that session (default); false = always Width. In `coordgen bench sessions` it beat the fixed width at 2 or more sessions (docs/decisions/0006-adaptive-width.md).</summary>
    public bool AdaptiveWidth { get; set; } = true;

    /// <summary>Compile every (width, KV bucket) graph when the device starts instead of on first use (slower start and device restarts; benchmarks use it so no compile lands in a timed region).</summary>
    public bool PrecompileAll { get; set; }

    /// <summary>A device actor restarted after a crash takes the runtime (compiled graphs) of the one before it instead of compiling again (default); false = every restart builds a new runtime. A runtime whose step failed as the device stopped is never reused.</summary>
    public bool KeepRuntimeAcrossRestarts { get; set; } = true;

    /// <summary>
    /// KV cache memory for all sessions together, in MiB. Each running session holds one cache of fixed size
    /// (2 x layers x KV heads x Capacity x head dim x 4 bytes); admitted requests beyond what fits wait
    /// in line (at most MaxPending running and waiting), and the rest get 429.
    /// </summary>
    public int KvBudgetMb { get; set; } = 1024;

    /// <summary>Requests running or queued at once; more are refused with 429 and Retry-After.</summary>
    public int MaxPending { get; set; } = 16;

    /// <summary>Largest request body accepted, in bytes; larger ones get 413.</summary>
    public long MaxBodyBytes { get; set; } = 1 << 20;

    /// <summary>When set, /v1 endpoints need <c>Authorization: Bearer KEY</c>.</summary>
    public string? ApiKey { get; set; }

    /// <summary>Browser origins allowed to call the API (CORS), such as https://app.example.com; empty (default) = no cross-origin access.</summary>
    public string[] CorsOrigins { get; set; } = [];

    /// <summary>Requests per minute per client address on /v1 (not /health or /metrics); 0 = unlimited.</summary>
    public int RequestsPerMinute { get; set; }

    /// <summary>OTLP collector (for example http://localhost:4317): traces and metrics are also exported there. Empty = off.</summary>
    public string? OtlpEndpoint { get; set; }

    /// <summary>What-if: pace every device step to this accelerator latency profile (a shipped name or a JSON file), so the server behaves with an NPU's step times. Empty = real timings.</summary>
    public string? DeviceProfile { get; set; }

    /// <summary>Every problem with these settings, each saying what to change; empty when valid.</summary>
    public IReadOnlyList<string> Problems()
    {
        var p = new List<string>();
        if (Port is < 0 or > 65535)
        {
            p.Add($"Port must be between 0 and 65535 (got {Port}).");
        }

        if (!System.Net.IPAddress.TryParse(Host, out _) && Host != "localhost")
        {
            p.Add($"Host must be an IP address or 'localhost' (got '{Host}'); 127.0.0.1 serves this machine only, 0.0.0.0 every interface.");
        }

        if (Capacity is < 16 or > 65536)
        {
            p.Add($"Capacity must be between 16 and 65536 (got {Capacity}).");
        }

        if (PrefillWidth is < 1 or > 1024)
        {
            p.Add($"PrefillWidth must be between 1 and 1024 (got {PrefillWidth}).");
        }

        if (InterleavedChunkWidth is < 1 or > 1024)
        {
            p.Add($"InterleavedChunkWidth must be between 1 and 1024 (got {InterleavedChunkWidth}); at PrefillWidth or above, chunks are always full width.");
        }

        if (Threads is < 0 or > 256)
        {
            p.Add($"Threads must be between 0 (one per core) and 256 (got {Threads}).");
        }

        if (!string.IsNullOrEmpty(DeviceProfile))
        {
            try
            {
                CoordGen.Engine.Scheduling.DeviceProfile.Load(DeviceProfile);
            }
            catch (Exception ex) when (ex is ArgumentException or FileNotFoundException)
            {
                p.Add($"DeviceProfile: {ex.Message}");
            }
        }

        if (Method != "ar")
        {
            try
            {
                SpeculationOptions.ForMethod(Method, Width);
            }
            catch (ArgumentException ex)
            {
                p.Add($"Method: {ex.Message}");
            }
        }

        if (Width is < 2 or > 256)
        {
            p.Add($"Width must be between 2 and 256 (got {Width}).");
        }

        if (KvBudgetMb is < 1 or > 1_048_576)
        {
            p.Add($"KvBudgetMb must be between 1 and 1048576 MiB (got {KvBudgetMb}).");
        }

        if (MaxPending is < 1 or > 10_000)
        {
            p.Add($"MaxPending must be between 1 and 10000 (got {MaxPending}).");
        }

        if (MaxBodyBytes is < 1024 or > 256L << 20)
        {
            p.Add($"MaxBodyBytes must be between 1024 and 268435456 (got {MaxBodyBytes}).");
        }

        if (ApiKey is { Length: > 0 } key && (key.Length < 8 || Regex.IsMatch(key, @"\s")))
        {
            p.Add("ApiKey must be at least 8 characters without spaces.");
        }

        if (RequestsPerMinute is < 0 or > 1_000_000)
        {
            p.Add($"RequestsPerMinute must be between 0 (unlimited) and 1000000 (got {RequestsPerMinute}).");
        }

        foreach (string origin in CorsOrigins)
        {
            if (origin != "*" && (!Uri.TryCreate(origin, UriKind.Absolute, out var o) || o.Scheme is not ("http" or "https") || o.AbsolutePath != "/"))
            {
                p.Add($"CorsOrigins: '{origin}' is not an origin; give scheme, host and port only, such as https://app.example.com or http://localhost:3000 (or * for any).");
            }
        }

        if (OtlpEndpoint is { Length: > 0 } otlp && !Uri.TryCreate(otlp, UriKind.Absolute, out _))
        {
            p.Add($"OtlpEndpoint must be an absolute URL such as http://localhost:4317 (got '{otlp}').");
        }

        return p;
    }
}
