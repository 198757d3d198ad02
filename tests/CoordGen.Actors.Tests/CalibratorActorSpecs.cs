using CoordGen.Messages;
using Akka.TestKit.Xunit2;
using CoordGen.Actors.Device;
using CoordGen.Engine.Speculative;

namespace CoordGen.Actors.Tests;

public class CalibratorActorSpecs : TestKit
{
    private const int Vocab = 16;

    /// <summary>The top-k rows (what the device sends) of <see cref="Logits"/>.</summary>
    private static TopRows Rows(int[] context, int from, int count, Random rng) => Top(Logits(context, from, count, rng), new CalibrationOptions().TopK);

    private static TopRows Top(float[] logits, int k)
    {
        var scan = new PrefillTopK(k);
        scan.AddRows(logits, Vocab);
        return scan.ToRows();
    }

    /// <summary>Peaked logits: position p strongly predicts the context token at p + 1 (so calibrated paths form).</summary>
    private static float[] Logits(int[] context, int from, int count, Random rng)
    {
        var rows = new float[count * Vocab];
        for (int r = 0; r < count; r++)
        {
            for (int v = 0; v < Vocab; v++)
            {
                rows[(r * Vocab) + v] = (float)rng.NextDouble();
            }

            int pos = from + r;
            int next = pos + 1 < context.Length ? context[pos + 1] : 0;
            rows[(r * Vocab) + ((next + (pos % 3 == 0 ? 1 : 0)) % Vocab)] += 6; // every third position drifts
        }

        return rows;
    }

    [Fact]
    public void Calibrator_should_build_from_chunks_in_order_the_index_the_engine_builds_in_place()
    {
        var rng = new Random(3);
        int[] context = [.. Enumerable.Range(0, 40).Select(_ => rng.Next(Vocab))];
        var options = new CalibrationOptions();
        var chunks = new[] { Logits(context, 0, 16, rng), Logits(context, 16, 16, rng), Logits(context, 32, 8, rng) };
        var inPlace = new PrefillTopK(options.TopK);
        foreach (var c in chunks)
        {
            inPlace.AddRows(c, Vocab);
        }

        var expected = CalibratedIndex.Build(context, inPlace, options);

        var calibrator = Sys.ActorOf(CalibratorActor.Props(TestActor));
        var key = new SessionRun(new SessionId("s"), 1);
        foreach (var c in chunks)
        {
            calibrator.Tell(new CalibratorProtocol.Chunk(key, Top(c, options.TopK)), TestActor);
        }

        calibrator.Tell(new CalibratorProtocol.Finish(key, [.. context], "sam+ours", 8, Share: false), TestActor);
        var done = ExpectMsg<DrafterProtocol.Calibrated>();
        Assert.Equal(key, done.Run);
        Assert.NotNull(done.Paths);
        Assert.True(expected.Paths > 0, "the test's logits should make calibrated paths");
        Assert.Equal(expected.Paths, done.Paths!.Paths);
        Assert.Equal(expected.Automaton.Text, CalibratedIndex.From(done.Paths).Automaton.Text);
    }

    [Fact]
    public void A_cancelled_or_unknown_session_should_get_no_index_and_leave_others_alone()
    {
        var rng = new Random(5);
        int[] context = [.. Enumerable.Range(0, 20).Select(_ => rng.Next(Vocab))];
        var options = new CalibrationOptions();
        var calibrator = Sys.ActorOf(CalibratorActor.Props(TestActor));
        SessionRun gone = new(new SessionId("gone"), 1), kept = new(new SessionId("kept"), 2);
        calibrator.Tell(new CalibratorProtocol.Chunk(gone, Rows(context, 0, 20, rng)), TestActor);
        calibrator.Tell(new CalibratorProtocol.Chunk(kept, Rows(context, 0, 20, rng)), TestActor);
        calibrator.Tell(new CalibratorProtocol.Cancel(gone), TestActor);
        calibrator.Tell(new CalibratorProtocol.Finish(gone, [.. context], "sam+ours", 8, Share: false), TestActor);
        calibrator.Tell(new CalibratorProtocol.Finish(kept, [.. context], "sam+ours", 8, Share: false), TestActor);

        Assert.Null(ExpectMsg<DrafterProtocol.Calibrated>().Paths);
        Assert.NotNull(ExpectMsg<DrafterProtocol.Calibrated>().Paths);
    }

    /// <summary>A long prompt's top-k rows and context, as one chunk.</summary>
    private static (int[] Context, TopRows Rows, PrefillTopK InPlace) LongPrompt(int length, int seed)
    {
        var rng = new Random(seed);
        int[] context = [.. Enumerable.Range(0, length).Select(_ => rng.Next(Vocab))];
        var logits = Logits(context, 0, length, rng);
        var inPlace = new PrefillTopK(new CalibrationOptions().TopK);
        inPlace.AddRows(logits, Vocab);
        return (context, Top(logits, new CalibrationOptions().TopK), inPlace);
    }

    [Fact]
    public void Shared_build_should_come_in_slices_to_the_same_index()
    {
        // 20,000 positions: a 6,000-position build once fit in one 1 ms slice on a quick moment of this machine.
        var (context, rows, inPlace) = LongPrompt(20000, 9);
        var options = new CalibrationOptions();
        var expected = CalibratedIndex.Build(context, inPlace, options);
        var calibrator = Sys.ActorOf(CalibratorActor.Props(TestActor));
        var key = new SessionRun(new SessionId("s"), 1);
        calibrator.Tell(new CalibratorProtocol.Chunk(new SessionRun(new SessionId("sliced-build"), 1), rows), TestActor);

        using var spans = new SpanRecorder();
        calibrator.Tell(new CalibratorProtocol.Finish(new SessionRun(new SessionId("sliced-build"), 1), [.. context], "sam+ours", 8, Share: true), TestActor);
        var done = ExpectMsg<DrafterProtocol.Calibrated>(TimeSpan.FromSeconds(30));

        Assert.Equal(expected.Paths, done.Paths!.Paths);
        Assert.Equal(expected.Automaton.Text, CalibratedIndex.From(done.Paths).Automaton.Text);
        var span = Assert.Single(spans.Spans, s => s.OperationName == "coordgen.calibrate" && (string?)s.GetTagItem("coordgen.session") == "sliced-build");
        Assert.True((int)span.GetTagItem("coordgen.calibrate_slices")! > 1, "a 20,000-position build should take more than one 1 ms slice");
    }

    [Fact]
    public void A_session_cancelled_during_a_shared_build_should_get_no_answer()
    {
        var (context, rows, _) = LongPrompt(20000, 10);
        var options = new CalibrationOptions();
        var calibrator = Sys.ActorOf(CalibratorActor.Props(TestActor));
        var key = new SessionRun(new SessionId("s"), 1);
        calibrator.Tell(new CalibratorProtocol.Chunk(key, rows), TestActor);
        calibrator.Tell(new CalibratorProtocol.Finish(key, [.. context], "sam+ours", 8, Share: false) { Share = true }, TestActor);
        calibrator.Tell(new CalibratorProtocol.Cancel(key), TestActor);

        ExpectNoMsg(TimeSpan.FromMilliseconds(500));
    }
}
