using CoordGen.Engine.Runtime;

namespace CoordGen.Engine.Tests;

public class FaultPlanTests
{
    [Fact]
    public void Actor_layer_faults_should_be_taken_once_each_by_their_own_hook_until_the_budget_is_spent()
    {
        var plan = new FaultPlan(seed: 7, budget: 3, meanGap: 2, kinds: [FaultKind.DeviceActorCrash]);
        int crashes = 0;
        for (int step = 0; step < 200 && !plan.Exhausted; step++)
        {
            plan.OnDeviceStep(); // arms a fault now and then; device-actor crashes never fire here
            Assert.False(plan.TryTakeSessionKill());
            if (plan.TryTakeDeviceActorCrash())
            {
                crashes++;
                Assert.False(plan.TryTakeDeviceActorCrash()); // taken once
            }
        }

        Assert.Equal(3, crashes);
        Assert.Equal(3, plan.ByKind[FaultKind.DeviceActorCrash]);
        Assert.False(plan.TryTakeDeviceActorCrash());
    }
}
