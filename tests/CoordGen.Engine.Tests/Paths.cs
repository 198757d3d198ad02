namespace CoordGen.Engine.Tests;

internal static class Paths
{
    public static string RepoRoot
    {
        get
        {
            for (var d = new DirectoryInfo(AppContext.BaseDirectory); d is not null; d = d.Parent)
            {
                if (File.Exists(Path.Combine(d.FullName, "CoordGen.sln")))
                {
                    return d.FullName;
                }
            }

            throw new InvalidOperationException("CoordGen.sln not found above the test binaries");
        }
    }

    public static string DemoModel => Path.Combine(RepoRoot, "models", "coordgen-demo");

    public static string Vectors => Path.Combine(AppContext.BaseDirectory, "Vectors");
}
