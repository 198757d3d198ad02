using System.CommandLine;
using System.Globalization;
using System.Text;
using CoordGen.Engine.Model;
using Spectre.Console;

namespace CoordGen.Host.Commands;

/// <summary>
/// <c>coordgen model inflate</c>: a function-preserving twin of a checkpoint in a larger shape
/// (docs/decisions/0011-function-preserving-twins.md). Also makes the <c>twin:NAME</c> models that
/// <c>--model</c> accepts, on first use.
/// </summary>
internal static class ModelInflate
{
    /// <summary>Seed of the twins that <c>--model twin:NAME</c> makes.</summary>
    public const int TwinSeed = 1;

    public static Command Create()
    {
        var model = CommonOptions.Model();
        var shape = new Option<string?>("--shape") { Description = $"Target shape: one of {string.Join(", ", ShapeCatalog.Shapes.Keys)} (its sizes and architecture; the vocabulary stays the source's). Or give the sizes below." };
        var hidden = new Option<int?>("--hidden") { Description = "Target hidden size (with the other size options instead of --shape; a size left out stays the source's)." };
        var intermediate = new Option<int?>("--intermediate") { Description = "Target MLP intermediate size." };
        var layers = new Option<int?>("--layers") { Description = "Target number of decoder layers." };
        var heads = new Option<int?>("--heads") { Description = "Target query heads (per kv group at least the source's)." };
        var kvHeads = new Option<int?>("--kv-heads") { Description = "Target key/value heads (at least the source's)." };
        var headDim = new Option<int?>("--head-dim") { Description = "Target head dim (a multiple of the source's)." };
        var output = new Option<DirectoryInfo>("--out", "-o") { Description = "Directory to write config.json, model.safetensors (float32), tokenizer.json and README.md into.", Required = true, HelpName = "DIR" };
        var seed = new Option<int>("--seed") { Description = "Seed of the random weights of the parts that write nothing (the twin is made again bit for bit).", DefaultValueFactory = _ => TwinSeed };
        var cmd = new Command("inflate", "Write a function-preserving twin of a checkpoint in a larger shape: it computes the source's logits (up to float rounding) while doing all the work and reading all the bytes of the larger shape. Use it to measure a trained model in the regime of a real-size one.")
        {
            model, shape, hidden, intermediate, layers, heads, kvHeads, headDim, output, seed,
        };
        cmd.SetAction(parse =>
        {
            string src = ModelLocator.Resolve(parse.GetValue(model));
            string? name = parse.GetValue(shape);
            int?[] sizes = [parse.GetValue(hidden), parse.GetValue(intermediate), parse.GetValue(layers), parse.GetValue(heads), parse.GetValue(kvHeads), parse.GetValue(headDim)];
            if ((name is null) == sizes.All(v => v is null))
            {
                throw new ArgumentException($"give either --shape ({string.Join(", ", ShapeCatalog.Shapes.Keys)}) or target sizes (--hidden, --intermediate, --layers, --heads, --kv-heads, --head-dim), not both and not neither.");
            }

            var source = ModelConfig.Load(Path.Combine(src, "config.json"));
            var target = name is not null
                ? InflationTarget.FromShape(ShapeCatalog.Get(name))
                : new InflationTarget(source.Architecture, sizes[0] ?? source.HiddenSize, sizes[1] ?? source.IntermediateSize, sizes[2] ?? source.NumLayers,
                    sizes[3] ?? source.NumHeads, sizes[4] ?? source.NumKvHeads, sizes[5] ?? source.HeadDim, source.AttentionBias);
            Write(src, target, name ?? "custom", parse.GetValue(seed), parse.GetValue(output)!.FullName);
            return 0;
        });
        return cmd;
    }

    /// <summary>Inflates <paramref name="sourceDir"/> to <paramref name="target"/> and writes the twin's folder.</summary>
    public static void Write(string sourceDir, InflationTarget target, string shapeName, int seed, string outDir)
    {
        var sourceConfig = ModelConfig.Load(Path.Combine(sourceDir, "config.json"));
        var twinConfig = ModelInflation.TwinConfig(sourceConfig, target); // refuses impossible targets before any loading
        var source = ConsoleUi.LoadModel(sourceDir);
        var twin = ConsoleUi.Status($"inflating to {twinConfig.ParameterCount / 1e6:F1}M parameters", () => ModelInflation.Inflate(source.Weights, target, seed));
        Directory.CreateDirectory(outDir);
        ConsoleUi.Status($"writing model.safetensors (F32, {twin.TotalBytes / 1048576.0:F0} MiB)", () =>
        {
            // Float32 on disk: the sqrt(h/H) and sqrt(D/d) scalings would round in 16 bits and move the logits.
            SafeTensors.Write(Path.Combine(outDir, "model.safetensors"), twin.Tensors.Select(t => (t.Name, t.Shape, t.Data)), SafeTensorDType.F32);
            return 0;
        });
        File.WriteAllText(Path.Combine(outDir, "config.json"), twinConfig.ToJson());
        File.Copy(Path.Combine(sourceDir, "tokenizer.json"), Path.Combine(outDir, "tokenizer.json"), overwrite: true);
        File.WriteAllText(Path.Combine(outDir, "README.md"), Readme(source, twinConfig, shapeName, seed));
        File.WriteAllText(Path.Combine(outDir, ConstructionFile), ModelInflation.ConstructionVersion.ToString(CultureInfo.InvariantCulture));
        ConsoleUi.Err.MarkupLineInterpolated($"wrote a {twinConfig.ParameterCount / 1e6:F1}M-parameter twin of {source.Name} ({shapeName} shape) to {outDir}");
        ConsoleUi.Err.MarkupLineInterpolated($"[grey]its vocabulary is the source's {twinConfig.VocabSize} tokens, so its head is smaller than the real {shapeName}'s; everything else has the target's size.[/]");
    }

    /// <summary>
    /// Resolves <c>twin:NAME</c> to models/twins/demo-NAME of the checkout, making the twin of the
    /// embedded demo model there on first use (seed <see cref="TwinSeed"/>).
    /// </summary>
    /// <summary>The file in a twin's folder that names the construction version that made it (<see cref="ModelInflation.ConstructionVersion"/>).</summary>
    public const string ConstructionFile = "construction-version.txt";

    public static string ResolveTwin(string shapeName)
    {
        var shape = ShapeCatalog.Get(shapeName);
        string dir = Path.Combine(ModelLocator.RepoRoot(), "models", "twins", "demo-" + shapeName);
        string version = Path.Combine(dir, ConstructionFile);
        bool current = File.Exists(version) && File.ReadAllText(version).Trim() == ModelInflation.ConstructionVersion.ToString(CultureInfo.InvariantCulture);
        if (!File.Exists(Path.Combine(dir, "config.json")) || !File.Exists(Path.Combine(dir, "model.safetensors")) || !current)
        {
            ConsoleUi.Err.MarkupLineInterpolated($"[grey]making the {shapeName} twin of the demo model in {dir} (once per construction version; git ignores it)[/]");
            Write(ModelLocator.Resolve(null), InflationTarget.FromShape(shape), shapeName, TwinSeed, dir);
        }

        return dir;
    }

    private static string Readme(ModelBundle source, ModelConfig twin, string shapeName, int seed)
    {
        var c = source.Config;
        var sb = new StringBuilder();
        sb.AppendLine(CultureInfo.InvariantCulture, $"# Twin of {source.Name} in the {shapeName} shape");
        sb.AppendLine();
        sb.AppendLine(CultureInfo.InvariantCulture, $"Made by `coordgen model inflate --model {source.Directory} --shape {shapeName} --seed {seed}` (CoordGen, docs/decisions/0011-function-preserving-twins.md).");
        sb.AppendLine();
        sb.AppendLine("A function-preserving inflation: this checkpoint computes the source's logits (up to float rounding), while every");
        sb.AppendLine("step does the work and reads the bytes of the larger shape. It is a stand-in for measuring speed in the regime of a");
        sb.AppendLine("real-size model, not a better model: it knows exactly what the source knows.");
        sb.AppendLine();
        sb.AppendLine("| | source | twin |");
        sb.AppendLine("|---|---|---|");
        sb.AppendLine(CultureInfo.InvariantCulture, $"| parameters | {c.ParameterCount:N0} | {twin.ParameterCount:N0} |");
        sb.AppendLine(CultureInfo.InvariantCulture, $"| hidden / intermediate | {c.HiddenSize} / {c.IntermediateSize} | {twin.HiddenSize} / {twin.IntermediateSize} |");
        sb.AppendLine(CultureInfo.InvariantCulture, $"| layers | {c.NumLayers} | {twin.NumLayers} |");
        sb.AppendLine(CultureInfo.InvariantCulture, $"| heads / kv heads / head dim | {c.NumHeads} / {c.NumKvHeads} / {c.HeadDim} | {twin.NumHeads} / {twin.NumKvHeads} / {twin.HeadDim} |");
        sb.AppendLine(CultureInfo.InvariantCulture, $"| vocabulary | {c.VocabSize} | {twin.VocabSize} (the source's: the head is smaller than the real {shapeName}'s) |");
        sb.AppendLine(CultureInfo.InvariantCulture, $"| rms_norm_eps | {c.RmsNormEps} | {twin.RmsNormEps} (scaled by h/H) |");
        sb.AppendLine();
        sb.AppendLine("Weights are stored as float32 so the scalings do not round. Do not commit this folder: the command above makes it again, bit for bit.");
        return sb.ToString();
    }
}
