using CoordGen.Engine.Scheduling;

namespace CoordGen.Engine.Tests;

public class DeviceProfileTests
{
    [Fact]
    public void Shipped_paper_profile_should_give_the_papers_step_times_and_say_it_is_not_measured()
    {
        Assert.Contains("paper-qwen2.5-1.5b-htp", DeviceProfile.Shipped);
        var p = DeviceProfile.Load("paper-qwen2.5-1.5b-htp");
        Assert.Equal(51.1, p.StepMs(1), 3);
        Assert.Equal(5.7, p.StepMs(32) / 32, 3);
        Assert.False(p.Measured);
        Assert.Contains("what-if", p.Label);
        Assert.Contains("not measured", p.Label);
    }

    [Fact]
    public void Step_time_should_be_piecewise_linear_and_extend_past_the_ends()
    {
        var p = new DeviceProfile { Name = "t", Steps = [new(1, 10), new(9, 50), new(17, 60)], Blocks = 2, LoadMsPerBlock = 8 };
        Assert.Equal(30, p.StepMs(5), 6);
        Assert.Equal(55, p.StepMs(13), 6);
        Assert.Equal(70, p.StepMs(25), 6);
        var costs = p.Costs(blocks: 4, wide: 16, narrow: 8);
        Assert.Equal(4, costs.LoadG2[0], 6); // 8 ms per block of 2 is 4 ms per block of 4
        Assert.Equal(p.StepMs(16) / 4, costs.ComputeG1[0], 6);
        Assert.Equal(2 * p.StepMs(8) / 4, costs.ComputeG2[0], 6); // the 16-token chunk as two 8-wide runs, per block of 4
    }

    [Fact]
    public void Unknown_or_malformed_profiles_should_say_what_to_give()
    {
        var missing = Assert.Throws<FileNotFoundException>(() => DeviceProfile.Load("no-such-device"));
        Assert.Contains("paper-qwen2.5-1.5b-htp", missing.Message);
        string bad = Path.GetTempFileName();
        File.WriteAllText(bad, "{ \"name\": \"x\", \"step_ms\": [] }");
        var invalid = Assert.Throws<ArgumentException>(() => DeviceProfile.Load(bad));
        Assert.Contains("step_ms", invalid.Message);
        File.WriteAllText(bad, "{ not json");
        Assert.Throws<ArgumentException>(() => DeviceProfile.Load(bad));
        File.Delete(bad);
    }
}
