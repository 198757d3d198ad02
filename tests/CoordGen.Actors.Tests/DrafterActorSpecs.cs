using System.Collections.Immutable;
using Akka.TestKit.Xunit2;
using CoordGen.Actors.Device;
using CoordGen.Engine.Speculative;
using CoordGen.Messages;
using static CoordGen.Messages.DrafterProtocol;

namespace CoordGen.Actors.Tests;

/// <summary>The drafter actor owns each run's drafting state and answers every advance with a tree, from messages alone.</summary>
public class DrafterActorSpecs : TestKit
{
    // A prompt that repeats itself, so the suffix automaton has continuations to draft.
    private static readonly int[] Prompt = [.. Enumerable.Range(0, 6).SelectMany(_ => new[] { 4, 9, 2, 7, 5, 11, 3 })];

    private static SessionRun Run(string id) => new(new SessionId(id), 1);

    private static Open OpenFor(SessionRun run) => new(run, [.. Prompt], 32, "sam+ours", 8, false, null);

    [Fact]
    public void Its_trees_should_be_the_ones_a_session_drafter_makes_from_the_same_messages()
    {
        var drafter = ChildActorOf(DrafterActor.Props());
        var run = Run("a");
        var local = new SessionDrafter(Prompt, 32, SpeculationOptions.ForRequest("sam+ours", 8, false, false), null);
        drafter.Tell(OpenFor(run), TestActor);

        // The first token commits (no step verified yet): the tree for step 1.
        drafter.Tell(new Advance(run, 0, null, [4]), TestActor);
        var first = ExpectMsg<Proposal>();
        var expected = local.Advance(null, [4]);
        Assert.Equal((run, 1), (first.Run, first.Step));
        Assert.True(first.Tree.Count > 0, "a repeating prompt should give a tree");
        Assert.Equal(expected.Tokens.ToArray(), first.Tree.Tokens.ToArray());
        Assert.Equal(expected.Parents.ToArray(), first.Tree.Parents.ToArray());
        Assert.NotEmpty(first.Work);

        // The device runs step 1 (the drafter drafts ahead meanwhile), which accepts the first node: the tree for step 2 learns from it.
        drafter.Tell(new StepStarted(run, 1), TestActor);
        int token = first.Tree.Tokens[0];
        var outcome = new StepOutcome(8, [token, 2], [0, 1], [token, 2, 0, 0, 0, 0, 0, 0]);
        drafter.Tell(new Advance(run, 1, outcome, [token, 2]), TestActor);
        var second = ExpectMsg<Proposal>();
        local.PrepareAhead();
        Assert.Equal(local.Advance(outcome, [token, 2]).Tokens.ToArray(), second.Tree.Tokens.ToArray());
        Assert.Equal(2, second.Step);
    }

    [Fact]
    public void An_advance_for_a_run_it_does_not_hold_should_get_an_empty_degraded_tree_never_silence()
    {
        var drafter = ChildActorOf(DrafterActor.Props());
        var run = Run("b");
        drafter.Tell(new Advance(run, 3, null, [1]), TestActor);
        var p = ExpectMsg<Proposal>();
        Assert.Equal(4, p.Step);
        Assert.Equal(0, p.Tree.Count);
        Assert.True(p.Tree.Degraded);

        // A closed run is gone too.
        drafter.Tell(OpenFor(run), TestActor);
        drafter.Tell(new Close(run), TestActor);
        drafter.Tell(new Advance(run, 0, null, [4]), TestActor);
        Assert.True(ExpectMsg<Proposal>().Tree.Degraded);
    }

    [Fact]
    public void Calibrated_paths_should_join_the_runs_next_tree_and_be_dropped_for_a_run_it_does_not_hold()
    {
        // One calibrated path: after "2 7" the context's next tokens are replaced by 13 14 15.
        var paths = new CalibratedPaths([2, 7, 13, 14, 15, -1], 1);
        var drafter = ChildActorOf(DrafterActor.Props());
        var run = Run("c");
        drafter.Tell(new DrafterProtocol.Calibrated(Run("closed"), paths, 1.0), TestActor); // a run closed already: dropped
        drafter.Tell(OpenFor(run), TestActor);
        drafter.Tell(new DrafterProtocol.Calibrated(run, paths, 1.0), TestActor);
        drafter.Tell(new Advance(run, 0, null, [4, 9, 2, 7]), TestActor);
        var got = ExpectMsg<Proposal>();

        var local = new SessionDrafter(Prompt, 32, SpeculationOptions.ForRequest("sam+ours", 8, false, false), null);
        local.AttachCalibration(CalibratedIndex.From(paths));
        var expected = local.Advance(null, [4, 9, 2, 7]);
        Assert.Equal(expected.Tokens.ToArray(), got.Tree.Tokens.ToArray());
        Assert.Contains((byte)DraftSource.Calibrated, got.Tree.Sources);

        drafter.Tell(new Advance(Run("closed"), 0, null, [4]), TestActor);
        Assert.True(ExpectMsg<Proposal>().Tree.Degraded, "a calibration for an unknown run must not open it");
    }

    [Fact]
    public void A_failed_calibration_should_mark_the_next_tree_degraded_and_drafting_should_go_on()
    {
        var drafter = ChildActorOf(DrafterActor.Props());
        var run = Run("d");
        drafter.Tell(OpenFor(run), TestActor);
        drafter.Tell(new DrafterProtocol.Calibrated(run, null, 0), TestActor);
        drafter.Tell(new Advance(run, 0, null, [4]), TestActor);
        var p = ExpectMsg<Proposal>();
        Assert.True(p.Tree.Degraded);
        Assert.True(p.Tree.Count > 0);
        drafter.Tell(new Advance(run, 1, new StepOutcome(1, [9], [0], [9]), [9]), TestActor);
        Assert.False(ExpectMsg<Proposal>().Tree.Degraded);
    }

    [Fact]
    public void Drafts_should_come_from_the_prompt_it_was_opened_with()
    {
        var drafter = ChildActorOf(DrafterActor.Props());
        var run = Run("e");
        drafter.Tell(new Open(run, ImmutableArray.Create(1, 2, 3), 8, "sam", 4, false, null), TestActor);
        drafter.Tell(new Advance(run, 0, null, [1, 2]), TestActor);
        var p = ExpectMsg<Proposal>();
        Assert.Equal(3, p.Tree.Tokens[0]);
    }
}
