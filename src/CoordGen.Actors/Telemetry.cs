using System.Diagnostics;
using System.Diagnostics.Metrics;

namespace CoordGen.Actors;

/// <summary>
/// The runtime's OpenTelemetry sources (BCL <see cref="ActivitySource"/> and <see cref="Meter"/>, both named
/// "CoordGen"): spans for every device step, metrics for queue depth, device busy time and acceptance.
/// Exporters are the host's business (Prometheus at /metrics, OTLP when configured). docs/telemetry.md lists them.
/// </summary>
public static class Telemetry
{
    public const string Name = "CoordGen";

    public static readonly ActivitySource Source = new(Name, "1.0");

    private static readonly Meter Meter = new(Name, "1.0");

    /// <summary>Requests waiting on the device, by phase (prefill or decode).</summary>
    public static readonly UpDownCounter<int> QueueDepth = Meter.CreateUpDownCounter<int>("coordgen.device.queue_depth", description: "Requests on the device by phase (prefill, decode).");

    /// <summary>Time the device spent running steps.</summary>
    public static readonly Counter<double> DeviceBusy = Meter.CreateCounter<double>("coordgen.device.busy_time", "s", "Time the device spent running steps, by step kind.");

    /// <summary>Tokens committed per verification step (accepted drafts plus the bonus token).</summary>
    public static readonly Histogram<int> AcceptedLength = Meter.CreateHistogram<int>("coordgen.speculation.accepted_length", "{token}", "Tokens committed per verification step.");

    /// <summary>Prefix cache lookups at the start of a prefill, by result (hit or miss).</summary>
    public static readonly Counter<long> PrefixLookups = Meter.CreateCounter<long>("coordgen.prefix_cache.lookups", "{lookup}", "Prefix cache lookups at the start of a prefill, by result (hit, miss).");

    /// <summary>Prompt tokens by where their keys and values came from: the prefix cache, or a prefill.</summary>
    public static readonly Counter<long> PrefixTokens = Meter.CreateCounter<long>("coordgen.prefix_cache.tokens", "{token}", "Prompt tokens by source of their keys and values (cache, prefill).");

    /// <summary>Prefix cache blocks evicted to keep the KV budget.</summary>
    public static readonly Counter<long> PrefixEvictions = Meter.CreateCounter<long>("coordgen.prefix_cache.evictions", "{block}", "Prefix cache blocks evicted to keep the KV budget.");

    /// <summary>Bytes the prefix cache holds (as of its last change).</summary>
    public static long PrefixBytes { get; internal set; }

    /// <summary>Prefix cache blocks pinned for in-prompt context stores (set by the device, read by the gauge).</summary>
    public static long PrefixPinnedBlocks { get; internal set; }

    private static readonly ObservableGauge<long> PrefixPinnedGauge = Meter.CreateObservableGauge("coordgen.prefix_cache.pinned_blocks", () => PrefixPinnedBlocks, "{block}", "Prefix cache blocks pinned for in-prompt context stores (evicted only after every other block).");

    private static readonly ObservableGauge<long> PrefixBytesGauge = Meter.CreateObservableGauge("coordgen.prefix_cache.bytes", () => PrefixBytes, "By", "Bytes the prefix cache holds (KV rows and calibration rows).");

    /// <summary>Tokens emitted by the device, by method.</summary>
    public static readonly Counter<long> Tokens = Meter.CreateCounter<long>("coordgen.device.tokens", "{token}", "Tokens emitted by the device.");
}
