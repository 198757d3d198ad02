using CoordGen.Engine.Model;
using CoordGen.Engine.Runtime;

namespace CoordGen.Engine.Tests;

/// <summary>The step watchdog ends real graph runs that overrun it (RunOptions.Terminate), and the runtime stays sound.</summary>
public class StepWatchdogTests
{
    private static readonly Lazy<ModelBundle> Demo = new(() => ModelBundle.Load(Paths.DemoModel));

    private static float[] PrefillLogits(OrtModelRuntime rt, int[] prompt)
    {
        using var cache = rt.CreateCache();
        return new Generation.Generator(rt).Prefill(cache, prompt);
    }

    [Fact]
    public void Watchdog_should_end_an_overrunning_run_and_let_a_retry_through_with_identical_logits()
    {
        var demo = Demo.Value;
        int[] prompt = [.. Enumerable.Range(0, 600).Select(i => 100 + (i * 7 % 900))];
        using var reference = new OrtModelRuntime(demo.Weights, 1024, [1, 640], new RuntimeOptions { StepWatchdog = TimeSpan.Zero });
        float[] want = PrefillLogits(reference, prompt);

        // The prompt is prefilled in one 640-wide run (about 100 ms for this model here); a 1 ms watchdog ends it mid-way.
        using var rt = new OrtModelRuntime(demo.Weights, 1024, [1, 640], new RuntimeOptions { StepWatchdog = TimeSpan.FromMilliseconds(1) });
        var ex = Assert.Throws<DeviceFaultException>(() => PrefillLogits(rt, prompt));
        Assert.Contains("step watchdog", ex.Message);
        Assert.True(rt.WatchdogTerminations >= 1);

        // Each ending doubles the graph's limit, so retries get through, and the ended runs left nothing behind.
        float[]? got = null;
        for (int attempt = 0; attempt < 16 && got is null; attempt++)
        {
            try
            {
                got = PrefillLogits(rt, prompt);
            }
            catch (DeviceFaultException)
            {
            }
        }

        Assert.NotNull(got);
        Assert.Equal(want, got);
    }

    [Fact]
    public void An_injected_hang_should_keep_the_device_computing_until_the_watchdog_ends_it_and_leave_the_graphs_limit_alone()
    {
        var demo = Demo.Value;
        int[] prompt = [.. Enumerable.Range(0, 40).Select(i => 100 + (i * 7 % 900))];
        using var reference = new OrtModelRuntime(demo.Weights, 256, [1, 64], new RuntimeOptions { StepWatchdog = TimeSpan.Zero });
        float[] want = PrefillLogits(reference, prompt);

        // Every step is a hang candidate; the plan arms one hang (budget 1) at its first step.
        using var rt = new OrtModelRuntime(demo.Weights, 256, [1, 64], new RuntimeOptions { StepWatchdog = TimeSpan.FromSeconds(30) })
        {
            Faults = new FaultPlan(seed: 3, budget: 1, meanGap: 1, kinds: [FaultKind.DeviceHang], hang: TimeSpan.FromMilliseconds(40)),
        };
        var clock = System.Diagnostics.Stopwatch.StartNew();
        var ex = Assert.Throws<DeviceFaultException>(() => PrefillLogits(rt, prompt));
        Assert.Contains("injected hang", ex.Message);
        Assert.Equal(1, rt.WatchdogTerminations);

        // It ran past its 40 ms (a run here takes about a millisecond: many real runs) and was ended soon after, not at the graph's 30 s limit.
        Assert.InRange(clock.Elapsed.TotalMilliseconds, 40, 5_000);

        // The graph's own limit did not double, and the next run goes through with the same logits.
        Assert.Equal(want, PrefillLogits(rt, prompt));
    }

    [Fact]
    public void Negative_watchdog_should_be_refused()
    {
        var ex = Assert.Throws<ArgumentException>(() => new RuntimeOptions { StepWatchdog = TimeSpan.FromSeconds(-1) }.Validate());
        Assert.Contains("step watchdog", ex.Message);
    }
}
