using System.CommandLine;

namespace CoordGen.Host.Commands;

/// <summary><c>coordgen bench ...</c>: reproducible measurements written under docs/bench/.</summary>
internal static class BenchCommands
{
    public static Command Create()
    {
        var cmd = new Command("bench", "Benchmarks. Each writes Markdown, JSON and PNG under docs/bench/, stamped with commit and machine.");
        cmd.Add(BenchAccept.Create());
        cmd.Add(BenchFaults.Create());
        cmd.Add(BenchSoak.Create());
        cmd.Add(BenchGraphs.Create());
        cmd.Add(BenchPaper.Create());
        cmd.Add(BenchSessions.Create());
        cmd.Add(BenchOverlap.Create());
        cmd.Add(BenchPacked.Create());
        cmd.Add(BenchRebalance.Create());
        cmd.Add(BenchPeers.Create());
        cmd.Add(BenchPrefix.Create());
        cmd.Add(BenchKv.Create());
        cmd.Add(BenchAttention.Create());
        return cmd;
    }
}
