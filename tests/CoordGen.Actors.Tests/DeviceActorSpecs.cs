using System.Threading.Channels;
using Akka.Actor;
using Akka.TestKit.Xunit2;
using CoordGen.Actors.Device;
using CoordGen.Engine.Generation;
using CoordGen.Engine.Model;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Scheduling;
using CoordGen.Messages;
using static CoordGen.Messages.GenerationProtocol;

namespace CoordGen.Actors.Tests;

public class DeviceActorSpecs : TestKit
{
    private static readonly ModelWeights Weights = TinyModel.Weights(5, 0.3f);

    private static OrtModelRuntime NewRuntime() => new(Weights, capacity: 64, widths: [1, 8]);

    [Fact]
    public async Task Device_should_stream_the_same_tokens_as_the_engine_when_asked_to_generate()
    {
        int[] prompt = [3, 9, 27, 17, 51, 2];
        IReadOnlyList<int> expected;
        using (var rt = NewRuntime())
        {
            expected = new Generator(rt).Generate(prompt, 20, new SamplingOptions(), new HashSet<int>()).Tokens;
        }

        var device = Sys.ActorOf(DeviceStandIn.Props(DeviceActor.Props(NewRuntime, new HashSet<int>())));
        var channel = Channel.CreateBounded<GeneratedToken>(4);
        device.Tell(new Generate(new SessionId("s1"), TokenSequence.From(prompt), 20, new Sampling(), "ar", 1, null, channel.Writer, CancellationToken.None), TestActor);
        var streamed = new List<int>();
        await foreach (var (t, _) in channel.Reader.ReadAllAsync())
        {
            streamed.Add(t);
        }

        var done = await ExpectMsgAsync<GenerationCompleted>();
        Assert.Equal(expected, streamed);
        Assert.Equal(TokenSequence.From(expected), done.Tokens);
    }

    [Fact]
    public async Task Device_should_sample_through_its_verifier_exactly_what_the_engine_samples_inline_and_ignore_stale_verdicts()
    {
        int[] prompt = [.. Enumerable.Repeat(new[] { 3, 9, 27, 17 }, 4).SelectMany(p => p), 51, 3, 9];
        var sampling = new SamplingOptions { Temperature = 0.9f, Seed = 17 };
        IReadOnlyList<int> expected;
        using (var rt = NewRuntime())
        {
            var opts = CoordGen.Engine.Speculative.SpeculationOptions.ForMethod("sam+ours", 8);
            expected = new CoordGen.Engine.Speculative.SpeculativeDecoder(rt).Generate(prompt, 24, sampling, new HashSet<int>(), opts).Tokens;
        }

        var device = Sys.ActorOf(DeviceStandIn.Props(DeviceActor.Props(NewRuntime, new HashSet<int>())));

        // A verdict for no session on the device (one that ended, or a late answer) is dropped.
        device.Tell(new VerifierProtocol.Verified(new SessionRun(new SessionId("gone"), 99), new TreeVerdict(1, [5], [0], 0), 0, 0), TestActor);
        var channel = Channel.CreateUnbounded<GeneratedToken>();
        device.Tell(new Generate(new SessionId("s1"), TokenSequence.From(prompt), 24, new Sampling(Temperature: 0.9f, Seed: 17), "sam+ours", 8, null, channel.Writer, CancellationToken.None), TestActor);
        var done = await ExpectMsgAsync<GenerationCompleted>();
        Assert.Equal(TokenSequence.From(expected), done.Tokens);
        Assert.True(done.Speculation!.Steps > 0);
    }

    [Fact]
    public async Task Device_should_hold_runs_beyond_its_kv_budget_in_line_and_start_them_as_caches_free()
    {
        int[] first = [3, 9, 27, 17, 51, 2], second = [4, 8, 15, 16, 23, 42], third = [7, 7, 1, 2];
        IReadOnlyList<int> firstAlone, secondAlone;
        using (var rt = NewRuntime())
        {
            firstAlone = new Generator(rt).Generate(first, 40, new SamplingOptions(), new HashSet<int>()).Tokens;
            secondAlone = new Generator(rt).Generate(second, 12, new SamplingOptions(), new HashSet<int>()).Tokens;
        }

        // Room for one session's cache: the first runs, the others wait without a cache.
        var device = Sys.ActorOf(DeviceStandIn.Props(DeviceActor.Props(NewRuntime, new HashSet<int>(), maxActiveSessions: 1, streamWindow: 4)));
        var c1 = Channel.CreateBounded<GeneratedToken>(1); // unread for now: with more tokens than its channel and the device's window (4) hold, the first session stays on the device
        var c2 = Channel.CreateUnbounded<GeneratedToken>();
        var c3 = Channel.CreateUnbounded<GeneratedToken>();
        using var cancelThird = new CancellationTokenSource();
        device.Tell(new Generate(new SessionId("s1"), TokenSequence.From(first), 40, new Sampling(), "ar", 1, null, c1.Writer, CancellationToken.None), TestActor);
        device.Tell(new Generate(new SessionId("s2"), TokenSequence.From(second), 12, new Sampling(), "sam+ours", 8, null, c2.Writer, CancellationToken.None), TestActor);
        device.Tell(new Generate(new SessionId("s3"), TokenSequence.From(third), 12, new Sampling(), "ar", 1, null, c3.Writer, cancelThird.Token), TestActor);

        await AwaitAssertAsync(async () =>
        {
            var q = await device.Ask<DiagnosticsProtocol.Queues>(DiagnosticsProtocol.GetQueues.Instance);
            Assert.Equal((1, 2), (q.Prefilling + q.Decoding, q.Waiting));
        });
        Assert.False(c2.Reader.TryPeek(out _), "a waiting run produced a token");

        // A waiting run can be cancelled; it never took a cache.
        await cancelThird.CancelAsync();
        var cancelled = await ExpectMsgAsync<GenerationFailed>();
        Assert.Equal(("s3", FailureKind.Cancelled), (cancelled.SessionId.Value, cancelled.Kind));

        // Reading the first stream lets it finish; its cache frees, and the second starts.
        var got1 = new List<int>();
        await foreach (var (t, _) in c1.Reader.ReadAllAsync())
        {
            got1.Add(t);
        }

        // Once the first run has generated its last token it leaves the device (its cache frees) while its
        // reader is still taking the tokens, so the two answers may come in either order.
        var done = new[] { await ExpectMsgAsync<GenerationCompleted>(), await ExpectMsgAsync<GenerationCompleted>() }.ToDictionary(d => d.SessionId.Value);
        Assert.Equal(["s1", "s2"], done.Keys.Order());
        Assert.Equal(firstAlone, got1);
        Assert.Equal(TokenSequence.From(secondAlone), done["s2"].Tokens);
    }

    [Fact]
    public async Task A_run_whose_session_stops_without_ending_it_should_be_cancelled_and_free_its_cache()
    {
        // Room for one cache. A session that never acknowledges its tokens fills its window and would hold
        // the cache forever; when it stops, the device (which watches it) cancels its run.
        var device = Sys.ActorOf(DeviceStandIn.Props(DeviceActor.Props(NewRuntime, new HashSet<int>(), maxActiveSessions: 1, streamWindow: 4)));
        IActorRef deviceRef = ActorRefs.Nobody;
        await AwaitAssertAsync(async () => deviceRef = await Sys.ActorSelection(device.Path / "device").ResolveOne(TimeSpan.FromSeconds(1)));
        int[] prompt = [3, 9, 27, 17, 51, 2];
        var silent = Sys.ActorOf(Props.Create(() => new SilentSession(deviceRef, prompt, 40)));
        await AwaitAssertAsync(async () =>
        {
            var q = await device.Ask<DiagnosticsProtocol.Queues>(DiagnosticsProtocol.GetQueues.Instance);
            Assert.Equal(1, q.Prefilling + q.Decoding);
        });

        var next = Channel.CreateUnbounded<GeneratedToken>();
        device.Tell(new Generate(new SessionId("next"), TokenSequence.From([1, 2, 3]), 5, new Sampling(), "ar", 1, null, next.Writer, CancellationToken.None), TestActor);
        await ExpectNoMsgAsync(TimeSpan.FromMilliseconds(300)); // waits behind the silent session's cache

        Sys.Stop(silent);
        Assert.Equal("next", (await ExpectMsgAsync<GenerationCompleted>(TimeSpan.FromSeconds(10))).SessionId.Value);
    }

    /// <summary>A fake session that submits one run and never acknowledges a token.</summary>
    private sealed class SilentSession : ReceiveActor
    {
        public SilentSession(IActorRef device, int[] prompt, int maxTokens)
        {
            device.Tell(new DeviceProtocol.Run(new DeviceProtocol.RunRequest(new SessionId("silent"), TokenSequence.From(prompt), maxTokens, new Sampling(), "ar", 1), null));
            ReceiveAny(_ => { });
        }
    }

    [Fact]
    public async Task Device_should_reply_failed_and_keep_serving_when_a_prompt_exceeds_capacity()
    {
        var device = Sys.ActorOf(DeviceStandIn.Props(DeviceActor.Props(NewRuntime, new HashSet<int>())));
        var tooLong = Channel.CreateUnbounded<GeneratedToken>();
        device.Tell(new Generate(new SessionId("big"), TokenSequence.From(Enumerable.Range(0, 100).Select(i => i % 64)), 5, new Sampling(), "ar", 1, null, tooLong.Writer, CancellationToken.None), TestActor);
        var ok = Channel.CreateUnbounded<GeneratedToken>();
        device.Tell(new Generate(new SessionId("small"), TokenSequence.From([1, 2, 3]), 5, new Sampling(), "ar", 1, null, ok.Writer, CancellationToken.None), TestActor);

        var failed = await ExpectMsgAsync<GenerationFailed>();
        Assert.Equal(FailureKind.CapacityExceeded, failed.Kind);
        Assert.Contains("Shorten the prompt", failed.Detail);
        var closed = await Assert.ThrowsAsync<InvalidOperationException>(async () => await tooLong.Reader.Completion);
        Assert.Contains("Shorten the prompt", closed.Message);
        var completed = await ExpectMsgAsync<GenerationCompleted>();
        Assert.Equal("small", completed.SessionId.Value);
        Assert.Equal(5, completed.Tokens.Count);
    }

    [Fact]
    public async Task Device_paced_by_a_profile_should_hold_every_step_to_the_profiles_time_and_keep_the_tokens()
    {
        int[] prompt = [3, 9, 27, 17, 51, 2];
        IReadOnlyList<int> expected;
        using (var rt = NewRuntime())
        {
            expected = new Generator(rt).Generate(prompt, 6, new SamplingOptions(), new HashSet<int>()).Tokens;
        }

        // Width 1 (plain decode) takes 40 ms, the 8-wide prefill graph 60 ms: far above the tiny model's CPU time.
        var profile = new DeviceProfile { Name = "fake-npu", Steps = [new(1, 40), new(8, 60)] };
        var device = Sys.ActorOf(DeviceStandIn.Props(DeviceActor.Props(NewRuntime, new HashSet<int>(), profile)));
        var channel = Channel.CreateUnbounded<GeneratedToken>();
        device.Tell(new Generate(new SessionId("s1"), TokenSequence.From(prompt), 6, new Sampling(), "ar", 1, null, channel.Writer, CancellationToken.None), TestActor);
        var done = await ExpectMsgAsync<GenerationCompleted>(TimeSpan.FromSeconds(10));
        Assert.Equal(TokenSequence.From(expected), done.Tokens);

        var overlap = await device.Ask<DiagnosticsProtocol.Overlap>(DiagnosticsProtocol.GetOverlap.Instance, TimeSpan.FromSeconds(3));
        Assert.Equal(overlap.Device.Length, overlap.Paced);
        Assert.Equal(0, overlap.Overran);
        var stepsMs = overlap.Device.Select(d => (d.End - d.Start) * 1000.0 / System.Diagnostics.Stopwatch.Frequency).ToList();
        Assert.Equal(60, stepsMs[0], 0.1 * 60 + 15); // the prefill chunk on the 8-wide graph
        Assert.All(stepsMs, ms => Assert.True(ms >= 39, $"a paced step took {ms:F1} ms, under the profile's 40"));
    }
}
