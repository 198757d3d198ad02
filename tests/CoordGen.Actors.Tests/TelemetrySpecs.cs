using System.Collections.Concurrent;
using System.Diagnostics;
using System.Diagnostics.Metrics;
using System.Threading.Channels;
using Akka.TestKit.Xunit2;
using CoordGen.Actors.Device;
using CoordGen.Engine.Model;
using CoordGen.Engine.Runtime;
using CoordGen.Messages;
using static CoordGen.Messages.GenerationProtocol;

namespace CoordGen.Actors.Tests;

public class TelemetrySpecs : TestKit
{
    [Fact]
    public async Task Device_steps_should_emit_child_spans_of_the_callers_trace_and_metrics()
    {
        using var spans = new SpanRecorder();
        var measured = new ConcurrentDictionary<string, int>();
        using var meters = new MeterListener();
        meters.InstrumentPublished = (i, l) =>
        {
            if (i.Meter.Name == Telemetry.Name)
            {
                l.EnableMeasurementEvents(i);
            }
        };
        meters.SetMeasurementEventCallback<double>((i, _, _, _) => measured.AddOrUpdate(i.Name, 1, (_, n) => n + 1));
        meters.SetMeasurementEventCallback<int>((i, _, _, _) => measured.AddOrUpdate(i.Name, 1, (_, n) => n + 1));
        meters.SetMeasurementEventCallback<long>((i, _, _, _) => measured.AddOrUpdate(i.Name, 1, (_, n) => n + 1));
        meters.Start();

        var weights = TinyModel.Weights(4, 0.5f);
        var device = Sys.ActorOf(DeviceStandIn.Props(DeviceActor.Props(() => new OrtModelRuntime(weights, 128, [1, 8]), new HashSet<int>())));
        using var root = new Activity("test-request").Start();
        var channel = Channel.CreateUnbounded<GeneratedToken>();
        int[] prompt = [.. Enumerable.Range(0, 20).Select(i => (i * 5) % 64)];
        device.Tell(new Generate(new SessionId("traced"), TokenSequence.From(prompt), 16, new Sampling(), "sam+ours", 8, null, channel.Writer, CancellationToken.None) { Trace = root.Context }, TestActor);
        await ExpectMsgAsync<GenerationCompleted>();

        // The calibrator actor's span may end after the last token (the session does not wait for it).
        await AwaitConditionAsync(() => Task.FromResult(spans.Spans.Any(s => s.TraceId == root.TraceId && s.OperationName == "coordgen.calibrate")), TimeSpan.FromSeconds(5));
        var mine = spans.Spans.Where(s => s.TraceId == root.TraceId).ToList();
        Assert.Contains(mine, s => s.OperationName == "coordgen.prefill_chunk");
        Assert.Contains(mine, s => s.OperationName == "coordgen.device_run");
        Assert.Contains(mine, s => s.OperationName == "coordgen.verify");
        Assert.All(mine, s => Assert.Equal(root.SpanId, s.ParentSpanId));
        Assert.All(mine, s => Assert.Equal("traced", s.GetTagItem("coordgen.session")));
        Assert.True(measured.GetValueOrDefault("coordgen.device.busy_time") > 0);
        Assert.True(measured.GetValueOrDefault("coordgen.speculation.accepted_length") > 0);
        Assert.True(measured.GetValueOrDefault("coordgen.device.queue_depth") > 0);
        Assert.True(measured.GetValueOrDefault("coordgen.device.tokens") > 0);
    }
}
