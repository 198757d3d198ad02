using CoordGen.Engine.Scheduling;

namespace CoordGen.Engine.Tests;

public class ProgressivePlannerTests
{
    private static BlockCosts Uniform(int n, double load, double g1, double g2) =>
        new([.. Enumerable.Repeat(load, n)], [.. Enumerable.Repeat(g1, n)], [.. Enumerable.Repeat(g2, n)]);

    [Fact]
    public void Greedy_should_reproduce_the_papers_figure_8_pattern_when_two_computes_hide_one_load()
    {
        // Six blocks, two chunks; a load takes as long as two G1 block computes (paper Fig. 8).
        var plan = ProgressivePlanner.Greedy(Uniform(6, 2, 1, 1.2), chunks: 2, startSlot: 0);

        Assert.Equal(new SwitchStep(5, 0), plan.Steps[0]); // P6 loads while P1, P2 compute
        Assert.Equal(new SwitchStep(4, 2), plan.Steps[1]); // P5 loads while P3, P4 compute
        Assert.Equal(0, plan.StallMs);
        Assert.True(plan.ReadyMs < ProgressivePlanner.Synchronous(Uniform(6, 2, 1, 1.2), 2).ReadyMs);
    }

    [Fact]
    public void Planner_should_lie_between_the_optimum_and_the_synchronous_switch_on_random_small_instances()
    {
        var rng = new Random(42);
        double worst = 1;
        string detail = "";
        for (int trial = 0; trial < 150; trial++)
        {
            int n = rng.Next(2, 5), chunks = rng.Next(1, 4);
            if (n * chunks > 12)
            {
                chunks = 12 / n;
            }

            var costs = new BlockCosts(
                [.. Enumerable.Range(0, n).Select(_ => rng.NextDouble() * 4)],
                [.. Enumerable.Range(0, n).Select(_ => 0.2 + rng.NextDouble())],
                [.. Enumerable.Range(0, n).Select(_ => 0.2 + (rng.NextDouble() * 2))]);
            var plan = ProgressivePlanner.Plan(costs, chunks);
            var best = ProgressivePlanner.BruteForce(costs, chunks);
            var sync = ProgressivePlanner.Synchronous(costs, chunks);

            Assert.True(plan.ReadyMs >= best.ReadyMs - 1e-9, $"trial {trial}: planner beat the exhaustive optimum");
            Assert.True(plan.ReadyMs <= sync.ReadyMs + 1e-9, $"trial {trial}: planner worse than switching after prefill");
            Assert.Equal(plan.ReadyMs, ProgressivePlanner.Simulate(costs, chunks, plan.Steps).ReadyMs, 9);
            if (plan.ReadyMs / best.ReadyMs > worst)
            {
                worst = plan.ReadyMs / best.ReadyMs;
                detail = $"n={n} chunks={chunks} load=[{string.Join(",", costs.LoadG2.Select(x => x.ToString("F2")))}] g1=[{string.Join(",", costs.ComputeG1.Select(x => x.ToString("F2")))}] g2=[{string.Join(",", costs.ComputeG2.Select(x => x.ToString("F2")))}] plan={string.Join(" ", plan.Steps)} {plan.PrefillEndMs:F2}/{plan.SwitchEndMs:F2} best={string.Join(" ", best.Steps)} {best.PrefillEndMs:F2}/{best.SwitchEndMs:F2}";
            }
        }

        // docs/decisions/0004-progressive-scheduling.md: worst ratio 1.225 over these 150 instances.
        Assert.True(worst < 1.25, $"worst planner/optimum ratio {worst:F3}: {detail}");
    }

    [Fact]
    public void A_memory_cap_should_trade_latency_for_fewer_blocks_holding_both_variants()
    {
        // The paper's figures (docs/bench/graphs-paper-qwen2.5-1.5b-htp.md): loads queued back to back are
        // fastest but leave several blocks holding both variants until they next compute.
        var costs = DeviceProfile.Load("paper-qwen2.5-1.5b-htp").Costs(6, 256, 32);
        var fast = ProgressivePlanner.Plan(costs, 4);
        var capped = ProgressivePlanner.Plan(costs, 4, maxBothBlocks: 1);
        var sync = ProgressivePlanner.Synchronous(costs, 4);

        Assert.True(fast.PeakBothBlocks > 1, $"uncapped plan holds {fast.PeakBothBlocks}");
        Assert.True(capped.PeakBothBlocks <= 1);
        Assert.True(capped.ReadyMs >= fast.ReadyMs - 1e-9);
        Assert.True(capped.ReadyMs < sync.ReadyMs, "the capped plan should still beat switching after prefill");
        Assert.Equal(0, sync.PeakBothBlocks); // after its last wide compute a block frees G1 before loading G2
    }

    [Fact]
    public void Simulation_should_stall_a_block_whose_own_load_is_still_running()
    {
        // One block, one chunk: loading it first makes its compute wait for the load, then run on G2.
        var costs = Uniform(1, 5, 1, 2);
        var plan = ProgressivePlanner.Simulate(costs, 1, [new SwitchStep(0, 0)]);
        Assert.Equal(5, plan.StallMs);
        Assert.Equal(7, plan.PrefillEndMs);
        Assert.Equal(6, ProgressivePlanner.Plan(costs, 1).ReadyMs); // compute on G1, then load
    }

    [Fact]
    public void Simulate_should_refuse_plans_that_switch_a_block_twice_or_reorder_loads()
    {
        var costs = Uniform(3, 1, 1, 1);
        Assert.Throws<ArgumentException>(() => ProgressivePlanner.Simulate(costs, 1, [new SwitchStep(0, 0), new SwitchStep(0, 1)]));
        Assert.Throws<ArgumentException>(() => ProgressivePlanner.Simulate(costs, 1, [new SwitchStep(0, 2), new SwitchStep(1, 1)]));
        Assert.Throws<ArgumentException>(() => ProgressivePlanner.Plan(costs, 0));
    }
}
