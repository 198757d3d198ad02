using CoordGen.Actors.Device;
using CoordGen.Engine.Model;
using CoordGen.Engine.Runtime;

namespace CoordGen.Actors.Tests;

/// <summary>The runtime a restarted device borrows again: when it is reused, when it is not, and that it never has two holders.</summary>
public class RuntimeKeeperTests
{
    private static readonly ModelWeights Weights = TinyModel.Weights(11, 0.5f);

    private static (RuntimeKeeper Keeper, List<OrtModelRuntime> Built) NewKeeper(bool reuse = true)
    {
        var built = new List<OrtModelRuntime>();
        var keeper = new RuntimeKeeper(
            () =>
            {
                var rt = new OrtModelRuntime(Weights, 128, [1]);
                built.Add(rt);
                return rt;
            },
            reuse);
        return (keeper, built);
    }

    [Fact]
    public void A_runtime_given_back_after_a_finished_step_goes_to_the_next_device()
    {
        var (keeper, built) = NewKeeper();
        using (keeper)
        {
            var first = keeper.Borrow();
            keeper.GiveBack(first, Task.CompletedTask);
            var second = keeper.Borrow();

            Assert.Same(first, second);
            Assert.Single(built);
            Assert.Equal((1, 1), (keeper.Built, keeper.Reused));
            keeper.GiveBack(second, null);
        }
    }

    [Fact]
    public void A_runtime_whose_last_step_failed_is_disposed_and_the_next_device_builds_a_new_one()
    {
        var (keeper, built) = NewKeeper();
        using (keeper)
        {
            var first = keeper.Borrow();
            keeper.GiveBack(first, Task.FromException(new InvalidOperationException("the step failed")));
            var second = keeper.Borrow();

            Assert.NotSame(first, second);
            Assert.Equal(2, built.Count);
            Assert.Equal((2, 0), (keeper.Built, keeper.Reused));
            Assert.True(first.IsDisposed);
            Assert.Throws<ObjectDisposedException>(() => first.Buffers(1, first.CreateCache()));
            second.Dispose();
        }
    }

    [Fact]
    public async Task The_next_device_waits_for_the_step_still_running_under_the_stopped_one()
    {
        var (keeper, built) = NewKeeper();
        using (keeper)
        {
            var first = keeper.Borrow();
            var step = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            keeper.GiveBack(first, step.Task);
            var borrowing = Task.Run(keeper.Borrow);

            await Task.Delay(200);
            Assert.False(borrowing.IsCompleted, "the runtime was handed out while a step still ran on it");
            step.SetResult();

            Assert.Same(first, await borrowing.WaitAsync(TimeSpan.FromSeconds(10)));
            Assert.Single(built);
            first.Dispose();
        }
    }

    [Fact]
    public void Without_reuse_every_device_builds_its_own_runtime()
    {
        var (keeper, built) = NewKeeper(reuse: false);
        using (keeper)
        {
            var first = keeper.Borrow();
            keeper.GiveBack(first, null);
            var second = keeper.Borrow();

            Assert.NotSame(first, second);
            Assert.Equal(2, built.Count);
            second.Dispose();
        }
    }

    [Fact]
    public void After_disposal_a_returning_runtime_is_disposed_and_borrowing_is_refused()
    {
        var (keeper, _) = NewKeeper();
        var first = keeper.Borrow();
        keeper.Dispose();
        keeper.GiveBack(first, null);

        Assert.True(first.IsDisposed);
        Assert.Throws<ObjectDisposedException>(() => first.Buffers(1, first.CreateCache()));
        Assert.Throws<ObjectDisposedException>(keeper.Borrow);
    }
}
