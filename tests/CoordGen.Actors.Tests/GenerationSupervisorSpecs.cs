using System.Threading.Channels;
using Akka.Actor;
using Akka.TestKit.Xunit2;
using CoordGen.Actors.Device;
using CoordGen.Actors.Supervision;
using CoordGen.Messages;
using static CoordGen.Messages.GenerationProtocol;
using static CoordGen.Messages.SupervisionProtocol;

namespace CoordGen.Actors.Tests;

public class GenerationSupervisorSpecs : TestKit
{
    private static Generate Request(string id, string? store = null) =>
        new(new SessionId(id), TokenSequence.From([1, 2, 3]), 4, new Sampling(), "ar", 1, store, Channel.CreateUnbounded<GeneratedToken>().Writer, CancellationToken.None);

    [Fact]
    public async Task Supervisor_should_refuse_with_a_retry_hint_when_running_plus_queued_reaches_the_limit()
    {
        var device = CreateTestProbe();
        var supervisor = Sys.ActorOf(GenerationSupervisor.Props(Props.Create(() => new FakeForwardingDevice(device.Ref)), maxPending: 2));

        supervisor.Tell(Request("a"), TestActor);
        supervisor.Tell(Request("b"), TestActor);
        supervisor.Tell(Request("c"), TestActor);

        var refused = await ExpectMsgAsync<GenerationFailed>();
        Assert.Equal("c", refused.SessionId.Value);
        Assert.Equal(FailureKind.Overloaded, refused.Kind);
        Assert.True(refused.RetryAfterSeconds > 0);

        // Finishing one frees a place before its caller hears of the end: a request sent right after the
        // answer is admitted (no waiting for the session actor to stop).
        var first = await device.ExpectMsgAsync<DeviceProtocol.Run>();
        var firstSender = device.LastSender;
        await device.ExpectMsgAsync<DeviceProtocol.Run>();
        firstSender.Tell(new DeviceProtocol.Ended(first.Attempt, new GenerationCompleted(first.Request.SessionId, TokenSequence.Empty, "length", 0, 0, null)));
        Assert.Equal(first.Request.SessionId, (await ExpectMsgAsync<GenerationCompleted>()).SessionId);
        supervisor.Tell(SupervisionProtocol.GetLoad.Instance, TestActor);
        Assert.Equal(1, (await ExpectMsgAsync<SupervisionProtocol.Load>()).Pending);
        supervisor.Tell(Request("d"), TestActor);
        var admitted = await device.ExpectMsgAsync<DeviceProtocol.Run>();
        Assert.Equal("d", admitted.Request.SessionId.Value);
    }

    [Fact]
    public async Task Supervisor_should_fail_a_request_naming_a_missing_context_store_and_resolve_an_existing_one()
    {
        var device = CreateTestProbe();
        var supervisor = Sys.ActorOf(GenerationSupervisor.Props(Props.Create(() => new FakeForwardingDevice(device.Ref)), maxPending: 4));

        supervisor.Tell(Request("x", store: "notes"), TestActor);
        var failed = await ExpectMsgAsync<GenerationFailed>();
        Assert.Equal(FailureKind.UnknownContextStore, failed.Kind);
        Assert.Contains("create it", failed.Detail);

        supervisor.Tell(new ContextStoreProtocol.CreateStore("notes"), TestActor);
        await ExpectMsgAsync<ContextStoreProtocol.StoreInfo>();
        supervisor.Tell(new ContextStoreProtocol.AddDocument("notes", TokenSequence.From([5, 6, 7, 8])), TestActor);
        Assert.Equal(1, (await ExpectMsgAsync<ContextStoreProtocol.StoreInfo>()).Documents);

        supervisor.Tell(Request("y", store: "notes"), TestActor);
        var run = await device.ExpectMsgAsync<DeviceProtocol.Run>();
        var store = Assert.IsType<CoordGen.Engine.Speculative.HistoryStore>(run.Context);
        Assert.Equal(1, store.Responses);
    }

    [Fact]
    public async Task A_run_lost_to_a_dead_device_should_be_answered_device_restarting_so_its_session_retries()
    {
        var device = CreateTestProbe();
        var supervisor = Sys.ActorOf(GenerationSupervisor.Props(Props.Create(() => new FakeForwardingDevice(device.Ref)), maxPending: 2));
        var mine = await supervisor.Ask<IActorRef>(DiagnosticsProtocol.GetDevice.Instance, TimeSpan.FromSeconds(5));
        var run = new DeviceProtocol.Run(DeviceProtocol.RunRequest.From(Request("lost")), null, Attempt: 3);

        // Dead-lettered on its way to this supervisor's device: answered.
        Sys.EventStream.Publish(new Akka.Event.DeadLetter(run, TestActor, mine));
        Assert.Equal(new DeviceProtocol.Ended(3, Restarting: true), await ExpectMsgAsync<DeviceProtocol.Ended>());

        // Addressed elsewhere, or not a run: not this supervisor's business.
        Sys.EventStream.Publish(new Akka.Event.DeadLetter(run, TestActor, device.Ref));
        Sys.EventStream.Publish(new Akka.Event.DeadLetter("hello", TestActor, mine));
        await ExpectNoMsgAsync(TimeSpan.FromMilliseconds(300));
    }

    /// <summary>Fake device for scheduling tests: hands every run to a probe, which answers for it.</summary>
    private sealed class FakeForwardingDevice : ReceiveActor
    {
        public FakeForwardingDevice(IActorRef probe) => Receive<DeviceProtocol.Run>(r => probe.Forward(r));
    }
}
