using System.Diagnostics;
using Akka.Actor;
using Akka.TestKit.Xunit2;
using CoordGen.Actors.Device;
using CoordGen.Engine.Generation;
using CoordGen.Engine.Speculative;
using CoordGen.Messages;
using static CoordGen.Messages.VerifierProtocol;

namespace CoordGen.Actors.Tests;

public class VerifierActorSpecs : TestKit
{
    private const int Vocab = 8;

    // Node 0 = 3 (root child), node 1 = 5 (child of 0), node 2 = 6 (root child).
    private static readonly int[] Tokens = [3, 5, 6];
    private static readonly int[] Parents = [-1, 0, -1];

    private static float[] RandomLogits(int rows, int seed)
    {
        var rng = new Random(seed);
        return [.. Enumerable.Range(0, rows * Vocab).Select(_ => (float)(rng.NextDouble() * 2))];
    }

    [Fact]
    public async Task A_greedy_step_should_be_answered_with_the_accepted_path_and_its_step_number()
    {
        var drafter = CreateTestProbe();
        var verifier = Sys.ActorOf(VerifierActor.Props(drafter.Ref));
        var key = new SessionRun(new SessionId("s"), 1);
        verifier.Tell(new Verify(key, new TreeToVerify(7, Tokens, Parents, [3, 5, 2, 0], default, Vocab, 0), new GenerationProtocol.Sampling(), OutcomeWidth: 8));
        var v = await ExpectMsgAsync<Verified>();
        Assert.Equal(key, v.Run);
        Assert.Equal(7, v.Verdict.Step);
        Assert.Equal([3, 5, 2], v.Verdict.Emitted);
        Assert.Equal([0, 1, 2], v.Verdict.Rows);

        // The drafter learns the outcome at once, to draft the next tree beside the verdict.
        var advance = await drafter.ExpectMsgAsync<DrafterProtocol.Advance>();
        Assert.Equal((key, 7), (advance.Run, advance.Step));
        Assert.Equal([3, 5, 2], advance.Committed.ToArray());
        Assert.Equal(8, advance.Outcome!.Width);
        Assert.Equal([0, 1, 2], advance.Outcome.KeptRows.ToArray());
        Assert.Equal([3, 5, 2, 0], advance.Outcome.RowArgmax.ToArray());
    }

    [Fact]
    public async Task A_sessions_sampled_steps_should_continue_one_random_stream_as_inline_sampling_does()
    {
        var sampling = new GenerationProtocol.Sampling(Temperature: 1f, Seed: 11);
        var inline = new Sampler(new SamplingOptions { Temperature = 1f, Seed = 11 });
        var verifier = Sys.ActorOf(VerifierActor.Props(CreateTestProbe().Ref));
        var key = new SessionRun(new SessionId("s"), 1);
        long draws = 0;
        for (int step = 1; step <= 6; step++)
        {
            var tree = new TreeToVerify(step, Tokens, Parents, [0, 0, 0, 0], RandomLogits(4, step), Vocab, draws);
            var expected = TreeVerifier.Verify(tree, inline);
            verifier.Tell(new Verify(key, tree, sampling, OutcomeWidth: 8));
            var got = (await ExpectMsgAsync<Verified>()).Verdict;
            Assert.Equal(expected.Emitted, got.Emitted);
            Assert.Equal(expected.Draws, got.Draws);
            draws = got.Draws;
        }

        // Another session with the same seed has its own stream, from its own position.
        var fresh = new Sampler(new SamplingOptions { Temperature = 1f, Seed = 11 });
        var first = new TreeToVerify(1, Tokens, Parents, [0, 0, 0, 0], RandomLogits(4, 1), Vocab, 0);
        verifier.Tell(new Verify(new SessionRun(new SessionId("t"), 2), first, sampling, OutcomeWidth: 8));
        Assert.Equal(TreeVerifier.Verify(first, fresh).Emitted, (await ExpectMsgAsync<Verified>()).Verdict.Emitted);
    }

    [Fact]
    public async Task A_step_it_cannot_verify_should_be_answered_with_a_failure_and_the_verifier_should_keep_serving()
    {
        var verifier = Sys.ActorOf(VerifierActor.Props(CreateTestProbe().Ref));
        var key = new SessionRun(new SessionId("s"), 1);

        // Sampling, but the device sent no logits rows.
        verifier.Tell(new Verify(key, new TreeToVerify(4, Tokens, Parents, [3, 5, 2, 0], default, Vocab, 0), new GenerationProtocol.Sampling(Temperature: 0.7f), OutcomeWidth: 8));
        var failed = await ExpectMsgAsync<VerifyFailed>();
        Assert.Equal(key, failed.Run);
        Assert.Equal(4, failed.Step);
        Assert.Contains("logits", failed.Reason);

        verifier.Tell(new Verify(key, new TreeToVerify(5, Tokens, Parents, [6, 5, 2, 1], default, Vocab, 0), new GenerationProtocol.Sampling(), OutcomeWidth: 8));
        var after = await ExpectMsgAsync<Verified>();
        Assert.Equal(new[] { 6, 1 }, after.Verdict.Emitted);
    }

    [Fact]
    public async Task Its_span_should_be_a_child_of_the_requests_trace()
    {
        using var spans = new SpanRecorder();
        using var root = new Activity("request").Start();
        var verifier = Sys.ActorOf(VerifierActor.Props(CreateTestProbe().Ref));
        verifier.Tell(new Verify(new SessionRun(new SessionId("s1"), 1), new TreeToVerify(1, Tokens, Parents, [3, 1, 0, 0], default, Vocab, 0), new GenerationProtocol.Sampling(), 8, root.Context));
        await ExpectMsgAsync<Verified>();
        await AwaitConditionAsync(() => Task.FromResult(spans.Spans.Any(s => s.OperationName == "coordgen.verify" && s.ParentSpanId == root.SpanId)));
        var span = spans.Spans.First(s => s.OperationName == "coordgen.verify" && s.ParentSpanId == root.SpanId);
        Assert.Equal("s1", span.GetTagItem("coordgen.session"));
        Assert.Equal(1, span.GetTagItem("coordgen.accepted"));
    }
}
