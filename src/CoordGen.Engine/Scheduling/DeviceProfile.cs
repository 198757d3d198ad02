using System.Text.Json;
using System.Text.Json.Serialization;

namespace CoordGen.Engine.Scheduling;

/// <summary>One point of a device's step-time curve: a static graph of <see cref="Width"/> tokens takes <see cref="Ms"/> per run.</summary>
public sealed record StepPoint(
    [property: JsonPropertyName("width")] int Width,
    [property: JsonPropertyName("ms")] double Ms,
    [property: JsonPropertyName("source"), JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] string? Source = null);

/// <summary>
/// An accelerator latency profile: per-width step time and per-block graph load time. It stands in for
/// measured CPU timings in what-if experiments (the planner's block costs, the device actor's pacing),
/// for example the paper's Snapdragon figures, which CoordGen ships because it cannot measure them here.
/// Everything produced from a profile says so (<see cref="Label"/>).
/// </summary>
public sealed record DeviceProfile
{
    [JsonPropertyName("name")] public required string Name { get; init; }

    [JsonPropertyName("device")] public string Device { get; init; } = "";

    [JsonPropertyName("model")] public string Model { get; init; } = "";

    /// <summary>False when the numbers come from elsewhere (a paper, an assumption), not a run of ours.</summary>
    [JsonPropertyName("measured")] public bool Measured { get; init; }

    [JsonPropertyName("source")] public string Source { get; init; } = "";

    [JsonPropertyName("step_ms")] public required IReadOnlyList<StepPoint> Steps { get; init; }

    [JsonPropertyName("step_ms_note")]
    [JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)]
    public string? StepNote { get; init; }

    [JsonPropertyName("blocks")] public int Blocks { get; init; } = 1;

    [JsonPropertyName("load_ms_per_block")] public double LoadMsPerBlock { get; init; }

    [JsonPropertyName("load_source")]
    [JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)]
    public string? LoadSource { get; init; }

    [JsonPropertyName("weights_mb")] public double WeightsMb { get; init; }

    [JsonPropertyName("weights_source")]
    [JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)]
    public string? WeightsSource { get; init; }

    /// <summary>The names of the profiles built into CoordGen.</summary>
    public static IReadOnlyList<string> Shipped =>
        [.. typeof(DeviceProfile).Assembly.GetManifestResourceNames()
            .Where(n => n.StartsWith(ResourcePrefix, StringComparison.Ordinal) && n.EndsWith(".json", StringComparison.Ordinal))
            .Select(n => n[ResourcePrefix.Length..^".json".Length])
            .Order(StringComparer.Ordinal)];

    private const string ResourcePrefix = "CoordGen.Engine.Scheduling.Profiles.";

    /// <summary>What every output produced from this profile carries.</summary>
    [JsonIgnore]
    public string Label => Measured
        ? $"timings from device profile '{Name}' (measured on {Device})"
        : $"what-if: timings from device profile '{Name}' ({Device}; {Model}), not measured by CoordGen";

    /// <summary>A shipped profile by name, or a JSON file by path.</summary>
    public static DeviceProfile Load(string nameOrPath)
    {
        string json;
        if (File.Exists(nameOrPath))
        {
            json = File.ReadAllText(nameOrPath);
        }
        else
        {
            using var stream = typeof(DeviceProfile).Assembly.GetManifestResourceStream(ResourcePrefix + nameOrPath + ".json")
                ?? throw new FileNotFoundException($"no device profile '{nameOrPath}': give a JSON file's path or one of the shipped profiles ({string.Join(", ", Shipped)}).");
            using var reader = new StreamReader(stream);
            json = reader.ReadToEnd();
        }

        DeviceProfile profile;
        try
        {
            profile = JsonSerializer.Deserialize<DeviceProfile>(json) ?? throw new JsonException("empty document");
        }
        catch (JsonException ex)
        {
            throw new ArgumentException($"device profile '{nameOrPath}' is not valid JSON of the profile format (docs/snapdragon.md): {ex.Message}", ex);
        }

        profile.Validate();
        return profile;
    }

    public void Validate()
    {
        if (Steps is null || Steps.Count == 0 || Steps.Any(p => p.Width < 1 || !(p.Ms > 0)) || Steps.Select(p => p.Width).Distinct().Count() != Steps.Count)
        {
            throw new ArgumentException($"device profile '{Name}' needs step_ms points with distinct widths >= 1 and positive ms.");
        }

        if (Blocks < 1 || LoadMsPerBlock < 0 || WeightsMb < 0)
        {
            throw new ArgumentException($"device profile '{Name}' needs blocks >= 1 and non-negative load_ms_per_block and weights_mb.");
        }
    }

    /// <summary>
    /// Milliseconds for one run of a static graph <paramref name="width"/> tokens wide: piecewise linear
    /// through the profile's points, extended linearly past the ends (flat with one point).
    /// </summary>
    public double StepMs(int width)
    {
        if (width < 1)
        {
            throw new ArgumentOutOfRangeException(nameof(width), "a graph is at least one token wide.");
        }

        var pts = Steps.OrderBy(p => p.Width).ToArray();
        if (pts.Length == 1)
        {
            return pts[0].Ms;
        }

        int i = 0;
        while (i < pts.Length - 2 && width > pts[i + 1].Width)
        {
            i++;
        }

        var (a, b) = (pts[i], pts[i + 1]);
        double slope = (b.Ms - a.Ms) / (b.Width - a.Width);
        return Math.Max(0.01, a.Ms + (slope * (width - a.Width)));
    }

    /// <summary>
    /// Planner costs for a model split into <paramref name="blocks"/> equal blocks: a chunk of
    /// <paramref name="wide"/> tokens on G1 costs StepMs(wide)/blocks per block; on G2 it runs as
    /// wide/narrow sub-chunks of StepMs(narrow)/blocks each; a G2 load scales with the block's share
    /// of the model.
    /// </summary>
    public BlockCosts Costs(int blocks, int wide, int narrow)
    {
        if (blocks < 1 || narrow < 1 || wide < narrow || wide % narrow != 0)
        {
            throw new ArgumentException($"need blocks >= 1 and a wide width that is a multiple of the narrow one (got {blocks}, {wide}, {narrow}).");
        }

        double load = LoadMsPerBlock * Blocks / blocks;
        double c1 = StepMs(wide) / blocks;
        double c2 = StepMs(narrow) * (wide / narrow) / blocks;
        return new BlockCosts([.. Enumerable.Repeat(load, blocks)], [.. Enumerable.Repeat(c1, blocks)], [.. Enumerable.Repeat(c2, blocks)]);
    }
}
