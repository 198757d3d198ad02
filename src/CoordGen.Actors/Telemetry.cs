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

    /// <summary>Tokens emitted by the device, by method.</summary>
    public static readonly Counter<long> Tokens = Meter.CreateCounter<long>("coordgen.device.tokens", "{token}", "Tokens emitted by the device.");
}
