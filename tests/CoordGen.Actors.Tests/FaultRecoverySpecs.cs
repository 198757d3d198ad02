using System.Threading.Channels;
using Akka.TestKit.Xunit2;
using CoordGen.Actors.Device;
using CoordGen.Actors.Supervision;
using CoordGen.Engine.Model;
using CoordGen.Engine.Runtime;
using CoordGen.Messages;
using static CoordGen.Messages.GenerationProtocol;

namespace CoordGen.Actors.Tests;

/// <summary>Faults injected into a real (tiny, random-weight) runtime: every stream must come out exactly as without faults.</summary>
public class FaultRecoverySpecs : TestKit
{
    private static readonly ModelWeights Weights = TinyModel.Weights(11, 0.5f);

    private static readonly int[] Prompt = [3, 9, 27, 17, 51, 2, 3, 9, 27, 17, 40, 8, 3, 9];

    private async Task<int[]> Stream(Akka.Actor.IActorRef supervisor, string method, Sampling sampling, Action? whileRunning = null, List<TokenLogprob?>? logprobs = null)
    {
        var channel = Channel.CreateBounded<GeneratedToken>(1);
        supervisor.Tell(new Generate(new SessionId("s"), TokenSequence.From(Prompt), 40, sampling, method, 8, null, channel.Writer, CancellationToken.None), TestActor);
        var got = new List<int>();
        await foreach (var (t, lp) in channel.Reader.ReadAllAsync())
        {
            got.Add(t);
            logprobs?.Add(lp);
            if (got.Count % 10 == 5)
            {
                whileRunning?.Invoke();
            }
        }

        var done = await ExpectMsgAsync<GenerationCompleted>(TimeSpan.FromSeconds(30));
        Assert.Equal(got, done.Tokens.Tokens);
        return [.. got];
    }

    private Akka.Actor.IActorRef Supervisor(FaultPlan? plan) =>
        Sys.ActorOf(GenerationSupervisor.Props(DeviceActor.Props(() => new OrtModelRuntime(Weights, 128, [1, 8]) { Faults = plan }, new HashSet<int>()), maxPending: 4, maxAttempts: 200));

    [Theory]
    [InlineData("ar", 0f)]
    [InlineData("sam+ours", 0f)]
    [InlineData("ar", 0.9f)]
    [InlineData("sam+ours", 0.9f)]
    public async Task Stream_should_equal_its_fault_free_output_when_device_and_drafting_faults_strike(string method, float temperature)
    {
        var sampling = new Sampling(temperature, Seed: 5) { Logprobs = 2 };
        var (cleanLogprobs, faultyLogprobs) = (new List<TokenLogprob?>(), new List<TokenLogprob?>());
        int[] clean = await Stream(Supervisor(null), method, sampling, logprobs: cleanLogprobs);
        var plan = new FaultPlan(seed: 3, budget: 30, meanGap: 3,
            kinds: [FaultKind.DeviceException, FaultKind.DeviceHang, FaultKind.NonFiniteLogits, FaultKind.DrafterCrash, FaultKind.CalibratorCrash], hang: TimeSpan.FromMilliseconds(5));

        int[] faulty = await Stream(Supervisor(plan), method, sampling, logprobs: faultyLogprobs);

        Assert.True(plan.Injected >= 5, $"only {plan.Injected} faults fired");
        Assert.Equal(clean, faulty);

        // Log-probabilities survive resumption too: a resumed attempt's first token comes from the re-prefill's last row.
        Assert.Equal(clean.Length, cleanLogprobs.Count);
        Assert.Equal(clean.Length, faultyLogprobs.Count);
        for (int i = 0; i < clean.Length; i++)
        {
            Assert.InRange(Math.Abs(cleanLogprobs[i]!.Logprob - faultyLogprobs[i]!.Logprob), 0, 1e-4);
            Assert.Equal(cleanLogprobs[i]!.Top.Select(a => a.Id), faultyLogprobs[i]!.Top.Select(a => a.Id));
        }
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Killed_session_should_resume_without_losing_or_repeating_a_token(bool deviceDownToo)
    {
        // deviceDownToo: the device crashes just before each kill, so a session restarted while the device is
        // down cancels its old attempt and resubmits through the device's back-off supervisor, which answers
        // DeviceRestarting: only the new Run's answer may end an attempt.
        int[] clean = await Stream(Supervisor(null), "sam+ours", new Sampling());
        var supervisor = Supervisor(null);
        int kills = 0;
        int[] resumed = await Stream(supervisor, "sam+ours", new Sampling(), () =>
        {
            if (deviceDownToo)
            {
                supervisor.Tell(DiagnosticsProtocol.CrashDevice.Instance, Akka.Actor.ActorRefs.NoSender);
            }

            supervisor.Tell(DiagnosticsProtocol.KillRandomSession.Instance, Akka.Actor.ActorRefs.NoSender);
            kills++;
        });

        Assert.True(kills >= 3);
        Assert.Equal(clean, resumed);
    }

    [Fact]
    public async Task A_caller_that_cancels_while_its_last_tokens_wait_for_room_should_be_told_cancelled()
    {
        // Fewer tokens than the device's window: the device finishes at once, and the session holds the
        // tokens its unread channel has no room for, with the device's Completed waiting behind them.
        var supervisor = Supervisor(null);
        var channel = Channel.CreateBounded<GeneratedToken>(1);
        using var cancel = new CancellationTokenSource();
        supervisor.Tell(new Generate(new SessionId("c"), TokenSequence.From(Prompt), 10, new Sampling(), "ar", 1, null, channel.Writer, cancel.Token), TestActor);
        await AwaitConditionAsync(() => Task.FromResult(channel.Reader.Count == 1), TimeSpan.FromSeconds(10));
        await ExpectNoMsgAsync(TimeSpan.FromMilliseconds(300));
        await cancel.CancelAsync();

        var failed = await ExpectMsgAsync<GenerationFailed>(TimeSpan.FromSeconds(10));
        Assert.Equal(FailureKind.Cancelled, failed.Kind);
        await Assert.ThrowsAnyAsync<OperationCanceledException>(async () => await channel.Reader.ReadAllAsync().CountAsync());
    }

    [Theory]
    [InlineData(0f, true)]
    [InlineData(0.9f, true)]
    [InlineData(0f, false)]
    public async Task Streams_should_resume_exactly_when_the_device_actor_crashes_and_its_backoff_supervisor_restarts_it(float temperature, bool keepRuntime)
    {
        var sampling = new Sampling(temperature, Seed: 7);
        int[] clean = await Stream(Supervisor(null), "sam+ours", sampling);
        using var runtimes = new RuntimeKeeper(() => new OrtModelRuntime(Weights, 128, [1, 8]), reuse: keepRuntime);
        var supervisor = Sys.ActorOf(GenerationSupervisor.Props(DeviceActor.Props(runtimes, new HashSet<int>()), maxPending: 4, maxAttempts: 10));
        int crashes = 0;
        int[] resumed = await Stream(supervisor, "sam+ours", sampling, () =>
        {
            supervisor.Tell(DiagnosticsProtocol.CrashDevice.Instance, Akka.Actor.ActorRefs.NoSender);
            crashes++;
        });

        Assert.True(crashes >= 2);
        Assert.Equal(clean, resumed);

        // Kept: every restarted device took the first device's compiled graphs. Not kept: each built its own.
        // The back-off supervisor restarts the device after a pause, and a crash near the stream's end may come
        // after the device had already sent every token: the restart can land after the stream completes.
        await AwaitConditionAsync(() => Task.FromResult(runtimes.Built + runtimes.Reused >= 2), TimeSpan.FromSeconds(10));
        Assert.True(runtimes.Built + runtimes.Reused >= 2, $"the device never restarted ({runtimes.Built} built, {runtimes.Reused} reused)");
        Assert.Equal(keepRuntime ? 1 : runtimes.Built + runtimes.Reused, runtimes.Built);
    }
}
