using System.CommandLine;
using CoordGen.Engine.Runtime;

namespace CoordGen.Host.Commands;

/// <summary>Options shared by the commands that load a model.</summary>
internal static class CommonOptions
{
    public static Option<string?> Model() => new("--model", "-m")
    {
        Description = "Model directory in the Hugging Face layout (config.json, model.safetensors, tokenizer.json), or twin:SHAPE for the demo model's function-preserving twin in a real model's shape (e.g. twin:smollm2-135m; made under models/twins/ on first use). Default: the embedded models/coordgen-demo.",
        HelpName = "DIR",
    };

    public static Option<int> Capacity() => new("--capacity")
    {
        Description = "KV cache slots per session (the static C of every graph): prompt plus output must fit.",
        DefaultValueFactory = _ => 2048,
    };

    public static Option<int> PrefillWidth() => new("--prefill-width")
    {
        Description = "Token width of the wide prefill graph; prompts are prefilled in chunks of this many tokens.",
        DefaultValueFactory = _ => 64,
    };

    public static Option<Engine.Model.WeightFormat> Weights() => new("--weights")
    {
        Description = "How the linear layers' weights are held and multiplied: F32 (as loaded), Int8 or Int4 (per-block symmetric, quantized at load time for ONNX Runtime's MatMulNBits; docs/decisions/0012-quantized-weights.md). Speculative greedy output equals the same weights' plain greedy output in every format: with int8/int4 the graphs sum attention in float64, which makes a verified tree's rows equal to single steps bit for bit (decision 0025).",
        DefaultValueFactory = _ => Engine.Model.WeightFormat.F32,
    };

    public static Option<Engine.Runtime.KvFormat> Kv() => new("--kv")
    {
        Description = "How each session's KV cache holds keys and values: F32, or F16 (half the bytes; the graphs read float16 caches and attend in float32; docs/decisions/0020-float16-kv-cache.md).",
        DefaultValueFactory = _ => Engine.Runtime.KvFormat.F32,
    };

    public static Option<int> Threads() => new("--threads")
    {
        Description = "ONNX Runtime intra-op threads; 0 = one per core.",
        DefaultValueFactory = _ => 0,
    };

    public static Option<ExecutionProviderKind> Provider() => new("--provider")
    {
        Description = "Execution provider: Cpu (default) or Qnn (Snapdragon NPU; needs a build with -p:CoordGenQnn=true).",
        DefaultValueFactory = _ => ExecutionProviderKind.Cpu,
    };

    public static Option<string?> QnnBackend() => new("--qnn-backend")
    {
        Description = "QNN backend library for --provider qnn (default libQnnHtp.so, the Hexagon NPU).",
        HelpName = "PATH",
    };

    public static Option<string> QnnPerformanceMode() => new("--qnn-perf-mode")
    {
        Description = $"QNN HTP performance mode: {string.Join(", ", RuntimeOptions.QnnPerformanceModes)}.",
        DefaultValueFactory = _ => "burst",
    };

    public static Option<DirectoryInfo?> QnnContextCache() => new("--qnn-context-cache")
    {
        Description = "Folder where QNN saves compiled graphs (EP context binaries) and loads them from on later runs.",
        HelpName = "DIR",
    };

    public static Option<string?> DeviceProfile(string purpose) => new("--device-profile")
    {
        Description = $"{purpose} A shipped profile ({string.Join(", ", CoordGen.Engine.Scheduling.DeviceProfile.Shipped)}) or a JSON file in that format (docs/snapdragon.md).",
        HelpName = "NAME|FILE",
    };

    public static void Validate(int capacity, int prefillWidth)
    {
        if (capacity < 16 || capacity > 65536)
        {
            throw new ArgumentException($"--capacity must be between 16 and 65536 (got {capacity}).");
        }

        if (prefillWidth < 1 || prefillWidth > 1024)
        {
            throw new ArgumentException($"--prefill-width must be between 1 and 1024 (got {prefillWidth}).");
        }
    }
}
