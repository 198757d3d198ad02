using CoordGen.Engine.Speculative;
using CoordGen.Messages;

namespace CoordGen.Engine.Tests;

/// <summary>The per-node acceptance estimates the width budget across sessions ranks packs by (decision 0028).</summary>
public class NodeAcceptanceTests
{
    // A chain of prompt-lookup nodes 0-1-2 and a calibrated sibling 3 of node 0.
    private static readonly DraftProposal Tree = new(
        [11, 12, 13, 21], [-1, 0, 1, -1], [(byte)DraftSource.Prompt, (byte)DraftSource.Prompt, (byte)DraftSource.Prompt, (byte)DraftSource.Calibrated], [0, 1, 2], 0);

    [Fact]
    public void Before_any_step_nodes_should_get_the_prior_of_half_per_depth_and_siblings_share_their_parent()
    {
        var a = new NodeAcceptance();
        Assert.Equal(0.5, a.Reach(1), 12);
        Assert.Equal(0.125, a.Reach(3), 12);

        // Root's token, then 0.5, 0.25, 0.125 down the chain; the sibling at depth 1 gets what node 0 leaves of the root (0.5).
        Assert.Equal(1.0, a.ExpectedTokens(Tree, 1), 12);
        Assert.Equal(1.5, a.ExpectedTokens(Tree, 2), 12);
        Assert.Equal(1.875, a.ExpectedTokens(Tree, 4), 12);
        Assert.Equal(2.375, a.ExpectedTokens(Tree, 5), 12);
        Assert.Equal(2.375, a.ExpectedTokens(Tree, 16), 12); // a wider graph than the tree adds nothing
    }

    [Fact]
    public void Nodes_of_a_source_and_depth_that_keep_being_accepted_should_be_worth_more_than_those_that_do_not()
    {
        var a = new NodeAcceptance();
        for (int step = 0; step < 40; step++)
        {
            a.Observe(Tree, 4, [0, 1, 2, 3]); // the whole chain accepted, the calibrated sibling not
        }

        Assert.True(a.NodeChance((byte)DraftSource.Prompt, 1) > 0.95);
        Assert.True(a.NodeChance((byte)DraftSource.Prompt, 3) > 0.95);
        Assert.True(a.NodeChance((byte)DraftSource.Calibrated, 1) < 0.1);
        Assert.True(a.Reach(3) > 0.85);
        double chain = a.ExpectedTokens(Tree, 4);
        Assert.True(chain > 3.85 && chain <= 4, $"{chain}");
        Assert.True(a.ExpectedTokens(Tree, 5) - chain < 0.05); // the sibling adds almost nothing

        // The same tree's nodes after steps that accepted nothing: back towards one token per step.
        for (int step = 0; step < 120; step++)
        {
            a.Observe(Tree, 4, [0]);
        }

        Assert.True(a.ExpectedTokens(Tree, 5) < 1.1, $"{a.ExpectedTokens(Tree, 5)}");
    }

    [Fact]
    public void Siblings_together_should_never_be_likelier_than_their_parent()
    {
        // Two prompt nodes at depth 1 that (as nodes of their source and depth) are always accepted.
        var a = new NodeAcceptance();
        var chain = new DraftProposal([5], [-1], [(byte)DraftSource.Prompt], [0], 0);
        for (int step = 0; step < 50; step++)
        {
            a.Observe(chain, 1, [0, 1]);
        }

        var siblings = new DraftProposal([5, 6], [-1, -1], [(byte)DraftSource.Prompt, (byte)DraftSource.Prompt], [0], 0);
        Assert.True(a.ExpectedTokens(siblings, 3) <= 2.0 + 1e-12);
        Assert.True(a.ExpectedTokens(siblings, 3) > 1.95);
    }

    [Fact]
    public void Only_depths_the_tree_could_go_on_to_should_count_as_chances()
    {
        // Steps at width 2 verify one node: a path that took it could not go further, so depth 2 keeps its prior.
        var a = new NodeAcceptance();
        for (int step = 0; step < 30; step++)
        {
            a.Observe(Tree, 1, [0, 1]);
        }

        Assert.True(a.Reach(1) > 0.9);
        Assert.Equal(a.Reach(1) * 0.5, a.Reach(2), 12);
    }
}
