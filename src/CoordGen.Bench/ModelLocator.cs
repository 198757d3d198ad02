namespace CoordGen.Host;

/// <summary>Finds the embedded default model (models/coordgen-demo) from the working directory or the program's folder.</summary>
internal static class ModelLocator
{
    public const string DefaultModelRelative = CoordGenOptions.DefaultModelRelative;

    /// <summary><c>--model twin:smollm2-135m</c>: the demo's function-preserving twin in that shape.</summary>
    public const string TwinPrefix = "twin:";

    public static string Resolve(string? requested)
    {
        if (!string.IsNullOrWhiteSpace(requested))
        {
            // twin:NAME is the demo model inflated to a published shape, made on first use (coordgen model inflate).
            return requested.StartsWith(TwinPrefix, StringComparison.Ordinal)
                ? Commands.ModelInflate.ResolveTwin(requested[TwinPrefix.Length..])
                : requested;
        }

        try
        {
            return new CoordGenOptions().ResolveModelDirectory();
        }
        catch (Engine.Model.ModelLoadException)
        {
            throw new Engine.Model.ModelLoadException($"The default model '{DefaultModelRelative}' was not found above '{Directory.GetCurrentDirectory()}'. Run from the CoordGen checkout or pass --model DIR.");
        }
    }

    /// <summary>The repository root (the folder holding CoordGen.sln), for writing docs/bench/.</summary>
    public static string RepoRoot()
    {
        foreach (var start in new[] { Directory.GetCurrentDirectory(), AppContext.BaseDirectory })
        {
            for (var dir = new DirectoryInfo(start); dir is not null; dir = dir.Parent)
            {
                if (File.Exists(Path.Combine(dir.FullName, "CoordGen.sln")))
                {
                    return dir.FullName;
                }
            }
        }

        return Directory.GetCurrentDirectory();
    }
}
