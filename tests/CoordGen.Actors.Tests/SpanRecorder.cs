using System.Collections.Concurrent;
using System.Diagnostics;

namespace CoordGen.Actors.Tests;

/// <summary>Records every span the runtime's <see cref="Telemetry.Source"/> ends while it lives.</summary>
internal sealed class SpanRecorder : IDisposable
{
    private readonly ConcurrentBag<Activity> _spans = [];
    private readonly ActivityListener _listener;

    public SpanRecorder()
    {
        _listener = new ActivityListener
        {
            ShouldListenTo = s => s.Name == Telemetry.Name,
            Sample = (ref ActivityCreationOptions<ActivityContext> _) => ActivitySamplingResult.AllDataAndRecorded,
            ActivityStopped = _spans.Add,
        };
        ActivitySource.AddActivityListener(_listener);
    }

    /// <summary>The spans ended so far.</summary>
    public IReadOnlyList<Activity> Spans => [.. _spans];

    public void Dispose() => _listener.Dispose();
}
