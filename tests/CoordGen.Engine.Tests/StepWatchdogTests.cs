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
    public void Negative_watchdog_should_be_refused()
    {
        var ex = Assert.Throws<ArgumentException>(() => new RuntimeOptions { StepWatchdog = TimeSpan.FromSeconds(-1) }.Validate());
        Assert.Contains("step watchdog", ex.Message);
    }
}
