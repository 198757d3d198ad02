using System.Threading.Channels;
using Akka.Actor;
using Akka.TestKit.Xunit2;
using CoordGen.Actors.Device;
using CoordGen.Engine.Generation;
using CoordGen.Engine.Model;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Speculative;
using CoordGen.Messages;
using static CoordGen.Messages.GenerationProtocol;

namespace CoordGen.Actors.Tests;

/// <summary>Several sessions on one device actor, interleaved step by step.</summary>
public class InterleavingSpecs : TestKit
{
    private static readonly ModelWeights Weights = TinyModel.Weights(21, 0.5f);

    private static OrtModelRuntime NewRuntime() => new(Weights, 128, [1, 8]);

    /// <summary>A runtime with the mixed graphs of 8-token chunks compiled up front (riders of <paramref name="riderWidth"/> rows), so riding starts at once.</summary>
    private static OrtModelRuntime Mixing(int riderWidth = 1)
    {
        var rt = NewRuntime();
        rt.PrepareMixed(8, riderWidth);
        return rt;
    }

    /// <summary>A prompt of 40 + 5i tokens: several 8-token chunks.</summary>
    private static int[] LongPrompt(int i) => [.. Enumerable.Range(0, 40 + (5 * i)).Select(k => ((k * (i + 5)) + 3) % 64)];

    /// <summary>Every stream's tokens, read to the end.</summary>
    private static Task<List<int>[]> ReadAll(IEnumerable<Channel<GeneratedToken>> channels) => Task.WhenAll(channels.Select(async c =>
    {
        var got = new List<int>();
        await foreach (var (t, _) in c.Reader.ReadAllAsync())
        {
            got.Add(t);
        }

        return got;
    }));

    private static int[] Prompt(int i) => [.. Enumerable.Range(0, 12 + i).Select(k => ((k * (i + 3)) + 5) % 64)];

    private static int[] Alone(int i, string method, int n)
    {
        using var rt = NewRuntime();
        return Alone(rt, Prompt(i), method, n, new SamplingOptions());
    }

    /// <summary>What <paramref name="prompt"/> generates alone with <paramref name="method"/> at width 8.</summary>
    private static int[] Alone(OrtModelRuntime rt, int[] prompt, string method, int n, SamplingOptions options) => method == "ar"
        ? [.. new Generator(rt).Generate(prompt, n, options, new HashSet<int>()).Tokens]
        : [.. new SpeculativeDecoder(rt).Generate(prompt, n, options, new HashSet<int>(), SpeculationOptions.ForMethod(method, 8)).Tokens];

    [Fact]
    public async Task Concurrent_sessions_should_produce_exactly_what_each_produces_alone()
    {
        var device = Sys.ActorOf(DeviceStandIn.Props(DeviceActor.Props(NewRuntime, new HashSet<int>())));
        string[] methods = ["ar", "sam+ours", "pld", "sam+ours", "ar", "sam"];
        var channels = methods.Select(_ => Channel.CreateBounded<GeneratedToken>(2)).ToArray();
        for (int i = 0; i < methods.Length; i++)
        {
            device.Tell(new Generate(new SessionId($"s{i}"), TokenSequence.From(Prompt(i)), 30, new Sampling(), methods[i], 8, null, channels[i].Writer, CancellationToken.None), TestActor);
        }

        var streams = await ReadAll(channels);
        for (int i = 0; i < methods.Length; i++)
        {
            Assert.Equal(Alone(i, methods[i], 30), streams[i]);
        }
    }

    [Fact]
    public async Task Packed_plain_sessions_should_produce_what_each_produces_alone_in_fewer_device_runs()
    {
        var device = Sys.ActorOf(DeviceStandIn.Props(DeviceActor.Props(NewRuntime, new HashSet<int>(), packing: PackingMode.Always)));
        string[] methods = ["ar", "ar", "sam+ours", "ar", "ar", "ar"];
        var channels = methods.Select(_ => Channel.CreateUnbounded<GeneratedToken>()).ToArray();
        for (int i = 0; i < methods.Length; i++)
        {
            device.Tell(new Generate(new SessionId($"s{i}"), TokenSequence.From(Prompt(i)), 30, new Sampling(), methods[i], 8, null, channels[i].Writer, CancellationToken.None), TestActor);
        }

        var streams = await ReadAll(channels);
        for (int i = 0; i < methods.Length; i++)
        {
            Assert.Equal(Alone(i, methods[i], 30), streams[i]);
        }

        // Five plain sessions of 30 tokens each take 150 decode runs one at a time; packed, far fewer.
        var overlap = await device.Ask<DiagnosticsProtocol.Overlap>(DiagnosticsProtocol.GetOverlap.Instance);
        int prefills = methods.Length;
        Assert.True(overlap.Device.Length - prefills < 150, $"{overlap.Device.Length} device runs");
    }

    [Theory]
    [InlineData(0f)]
    [InlineData(0.8f)]
    public async Task Speculative_root_alone_steps_should_ride_in_plain_packs_and_change_nothing(float temperature)
    {
        // Adaptive width verifies the root alone when nothing is worth a wider graph (on this random model's
        // prompts, often): such a step is one token on the width-1 graph, and rides in the plain sessions' packs.
        // Widths priced by a fake profile (steps paced to it: a tree of 8 costs six root-alone steps), so adaptive width's
        // choice does not hang on this machine's timings: on measured times, run alone, the tiny model's trees cost about
        // what a root costs, every speculative step was a tree, and none rode (the test failed alone, passed in the suite).
        using var spans = new SpanRecorder();
        var profile = new CoordGen.Engine.Scheduling.DeviceProfile { Name = "fake-wide-is-dear", Steps = [new(1, 1), new(4, 3), new(8, 6)] };
        var device = Sys.ActorOf(DeviceStandIn.Props(DeviceActor.Props(NewRuntime, new HashSet<int>(), emulate: profile, packing: PackingMode.Always)));
        string[] methods = ["ar", "sam+ours", "ar", "sam+ours", "ar"];
        var channels = methods.Select(_ => Channel.CreateUnbounded<GeneratedToken>()).ToArray();
        var sampling = new Sampling(Temperature: temperature, Seed: 7);
        for (int i = 0; i < methods.Length; i++)
        {
            device.Tell(new Generate(new SessionId($"narrow-{temperature}-{i}"), TokenSequence.From(Prompt(i)), 30, sampling, methods[i], 8, null, channels[i].Writer, CancellationToken.None) { AdaptiveWidth = true }, TestActor);
        }

        var streams = await ReadAll(channels);
        using var rt = NewRuntime();
        var options = new SamplingOptions { Temperature = temperature, Seed = 7 };
        for (int i = 0; i < methods.Length; i++)
        {
            Assert.Equal(Alone(rt, Prompt(i), methods[i], 30, options), streams[i]);
        }

        var mixed = spans.Spans.Where(a => a.OperationName == "coordgen.decode_packed")
            .Select(a => a.GetTagItem("coordgen.session_ids") as string ?? "")
            .Count(ids => ids.Contains($"narrow-{temperature}-1") || ids.Contains($"narrow-{temperature}-3"));
        Assert.True(mixed > 0, "no packed run carried a speculative session's root-alone step");
    }

    [Theory]
    [InlineData(0f)]
    [InlineData(0.8f)]
    public async Task Decode_steps_should_ride_in_prefill_chunks_and_change_nothing(float temperature)
    {
        // Prompts of 40-60 tokens go in 8-token chunks; plain sessions already decoding ride in those chunks' runs, and
        // speculative ones keep their own steps beside them (decision 0026). The mixed graphs are compiled up front, so
        // riding starts at once.
        using var spans = new SpanRecorder();
        var device = Sys.ActorOf(DeviceStandIn.Props(DeviceActor.Props(() => Mixing(), new HashSet<int>(), packing: PackingMode.Always)));
        string[] methods = ["ar", "sam+ours", "ar", "ar", "sam+ours"];
        var channels = methods.Select(_ => Channel.CreateUnbounded<GeneratedToken>()).ToArray();
        var sampling = new Sampling(Temperature: temperature, Seed: 11);
        for (int i = 0; i < methods.Length; i++)
        {
            device.Tell(new Generate(new SessionId($"mixed-{temperature}-{i}"), TokenSequence.From(LongPrompt(i)), 30, sampling, methods[i], 8, null, channels[i].Writer, CancellationToken.None) { AdaptiveWidth = true }, TestActor);
        }

        var streams = await ReadAll(channels);
        using var rt = NewRuntime();
        var options = new SamplingOptions { Temperature = temperature, Seed = 11 };
        for (int i = 0; i < methods.Length; i++)
        {
            Assert.Equal(Alone(rt, LongPrompt(i), methods[i], 30, options), streams[i]);
        }

        var mixed = spans.Spans.Where(a => a.OperationName == "coordgen.prefill_mixed").ToList();
        Assert.NotEmpty(mixed);
        var overlap = await device.Ask<DiagnosticsProtocol.Overlap>(DiagnosticsProtocol.GetOverlap.Instance);
        Assert.True(overlap.DecodeSessionSteps >= mixed.Sum(a => (int)a.GetTagItem("coordgen.riders")!), "riders are counted as decode steps");
    }

    [Theory]
    [InlineData(0f)]
    [InlineData(0.8f)]
    public async Task Speculative_roots_should_ride_in_prefill_chunks_without_waiting_for_trees_and_change_nothing(float temperature)
    {
        // Only adaptive speculative sessions, trees not riding: while later prompts go in 8-token chunks, a chunk's few
        // rows price a root alone below a tree of its own, so the sessions already decoding ride as plain sessions do,
        // without waiting for their drafter's trees (decision 0033). Every stream equals its prompt alone.
        using var spans = new SpanRecorder();
        var device = Sys.ActorOf(DeviceStandIn.Props(DeviceActor.Props(() => Mixing(), new HashSet<int>(), packing: PackingMode.Always)));
        var channels = Enumerable.Range(0, 5).Select(_ => Channel.CreateUnbounded<GeneratedToken>()).ToArray();
        var sampling = new Sampling(Temperature: temperature, Seed: 17);
        for (int i = 0; i < channels.Length; i++)
        {
            device.Tell(new Generate(new SessionId($"roots-{temperature}-{i}"), TokenSequence.From(LongPrompt(i)), 30, sampling, "sam+ours", 8, null, channels[i].Writer, CancellationToken.None) { AdaptiveWidth = true }, TestActor);
        }

        var streams = await ReadAll(channels);
        using var rt = NewRuntime();
        var options = new SamplingOptions { Temperature = temperature, Seed = 17 };
        for (int i = 0; i < channels.Length; i++)
        {
            Assert.Equal(Alone(rt, LongPrompt(i), "sam+ours", 30, options), streams[i]);
        }

        var roots = spans.Spans.Where(a => a.OperationName == "coordgen.prefill_mixed" && (int)a.GetTagItem("coordgen.rider_width")! == 1).ToList();
        Assert.NotEmpty(roots);
    }

    [Theory]
    [InlineData(0f)]
    [InlineData(0.8f)]
    public async Task Trees_should_ride_in_prefill_chunks_and_change_nothing(float temperature)
    {
        // Only speculative sessions: while later prompts go in 8-token chunks, the trees of those already decoding ride in
        // the chunks' runs, each in a slot of the trees' width (decision 0029), and go to the verifier as after a packed
        // tree run. Every stream equals its prompt alone, greedy or seeded sampling.
        using var spans = new SpanRecorder();
        var device = Sys.ActorOf(DeviceStandIn.Props(DeviceActor.Props(() => Mixing(8), new HashSet<int>(), packing: PackingMode.Always, packTrees: true, mixedTrees: true)));
        var channels = Enumerable.Range(0, 5).Select(_ => Channel.CreateUnbounded<GeneratedToken>()).ToArray();
        var sampling = new Sampling(Temperature: temperature, Seed: 13);
        for (int i = 0; i < channels.Length; i++)
        {
            device.Tell(new Generate(new SessionId($"trees-{temperature}-{i}"), TokenSequence.From(LongPrompt(i)), 30, sampling, "sam+ours", 8, null, channels[i].Writer, CancellationToken.None), TestActor);
        }

        var streams = await ReadAll(channels);
        using var rt = NewRuntime();
        var options = new SamplingOptions { Temperature = temperature, Seed = 13 };
        for (int i = 0; i < channels.Length; i++)
        {
            Assert.Equal(Alone(rt, LongPrompt(i), "sam+ours", 30, options), streams[i]);
        }

        var trees = spans.Spans.Where(a => a.OperationName == "coordgen.prefill_mixed" && (int)a.GetTagItem("coordgen.rider_width")! == 8).ToList();
        Assert.NotEmpty(trees);
    }

    [Fact]
    public async Task A_request_that_fails_in_its_own_mixed_chunk_should_fail_alone()
    {
        // A request whose options the device refuses (max tokens 0) arrives while plain streams decode: its first chunk
        // would carry them, and fails before the run. It ends alone; the streams take their step and go on unchanged.
        using var spans = new SpanRecorder();
        var device = Sys.ActorOf(DeviceStandIn.Props(DeviceActor.Props(() => Mixing(), new HashSet<int>(), packing: PackingMode.Always)));
        var channels = Enumerable.Range(0, 3).Select(_ => Channel.CreateUnbounded<GeneratedToken>()).ToArray();
        for (int i = 0; i < channels.Length; i++)
        {
            device.Tell(new Generate(new SessionId($"ok-{i}"), TokenSequence.From(Prompt(i)), 100, new Sampling(), "ar", 8, null, channels[i].Writer, CancellationToken.None), TestActor);
        }

        // Queued behind their prompts: by its turn the streams decode.
        var bad = Channel.CreateUnbounded<GeneratedToken>();
        device.Tell(new Generate(new SessionId("bad"), TokenSequence.From(Prompt(5)), 0, new Sampling(), "ar", 8, null, bad.Writer, CancellationToken.None), TestActor);
        var streams = await ReadAll(channels);
        for (int i = 0; i < channels.Length; i++)
        {
            Assert.Equal(Alone(i, "ar", 100), streams[i]);
        }

        Assert.Contains(spans.Spans, a => a.OperationName == "coordgen.prefill_mixed" && a.GetTagItem("coordgen.session") as string == "bad");
        var replies = await ReceiveNAsync(4, TimeSpan.FromSeconds(10)).ToListAsync();
        var failed = Assert.Single(replies.OfType<GenerationFailed>());
        Assert.Equal("bad", failed.SessionId.Value);
        Assert.Equal(3, replies.OfType<GenerationCompleted>().Count());
    }

    [Theory]
    [InlineData(null, 40.0, 30.0, 20.0, true)] // never mixed yet: mix, to learn
    [InlineData(45.0, 40.0, 30.0, 20.0, true)] // the riders cost 5 ms on top of the chunk instead of 30
    [InlineData(65.0, 40.0, 30.0, 20.0, false)] // 25 ms on top: not clearly less than their own run
    [InlineData(45.0, null, 30.0, 20.0, true)] // the chunk alone not timed in this bucket yet
    [InlineData(45.0, 40.0, 30.0, 0.9, false)] // the demo model's 1 ms steps: bound by overhead
    [InlineData(null, null, null, 0.9, false)] // not even to learn
    public void Policy_should_mix_decode_rows_into_a_chunk_only_when_that_costs_clearly_less(double? mixedMs, double? chunkMs, double? ridersMs, double? plainMs, bool mix)
    {
        Assert.Equal(mix, StepPolicy.MixPays(mixedMs, chunkMs, ridersMs, plainMs));
    }

    [Theory]
    [InlineData(36.0, 4, 32, 1.0)] // four riders beside a 32-token chunk of 36 ms: a row each of 36
    [InlineData(50.0, 1, 32, 50.0 / 33)] // one rider
    [InlineData(null, 4, 32, null)] // the chunk never timed: no price, trees as before
    [InlineData(36.0, 0, 32, null)] // no one to ride
    public void A_rider_should_be_priced_at_its_share_of_the_chunks_rows(double? chunkMs, int riders, int chunkWidth, double? expectedMs)
    {
        var ms = StepPolicy.RiderShareMs(chunkMs, riders, chunkWidth);
        Assert.Equal(expectedMs.HasValue, ms.HasValue);
        if (ms is { } m)
        {
            Assert.Equal(expectedMs!.Value, m, 6);
        }
    }

    [Theory]
    [InlineData(0f)]
    [InlineData(0.8f)]
    public async Task Packed_speculative_sessions_should_produce_what_each_produces_alone(float temperature)
    {
        using var spans = new SpanRecorder();
        var device = Sys.ActorOf(DeviceStandIn.Props(DeviceActor.Props(NewRuntime, new HashSet<int>(), packing: PackingMode.Always)));
        var channels = Enumerable.Range(0, 4).Select(_ => Channel.CreateUnbounded<GeneratedToken>()).ToArray();
        var sampling = new Sampling(Temperature: temperature, Seed: 5);
        for (int i = 0; i < channels.Length; i++)
        {
            device.Tell(new Generate(new SessionId($"s{i}"), TokenSequence.From(Prompt(i)), 30, sampling, "sam+ours", 8, null, channels[i].Writer, CancellationToken.None), TestActor);
        }

        var streams = await ReadAll(channels);

        using var rt = NewRuntime();
        var spec = new CoordGen.Engine.Speculative.SpeculativeDecoder(rt);
        var options = new SamplingOptions { Temperature = temperature, Seed = 5 };
        for (int i = 0; i < channels.Length; i++)
        {
            // Greedy: the plain output; sampled: the same draws as the session alone (the verifier's stream per session).
            var alone = spec.Generate(Prompt(i), 30, options, new HashSet<int>(), CoordGen.Engine.Speculative.SpeculationOptions.ForMethod("sam+ours", 8)).Tokens;
            Assert.Equal(alone, streams[i]);
        }

        var overlap = await device.Ask<DiagnosticsProtocol.Overlap>(DiagnosticsProtocol.GetOverlap.Instance);
        Assert.True(overlap.DecodeSessionSteps > overlap.DecodeRuns, $"no run packed two trees ({overlap.DecodeRuns} decode runs, {overlap.DecodeSessionSteps} session steps)");

        // Every packed tree run was the width budget's choice, and each logged decision replays to the same choice.
        var log = (await device.Ask<DiagnosticsProtocol.WidthDecisions>(DiagnosticsProtocol.GetWidthDecisions.Instance)).Decisions;
        Assert.Contains(log, d => d.Choice.Packed);
        Assert.All(log, d => Assert.True(WidthBudget.Choose(d.Snapshot).SameAs(d.Choice)));

        // And each packed choice is the run that followed: its width, its sessions in its order.
        var runs = spans.Spans.Where(a => a.OperationName == "coordgen.device_run_packed")
            .Select(a => $"{a.GetTagItem("coordgen.width")}:{a.GetTagItem("coordgen.session_ids")}").ToList();
        Assert.All(log.Where(d => d.Choice.Packed), d => Assert.Contains($"{d.Choice.Width}:{string.Join(',', d.Choice.Members.Select(m => m.Session.Value))}", runs));
        Assert.All(log, d => Assert.All(d.Snapshot.Sessions, s => Assert.All(s.Expected, e => Assert.True(e == 0 || e >= 1))));
    }

        [Fact]
    public async Task Short_request_should_finish_before_a_long_one_started_earlier()
    {
        var device = Sys.ActorOf(DeviceStandIn.Props(DeviceActor.Props(NewRuntime, new HashSet<int>())));
        var longOut = Channel.CreateUnbounded<GeneratedToken>();
        var shortOut = Channel.CreateUnbounded<GeneratedToken>();
        device.Tell(new Generate(new SessionId("long"), TokenSequence.From(Prompt(0)), 100, new Sampling(), "ar", 8, null, longOut.Writer, CancellationToken.None), TestActor);
        device.Tell(new Generate(new SessionId("short"), TokenSequence.From(Prompt(1)), 3, new Sampling(), "ar", 8, null, shortOut.Writer, CancellationToken.None), TestActor);

        Assert.Equal("short", (await ExpectMsgAsync<GenerationCompleted>(TimeSpan.FromSeconds(30))).SessionId.Value);
        Assert.Equal("long", (await ExpectMsgAsync<GenerationCompleted>(TimeSpan.FromSeconds(30))).SessionId.Value);
    }

    [Fact]
    public async Task Stalled_reader_should_pause_only_its_own_stream()
    {
        var device = Sys.ActorOf(DeviceStandIn.Props(DeviceActor.Props(NewRuntime, new HashSet<int>())));
        var stalled = Channel.CreateBounded<GeneratedToken>(1);
        var other = Channel.CreateUnbounded<GeneratedToken>();
        device.Tell(new Generate(new SessionId("stalled"), TokenSequence.From(Prompt(0)), 20, new Sampling(), "sam+ours", 8, null, stalled.Writer, CancellationToken.None), TestActor);
        device.Tell(new Generate(new SessionId("other"), TokenSequence.From(Prompt(1)), 20, new Sampling(), "sam+ours", 8, null, other.Writer, CancellationToken.None), TestActor);

        var first = await ExpectMsgAsync<GenerationCompleted>(TimeSpan.FromSeconds(30));
        Assert.Equal("other", first.SessionId.Value);
        var got = new List<int>();
        await foreach (var (t, _) in stalled.Reader.ReadAllAsync())
        {
            got.Add(t);
        }

        Assert.Equal(Alone(0, "sam+ours", 20), got);
        Assert.Equal("stalled", (await ExpectMsgAsync<GenerationCompleted>()).SessionId.Value);
    }

    [Fact]
    public async Task Drafter_should_prepare_trees_while_the_device_steps_other_sessions()
    {
        var device = Sys.ActorOf(DeviceStandIn.Props(DeviceActor.Props(NewRuntime, new HashSet<int>())));
        var channels = Enumerable.Range(0, 4).Select(_ => Channel.CreateUnbounded<GeneratedToken>()).ToArray();
        for (int i = 0; i < 4; i++)
        {
            device.Tell(new Generate(new SessionId($"s{i}"), TokenSequence.From(Prompt(i)), 30, new Sampling(), "sam+ours", 8, null, channels[i].Writer, CancellationToken.None), TestActor);
        }

        for (int i = 0; i < 4; i++)
        {
            await ExpectMsgAsync<GenerationCompleted>(TimeSpan.FromSeconds(30));
        }

        for (int i = 0; i < 4; i++)
        {
            var got = new List<int>();
            await foreach (var (t, _) in channels[i].Reader.ReadAllAsync())
            {
                got.Add(t);
            }

            Assert.Equal(Alone(i, "sam+ours", 30), got);
        }

        var overlap = await device.Ask<DiagnosticsProtocol.Overlap>(DiagnosticsProtocol.GetOverlap.Instance);
        Assert.NotEmpty(overlap.Device);
        Assert.NotEmpty(overlap.Drafts);
    }

    [Theory]
    [InlineData(0, 5, 0, false)]
    [InlineData(1, 0, 0, true)]
    [InlineData(1, 4, 3, false)]
    [InlineData(1, 4, 4, true)]
    [InlineData(4, 4, 1, true)]
    public void Policy_should_give_prefill_a_chunk_after_every_decoding_over_prefilling_decode_steps(int prefilling, int decoding, int since, bool prefillNext)
    {
        Assert.Equal(prefillNext, StepPolicy.PrefillNext(prefilling, decoding, since));
    }

    [Theory]
    [InlineData(3, 0.0, 40.0, true, 6.0)] // three trees on their way, a 40 ms run: wait up to 6 ms
    [InlineData(3, 4.5, 40.0, true, 1.5)] // the rest of it
    [InlineData(3, 6.0, 40.0, false, 0.0)] // waited enough: run with who is ready
    [InlineData(0, 0.0, 40.0, false, 6.0)] // no one on the way
    [InlineData(3, 0.0, 2.0, false, 0.3)] // the demo model's 2 ms trees never pack: never wait
    [InlineData(3, 0.0, null, false, 0.0)] // the width's time is not known yet
    public void Policy_should_hold_a_tree_a_moment_for_the_speculative_sessions_on_their_way(int coming, double heldMs, double? stepMs, bool hold, double leftMs)
    {
        Assert.Equal(hold, StepPolicy.HoldForPack(coming, heldMs, stepMs, out double left));
        Assert.Equal(leftMs, left, 9);
    }

    [Theory]
    [InlineData(3, 0, 0.0, 50.0, true, 7.5)] // three trees on their way would ride: wait as for a pack
    [InlineData(3, 4, 0.0, 50.0, true, 7.5)] // the same, whatever verdicts are due
    [InlineData(0, 4, 0.0, 50.0, true, 2.5)] // four verdicts due, nothing rides: a shorter wait, for the verifier to run on idle cores
    [InlineData(0, 4, 2.0, 50.0, true, 0.5)] // the rest of it
    [InlineData(0, 4, 2.5, 50.0, false, 0.0)] // waited enough: the chunk runs
    [InlineData(0, 0, 0.0, 50.0, false, 2.5)] // nothing on its way
    [InlineData(0, 2, 0.0, 3.0, false, 0.15)] // the demo model's 3 ms chunks: never wait
    [InlineData(0, 2, 0.0, null, false, 0.0)] // the chunk's time is not known yet
    public void Policy_should_hold_a_chunk_for_riding_trees_or_for_verdicts_on_their_way(int ridingTrees, int verdicts, double heldMs, double? chunkMs, bool hold, double leftMs)
    {
        Assert.Equal(hold, StepPolicy.HoldChunk(ridingTrees, verdicts, heldMs, chunkMs, out double left));
        Assert.Equal(leftMs, left, 9);
    }

    [Theory]
    [InlineData(null, 4, 16.0, true)] // never measured: pack, to learn
    [InlineData(null, 1, 16.0, false)] // one session is a plain step
    [InlineData(1.7, 4, 15.8, true)] // the 135M twin: a 4-slot run cost 1.7 plain steps of 15.8 ms
    [InlineData(2.1, 2, 15.8, false)] // the twin's 2-slot run: dearer than two plain steps
    [InlineData(2.8, 4, 12.0, true)]
    [InlineData(3.2, 4, 12.0, false)] // saves too little to outweigh the swings
    [InlineData(5.0, 8, 20.0, true)]
    [InlineData(2.0, 4, 0.9, false)] // the demo model's 1 ms steps: bound by overhead, not by weights
    [InlineData(null, 4, 0.9, false)] // not even to learn
    [InlineData(null, 4, null, true)] // plain steps not timed yet
    public void Policy_should_pack_only_when_a_packed_run_costs_clearly_less_per_session(double? ratio, int sessions, double? plainMs, bool pack)
    {
        Assert.Equal(pack, StepPolicy.PackPays(ratio, sessions, plainMs));
        double? share = StepPolicy.PackedShareMs(packing: true, sessions, plainMs, ratio);
        Assert.Equal(pack && ratio is not null && plainMs is not null, share is not null);
        Assert.Null(StepPolicy.PackedShareMs(packing: false, sessions, plainMs, ratio));
        if (share is { } ms)
        {
            Assert.Equal(plainMs!.Value * ratio!.Value / sessions, ms, 9);
        }
    }

    [Theory]
    [InlineData(0, 0, 3, 3, 0, 0)] // nothing to prefill: decode
    [InlineData(0, 0, 3, 0, 0, -1)] // nothing ready at all: idle
    [InlineData(1, 1500, 0, 0, 0, 64)] // a newcomer alone: the full prefill width
    [InlineData(1, 1500, 4, 4, 3, 0)] // a chunk after every 4 decode steps: not yet
    [InlineData(1, 1500, 4, 4, 4, 32)] // due: a narrow chunk between the streams' steps
    [InlineData(1, 1500, 4, 0, 1, 32)] // not due, but no stream is ready: the device prefills rather than idles
    [InlineData(2, 900, 4, 4, 2, 32)] // two newcomers: a chunk after every 2 decode steps
    [InlineData(4, 900, 2, 2, 1, 32)] // more newcomers than streams: a chunk after every decode step
    [InlineData(4, 900, 2, 2, 0, 0)] // ... but never two chunks in a row while a stream is ready
    [InlineData(1, 1500, 4, 4, 0, 32, true)] // every ready stream rides in the chunk: the chunk is their decode step too
    [InlineData(4, 900, 2, 2, 0, 32, true)] // ... so chunks may follow each other
    [InlineData(0, 0, 3, 3, 0, 0, true)] // nothing to prefill: decode
    [InlineData(1, 1500, 4, 1, 0, 32, false, true)] // a chunk waiting for trees stays the choice as the first of them arrives
    [InlineData(0, 0, 4, 1, 0, 0, false, true)] // ... unless nothing is left to prefill
    public void Rebalancing_should_follow_the_queue_snapshot_alone(int prefilling, int tokens, int decoding, int ready, int since, int choice, bool carries = false, bool waiting = false)
    {
        var q = new QueueSnapshot(prefilling, tokens, decoding, ready, since, PrefillWidth: 64, InterleavedWidth: 32, ChunkCarriesReady: carries, ChunkWaiting: waiting);
        Assert.Equal(new StepChoice(choice), StepPolicy.Rebalance(q));
    }

    [Fact]
    public async Task Every_logged_rebalancing_decision_should_replay_from_its_snapshot_and_a_newcomer_should_not_hold_the_streams()
    {
        var device = Sys.ActorOf(DeviceStandIn.Props(DeviceActor.Props(NewRuntime, new HashSet<int>(), interleavedChunkWidth: 8)));
        var channels = Enumerable.Range(0, 4).Select(_ => Channel.CreateUnbounded<GeneratedToken>()).ToArray();
        for (int i = 0; i < 3; i++)
        {
            device.Tell(new Generate(new SessionId($"s{i}"), TokenSequence.From(Prompt(i)), 100, new Sampling(), i == 0 ? "ar" : "sam+ours", 8, null, channels[i].Writer, CancellationToken.None), TestActor);
        }

        // Once the streams run, a newcomer with a long prompt.
        await channels[0].Reader.ReadAsync();
        device.Tell(new Generate(new SessionId("newcomer"), TokenSequence.From(Enumerable.Range(0, 90).Select(t => (t * 7 % 60) + 1)), 8, new Sampling(), "ar", 8, null, channels[3].Writer, CancellationToken.None), TestActor);
        for (int i = 0; i < 4; i++)
        {
            await ExpectMsgAsync<GenerationCompleted>(TimeSpan.FromSeconds(30));
        }

        var log = (await device.Ask<DiagnosticsProtocol.StepDecisions>(DiagnosticsProtocol.GetStepDecisions.Instance)).Decisions;
        Assert.NotEmpty(log);
        Assert.All(log, d => Assert.Equal(d.Choice, StepPolicy.Rebalance(d.Snapshot)));

        // While streams decoded, the newcomer's prompt came in chunks of the interleaved width, each after a round of their steps.
        var beside = log.Where(d => d.Choice.Prefill && d.Snapshot.Decoding > 0 && d.Snapshot.ReadyDecoding > 0).ToList();
        Assert.NotEmpty(beside);
        Assert.All(beside, d => Assert.Equal(8, d.Choice.PrefillTokens));
        Assert.All(beside, d => Assert.True(d.Snapshot.DecodeStepsSinceChunk >= Math.Max(1, d.Snapshot.Decoding / d.Snapshot.Prefilling)));
    }

    [Theory]
    [InlineData(0, 64, 32, 64)]
    [InlineData(1, 64, 32, 32)]
    [InlineData(8, 64, 32, 32)]
    [InlineData(3, 64, 64, 64)]
    [InlineData(2, 32, 64, 32)]
    public void Policy_should_prefill_full_width_when_no_one_decodes_and_narrower_chunks_between_decode_steps(int decoding, int prefillWidth, int interleaved, int chunk)
    {
        Assert.Equal(chunk, StepPolicy.ChunkWidth(decoding, prefillWidth, interleaved));
    }

    [Theory]
    // All ready: plain round-robin.
    [InlineData("ABCD", 0, "", "A", "ABCD", 1)]
    [InlineData("ABCD", 3, "", "D", "ABCD", 0)]
    // A not ready at its turn: B steps in A's slot, A is next.
    [InlineData("ABCD", 0, "A", "B", "BACD", 1)]
    // Two not ready: C takes the head's slot, A and B move back one.
    [InlineData("ABCD", 0, "AB", "C", "CABD", 1)]
    // Wrapping around the end of the list.
    [InlineData("ABCD", 3, "D", "A", "DBCA", 0)]
    [InlineData("ABCD", 2, "CD", "A", "DBAC", 3)]
    // None ready.
    [InlineData("ABCD", 1, "ABCD", "", "ABCD", 1)]
    public void Policy_should_step_the_first_ready_session_and_keep_the_late_ones_next_in_line(string order, int next, string notReady, string picked, string after, int nextAfter)
    {
        var rotation = order.Select(c => c.ToString()).ToList();
        int n = next;
        var pick = StepPolicy.NextDecode(rotation, ref n, s => !notReady.Contains(s, StringComparison.Ordinal));
        Assert.Equal(picked, pick ?? "");
        Assert.Equal(after, string.Concat(rotation));
        Assert.Equal(nextAfter, n);
    }

    [Theory]
    // A session before the one whose turn it is finishes: that one keeps its turn.
    [InlineData("ABCD", 2, "A", "BCD", "C")]
    [InlineData("ABCD", 3, "B", "ACD", "D")]
    // The one whose turn it is finishes: the next one steps.
    [InlineData("ABCD", 2, "C", "ABD", "D")]
    // A later one finishes: no change.
    [InlineData("ABCD", 1, "D", "ABC", "B")]
    // The last one finishes at its turn: the turn wraps to the first.
    [InlineData("ABCD", 3, "D", "ABC", "A")]
    [InlineData("A", 0, "A", "", "")]
    // Not in the rotation.
    [InlineData("ABC", 1, "X", "ABC", "B")]
    public void Policy_should_keep_the_turn_on_the_same_session_when_another_finishes(string order, int next, string finished, string after, string turn)
    {
        var rotation = order.Select(c => c.ToString()).ToList();
        int n = next;
        bool removed = StepPolicy.Remove(rotation, finished, ref n);
        Assert.Equal(order.Contains(finished, StringComparison.Ordinal), removed);
        Assert.Equal(after, string.Concat(rotation));
        Assert.Equal(turn, rotation.Count == 0 ? "" : rotation[n]);
    }
}
