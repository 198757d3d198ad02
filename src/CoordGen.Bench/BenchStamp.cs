using System.Diagnostics;
using System.Runtime.InteropServices;

namespace CoordGen.Host;

/// <summary>Commit, machine and time a benchmark ran on, stamped into every report.</summary>
internal sealed record BenchStamp(string Commit, string Machine, int Cores, string Os, string Runtime, DateTimeOffset When)
{
    public static BenchStamp Capture()
    {
        string commit = "unknown";
        try
        {
            var psi = new ProcessStartInfo("git", "rev-parse --short HEAD") { RedirectStandardOutput = true, RedirectStandardError = true, WorkingDirectory = ModelLocator.RepoRoot() };
            using var p = Process.Start(psi);
            if (p is not null)
            {
                commit = p.StandardOutput.ReadToEnd().Trim();
                p.WaitForExit();
                if (p.ExitCode != 0 || commit.Length == 0)
                {
                    commit = "unknown";
                }
            }
        }
        catch (System.ComponentModel.Win32Exception)
        {
            // git is not installed; the stamp says so.
        }

        string cpu = "unknown CPU";
        if (File.Exists("/proc/cpuinfo"))
        {
            cpu = File.ReadLines("/proc/cpuinfo").FirstOrDefault(l => l.StartsWith("model name", StringComparison.Ordinal))?.Split(':', 2)[1].Trim() ?? cpu;
        }

        return new BenchStamp(commit, cpu, Environment.ProcessorCount, RuntimeInformation.OSDescription, RuntimeInformation.FrameworkDescription, DateTimeOffset.UtcNow);
    }

    public string ToMarkdown() => $"Commit `{Commit}`, {Machine} ({Cores} cores), {Os}, {Runtime}, {When:yyyy-MM-dd HH:mm} UTC.";
}

/// <summary>Report file names: the embedded demo's keep their plain names; any other model's carry its name (docs/bench/README.md).</summary>
internal static class ReportStem
{
    public static string For(string stem, string model) => model == "coordgen-demo" ? stem : $"{stem}-{model}";
}
