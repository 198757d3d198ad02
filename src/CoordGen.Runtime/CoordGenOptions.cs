using CoordGen.Engine.Runtime;
using CoordGen.Engine.Speculative;

namespace CoordGen;

/// <summary>
/// The runtime's settings: the model, its context capacity, graph widths, weights, decoding method and
/// admission limits. Bound from configuration by <c>services.AddCoordGen(configuration)</c>
/// (section <c>CoordGen</c> by convention) and validated by <see cref="Problems"/> when the runtime starts, as
/// <c>coordgen serve</c> validates its settings (which add the HTTP ones to these).
/// </summary>
public class CoordGenOptions
{
    /// <summary>Default configuration section for <c>AddCoordGen(configuration)</c>.</summary>
    public const string DefaultSection = "CoordGen";

    /// <summary>Where the embedded default model lives, relative to the checkout (or the app's folder).</summary>
    public const string DefaultModelRelative = "models/coordgen-demo";

    /// <summary>Model directory (a Hugging Face Llama/Qwen2 checkpoint: config.json, model.safetensors, tokenizer.json); empty = the embedded models/coordgen-demo, looked for above the working directory and the app's folder.</summary>
    public string? Model { get; set; }

    /// <summary>KV cache slots per request (prompt plus output).</summary>
    public int Capacity { get; set; } = 2048;

    public int PrefillWidth { get; set; } = 64;

    /// <summary>
    /// Tokens per prefill chunk while other sessions are decoding: a narrower chunk between their steps
    /// keeps their inter-token gaps short (a prompt with no one else decoding goes PrefillWidth at a
    /// time). At PrefillWidth or above = off.
    /// </summary>
    public int InterleavedChunkWidth { get; set; } = 32;

    /// <summary>The interleaved chunk width in effect: never wider than the prefill width.</summary>
    public int EffectiveChunkWidth => Math.Min(InterleavedChunkWidth, PrefillWidth);

    /// <summary>
    /// ONNX Runtime intra-op threads of the device; 0 (default) = one per core. The drafter, calibrator and
    /// actors share the cores with it. On this 2-core machine two threads gave 1.10x (plain) and 1.19-1.24x
    /// (speculative) the aggregate tokens/s of one in `coordgen bench sessions --sessions 8 --threads N`,
    /// once all graphs shared one thread pool (docs/serving.md).
    /// </summary>
    public int Threads { get; set; }

    /// <summary>Linear layers' weight format (F32, Int8, Int4; quantized at load time; docs/decisions/0012-quantized-weights.md).</summary>
    public Engine.Model.WeightFormat Weights { get; set; } = Engine.Model.WeightFormat.F32;

    /// <summary>
    /// How each session's KV cache holds keys and values: F32 (default) or F16, half the bytes, so the KV
    /// budget holds twice the sessions (docs/decisions/0020-float16-kv-cache.md).
    /// </summary>
    public KvFormat Kv { get; set; } = KvFormat.F32;

    /// <summary>Execution provider of the device's graphs: Cpu (default) or Qnn (Snapdragon NPU; needs a build with -p:CoordGenQnn=true).</summary>
    public ExecutionProviderKind Provider { get; set; } = ExecutionProviderKind.Cpu;

    /// <summary>QNN backend library for <see cref="Provider"/> Qnn (default libQnnHtp.so, the Hexagon NPU).</summary>
    public string? QnnBackendPath { get; set; }

    /// <summary>QNN HTP performance mode (<see cref="RuntimeOptions.QnnPerformanceModes"/>).</summary>
    public string QnnPerformanceMode { get; set; } = "burst";

    /// <summary>Folder where QNN saves compiled graphs (EP context binaries) and loads them from on later runs.</summary>
    public string? QnnContextCache { get; set; }

    /// <summary>At start, compile and warm the graphs a session of up to this many KV slots passes through (0: the smallest bucket's only; <see cref="PrecompileAll"/>: all). A one-request run (<c>coordgen generate</c>) sets its prompt plus output.</summary>
    public int PrepareSlots { get; set; }

    /// <summary>The intra-op thread count in effect (<see cref="Threads"/>, or one per core).</summary>
    public int EffectiveThreads => Threads > 0 ? Threads : Math.Max(1, Environment.ProcessorCount);

    /// <summary>Default decoding method for requests that do not choose one (ar, pld, sam, sam+history, pld+ours, sam+ours).</summary>
    public string Method { get; set; } = "sam+ours";

    public int Width { get; set; } = 8;

    /// <summary>Speculative requests verify each step on the compiled width (1, 4 or Width) that gives the most tokens per millisecond for that session (default); false = always Width (docs/decisions/0006-adaptive-width.md).</summary>
    public bool AdaptiveWidth { get; set; } = true;

    /// <summary>Plain (ar) decoding sessions ready at the same time share one device run, each in its own slot of a packed graph against its own cache, when the device's recent step times say it pays (never for steps under 5 ms, which are bound by overhead, not by reading weights); false = one session per run. Output is identical either way. On by default: 2.51x in the decode phase at 8 sessions on the 135M twin, parity on the 3M demo model (docs/decisions/0016-packed-steps.md, 0023).</summary>
    public bool PackedSteps { get; set; } = true;

    /// <summary>With <see cref="PackedSteps"/>: packed runs (plain rows and verification trees) attend with ONNX Runtime's GroupQueryAttention over each session's cache in place (CPU, float32 weights and caches), instead of joining the caches per layer: 3.09x against 2.18x the tokens per device-second of one session per run at 8 sessions on the 135M twin (decision 0023; trees, decision 0024). On by default; false keeps the joined form.</summary>
    public bool PackedGroupQuery { get; set; } = true;

    /// <summary>With <see cref="PackedSteps"/>: speculative sessions whose next steps are trees share packed runs too, when it pays, each tree in its own slot at one width (a wider tree keeps its first nodes, a narrower one is padded; a narrower pack is taken when the pick's width does not pay), and a tree waits a moment (at most 15% of a run) for the sessions whose verdict or next tree is on its way. With GroupQueryAttention packing (<see cref="PackedGroupQuery"/>) each tree attends over its own cache in place. On by default; false: trees run one session per run (docs/decisions/0016-packed-steps.md, 0024). Output is identical either way.</summary>
    public bool PackedTrees { get; set; } = true;

    /// <summary>With <see cref="PackedSteps"/> and GroupQueryAttention packing: while a prompt is prefilled between other sessions' steps, plain (ar) sessions ride in the chunk's run, each in its own slot of a mixed graph, when recent step times say it pays, instead of waiting for a decode run of their own (docs/decisions/0026-decode-rows-ride-in-prefill-chunks.md); speculative sessions' trees too with <see cref="MixedTrees"/>. On by default; false: a chunk runs alone. Output is identical either way.</summary>
    public bool MixedSteps { get; set; } = true;

    /// <summary>With <see cref="MixedSteps"/> and <see cref="PackedTrees"/>: when no plain session is ready, speculative sessions' trees ride in the chunk's run instead, and a chunk waits a moment for trees on their way (docs/decisions/0029-trees-ride-in-prefill-chunks.md). Off by default: it raised spec-adaptive's aggregate 1.05-1.36x and brought a newcomer's first token sooner, but the device then waits for trees whose drafting it used to hide behind a chunk run alone (`bench overlap` fell from 94-95% to 62-87% hidden), and the streams' worst gap during a long prefill did not shorten. Output is identical either way.</summary>
    public bool MixedTrees { get; set; }

    /// <summary>
    /// Keep the keys and values of prompts the device has prefilled, in blocks of 32 tokens, so a prompt that
    /// starts the same way (a chat's history, a shared document, a system prompt) copies them and prefills
    /// only the rest. Output is identical either way. The cache lives in the KV budget beside the sessions'
    /// caches (<see cref="KvBudgetMb"/>): it yields to them, evicting least recently used blocks. Default
    /// true (docs/decisions/0019-prefix-cache.md).
    /// </summary>
    public bool PrefixCache { get; set; } = true;

    /// <summary>
    /// Keep the memory of ended sessions' KV caches for the next sessions (at most as many as <see cref="KvBudgetMb"/>
    /// holds, yielding to the prefix cache's blocks): a new session then writes into pages the operating system has
    /// mapped already, instead of faulting them in during its prefill. Output is identical either way. Default true
    /// (docs/decisions/0030-kept-kv-caches.md).
    /// </summary>
    public bool KvPool { get; set; } = true;

    /// <summary>
    /// Before <see cref="InferenceService.Start(CoordGenOptions)"/> returns, run two short greedy requests through
    /// the actors (plain decoding and <see cref="Method"/>), so the first real request does not pay for
    /// compiling the .NET code of prefill, drafting, verification and streaming: on the demo model the README's
    /// `generate` decoded at about half speed without it (docs/decisions/0021-warm-up-at-start.md). The
    /// prefix cache is emptied after; the request and token counters include the two. Skipped with fault
    /// injection. Default true.
    /// </summary>
    public bool WarmUp { get; set; } = true;

    /// <summary>Compile every (width, KV bucket) graph when the device starts instead of on first use (slower start and device restarts; benchmarks use it so no compile lands in a timed region).</summary>
    public bool PrecompileAll { get; set; }

    /// <summary>A device actor restarted after a crash takes the runtime (compiled graphs) of the one before it instead of compiling again (default); false = every restart builds a new runtime.</summary>
    public bool KeepRuntimeAcrossRestarts { get; set; } = true;

    /// <summary>
    /// KV cache memory for all sessions together, in MiB. Each running session holds one cache of fixed size
    /// (2 x layers x KV heads x Capacity x head dim x 4 bytes); admitted requests beyond what fits wait
    /// in line (at most MaxPending running and waiting), and the rest are refused (429 over HTTP).
    /// </summary>
    public int KvBudgetMb { get; set; } = 1024;

    /// <summary>Requests running or queued at once; more are refused with a retry hint.</summary>
    public int MaxPending { get; set; } = 16;

    /// <summary>
    /// The step watchdog in milliseconds: a device run still going after this long is ended
    /// (ONNX Runtime's <c>RunOptions.Terminate</c>) and its request resumes from its committed tokens; each
    /// time it ends a run of a graph, that graph's limit doubles (a slow step gets through, a hung one keeps
    /// being ended until the request's attempts run out). 0 = off. Default 30,000.
    /// </summary>
    public int StepWatchdogMs { get; set; } = 30_000;

    /// <summary>What-if: pace every device step to this accelerator latency profile (a shipped name or a JSON file). Empty = real timings.</summary>
    public string? DeviceProfile { get; set; }

    /// <summary>
    /// Fault injection (<see cref="FaultSpec"/>: for example <c>kinds=DeviceException,SessionKill;gap=8;seed=7</c>) for
    /// an app's own fault tests; empty (default) = off. Refused unless <see cref="AllowFaults"/> is true too.
    /// </summary>
    public string? Faults { get; set; }

    /// <summary>Must be true for <see cref="Faults"/> to run: faults make requests fail and resume on purpose, which no production setting should do by accident.</summary>
    public bool AllowFaults { get; set; }

    /// <summary>The model directory in effect: <see cref="Model"/>, or the embedded default model found above the working directory or the app's folder.</summary>
    public string ResolveModelDirectory()
    {
        if (!string.IsNullOrWhiteSpace(Model))
        {
            return Model;
        }

        foreach (var start in new[] { Directory.GetCurrentDirectory(), AppContext.BaseDirectory })
        {
            for (var dir = new DirectoryInfo(start); dir is not null; dir = dir.Parent)
            {
                string candidate = Path.Combine(dir.FullName, DefaultModelRelative);
                if (File.Exists(Path.Combine(candidate, "config.json")))
                {
                    return candidate;
                }
            }
        }

        throw new Engine.Model.ModelLoadException($"The default model '{DefaultModelRelative}' was not found above '{Directory.GetCurrentDirectory()}' or '{AppContext.BaseDirectory}'. Set Model to a model directory (a Hugging Face Llama or Qwen2 checkpoint).");
    }

    /// <summary>Every problem with these settings, each saying what to change; empty when valid.</summary>
    public virtual IReadOnlyList<string> Problems()
    {
        var p = new List<string>();
        if (!RuntimeOptions.QnnPerformanceModes.Contains(QnnPerformanceMode))
        {
            p.Add($"QnnPerformanceMode: unknown QNN performance mode '{QnnPerformanceMode}'; use one of {string.Join(", ", RuntimeOptions.QnnPerformanceModes)}.");
        }

        if (PrepareSlots < 0)
        {
            p.Add($"PrepareSlots must be 0 or positive (got {PrepareSlots}).");
        }

        if (Capacity is < 16 or > 65536)
        {
            p.Add($"Capacity must be between 16 and 65536 (got {Capacity}).");
        }

        if (PrefillWidth is < 1 or > 1024)
        {
            p.Add($"PrefillWidth must be between 1 and 1024 (got {PrefillWidth}).");
        }

        if (InterleavedChunkWidth is < 1 or > 1024)
        {
            p.Add($"InterleavedChunkWidth must be between 1 and 1024 (got {InterleavedChunkWidth}); at PrefillWidth or above, chunks are always full width.");
        }

        if (Threads is < 0 or > 256)
        {
            p.Add($"Threads must be between 0 (one per core) and 256 (got {Threads}).");
        }

        if (!string.IsNullOrEmpty(DeviceProfile))
        {
            try
            {
                CoordGen.Engine.Scheduling.DeviceProfile.Load(DeviceProfile);
            }
            catch (Exception ex) when (ex is ArgumentException or FileNotFoundException)
            {
                p.Add($"DeviceProfile: {ex.Message}");
            }
        }

        if (Method != "ar")
        {
            try
            {
                SpeculationOptions.ForMethod(Method, Width);
            }
            catch (ArgumentException ex)
            {
                p.Add($"Method: {ex.Message}");
            }
        }

        if (Width is < 2 or > 256)
        {
            p.Add($"Width must be between 2 and 256 (got {Width}).");
        }

        if (StepWatchdogMs is < 0 or > 3_600_000)
        {
            p.Add($"StepWatchdogMs must be between 0 (off) and 3600000 (got {StepWatchdogMs}).");
        }

        if (KvBudgetMb is < 1 or > 1_048_576)
        {
            p.Add($"KvBudgetMb must be between 1 and 1048576 MiB (got {KvBudgetMb}).");
        }

        if (MaxPending is < 1 or > 10_000)
        {
            p.Add($"MaxPending must be between 1 and 10000 (got {MaxPending}).");
        }

        if (!string.IsNullOrWhiteSpace(Faults))
        {
            try
            {
                FaultSpec.Parse(Faults);
                if (!AllowFaults)
                {
                    p.Add("Faults is set but AllowFaults is not: fault injection makes requests fail and resume on purpose; set AllowFaults=true (--allow-faults) to run it, and never in production.");
                }
            }
            catch (ArgumentException ex)
            {
                p.Add($"Faults: {ex.Message}");
            }
        }

        return p;
    }
}
