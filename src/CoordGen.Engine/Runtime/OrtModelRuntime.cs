using System.Diagnostics;
using CoordGen.Engine.Model;
using CoordGen.Engine.Onnx;
using Microsoft.ML.OnnxRuntime;

namespace CoordGen.Engine.Runtime;

/// <summary>Execution provider choice. QNN needs the build property CoordGenQnn=true.</summary>
public enum ExecutionProviderKind
{
    Cpu,
    Qnn,
}

public sealed record RuntimeOptions
{
    public ExecutionProviderKind Provider { get; init; } = ExecutionProviderKind.Cpu;

    /// <summary>Intra-op threads for ONNX Runtime; 0 lets it choose (one per core).</summary>
    public int IntraOpThreads { get; init; }

    /// <summary>QNN backend library (libQnnHtp.so) when <see cref="Provider"/> is QNN.</summary>
    public string? QnnBackendPath { get; init; }

    /// <summary>QNN HTP performance mode: burst (default), balanced, high_performance, sustained_high_performance, power_saver, ...</summary>
    public string QnnPerformanceMode { get; init; } = "burst";

    /// <summary>
    /// Folder for QNN EP context binaries: compiled graphs are saved there on first use and loaded from
    /// there afterwards (graph loads in seconds instead of a full compile). Null disables the cache.
    /// </summary>
    public string? QnnContextCache { get; init; }

    /// <summary>
    /// KV-cache buckets per doubling of the context above 256 slots (<see cref="OrtModelRuntime.CapacityBuckets"/>).
    /// A graph attends over its whole bucket, so finer buckets waste less work on empty slots (4: at most
    /// a quarter above 1,024 slots) at the price of more graphs (a few MiB each) and more cache moves.
    /// </summary>
    public int BucketsPerOctave { get; init; } = 4;

    /// <summary>How the linear layers' weights are held and multiplied: float32, or 8/4-bit blocks for MatMulNBits (quantized at load time).</summary>
    public WeightFormat Weights { get; init; } = WeightFormat.F32;

    /// <summary>How each session's KV cache holds keys and values: float32, or float16 (half the bytes; decision 0020).</summary>
    public KvFormat Kv { get; init; } = KvFormat.F32;

    /// <summary>
    /// The attention's sums over keys in float64, rounded to float32 at its end (decision 0025): a row then gets the
    /// same numbers whatever the step's width and wherever its keys sit (measured bit for bit on this CPU; in theory
    /// short of an exact value within about 1e-16 of a rounding boundary), so speculative output equals plain output
    /// even when quantized projections round their inputs to int8. Null (the default) turns it on exactly when
    /// <see cref="Weights"/> is quantized and the provider is the CPU (an NPU has no float64: on QNN the nodes would
    /// fall back to the CPU and split every layer).
    /// </summary>
    public bool? Float64Attention { get; init; }

    /// <summary>Whether graphs compute attention in float64 (<see cref="Float64Attention"/>, or its default).</summary>
    public bool AttentionInFloat64 => Float64Attention ?? (Weights != WeightFormat.F32 && Provider == ExecutionProviderKind.Cpu);

    /// <summary>
    /// Rotary embedding and each residual add with the RMS norm after it as ONNX Runtime's contrib kernels
    /// (<c>com.microsoft.RotaryEmbedding</c>, <c>SkipSimplifiedLayerNormalization</c>) instead of the elementwise
    /// nodes they replace: about 12 fewer nodes per layer. Null (the default) turns it on with the CPU provider;
    /// the QNN provider keeps the plain ONNX form, which an NPU compiles.
    /// </summary>
    public bool? FusedOps { get; init; }

    /// <summary>Whether graphs use the contrib kernels of <see cref="FusedOps"/> (or its default).</summary>
    public bool UsesFusedOps => FusedOps ?? Provider == ExecutionProviderKind.Cpu;

    /// <summary>
    /// Packed runs (width-1 rows and verification trees) attend with ONNX Runtime's GroupQueryAttention, one
    /// node per slot over that session's cache in place: no cache is joined and each slot is scored over its
    /// own length, a tree through its tree block as the node's bias (decisions 0023, 0024). Applies on the CPU
    /// provider with float32 weights, caches and attention sums (<see cref="Float64Attention"/> has no
    /// GroupQueryAttention form); otherwise packed runs join the caches. Quantized weights are excluded: their
    /// projections round each activation row to int8, which turns the last-bit differences between this kernel and a solo step's attention into different
    /// greedy tokens (measured: int8 packed output not identical to solo), and packed output must equal solo.
    /// </summary>
    public bool PackedGroupQuery { get; init; } = true;

    /// <summary>
    /// The step watchdog: a graph run still going after this long is ended (<c>RunOptions.Terminate</c>) and
    /// the step fails with a <see cref="DeviceFaultException"/>, which the session recovers from like any
    /// device fault. Each time it ends a run of a graph, that graph's limit doubles, so a step that is slow
    /// rather than hung gets through on a retry. <see cref="TimeSpan.Zero"/> = off.
    /// </summary>
    public TimeSpan StepWatchdog { get; init; } = TimeSpan.FromSeconds(30);

    /// <summary>
    /// ONNX Runtime's profiler on for every graph session, its JSON traces written under this path prefix (one file per
    /// graph; <see cref="OrtModelRuntime.EndProfiling"/> ends them and gives their paths). The profiler adds a few
    /// microseconds to every node, so profiled steps are for seeing where time goes, not for timing. Null = off.
    /// </summary>
    public string? ProfilePrefix { get; init; }

    /// <summary>
    /// Most ended sessions' KV caches the runtime keeps for the next sessions (<see cref="KvCachePool"/>, decision 0030):
    /// a kept cache's pages are mapped already, so a new session's bucket moves cost 1-2 ms instead of tens of ms of page
    /// faults. Never more memory than the runtime once used at the same time. 0 = keep none.
    /// </summary>
    public int KvPool { get; init; } = 8;

    public static readonly string[] QnnPerformanceModes =
        ["default", "burst", "balanced", "high_performance", "high_power_saver", "low_balanced", "low_power_saver", "power_saver", "extreme_power_saver", "sustained_high_performance"];

    public void Validate()
    {
        if (IntraOpThreads is < 0 or > 256)
        {
            throw new ArgumentException($"intra-op threads must be between 0 (one per core) and 256 (got {IntraOpThreads}).");
        }

        if (StepWatchdog < TimeSpan.Zero)
        {
            throw new ArgumentException($"the step watchdog must be zero (off) or positive (got {StepWatchdog}).");
        }

        if (KvPool is < 0 or > 1024)
        {
            throw new ArgumentException($"the KV pool keeps between 0 (none) and 1,024 caches (got {KvPool}).");
        }

        if (BucketsPerOctave is < 1 or > 16)
        {
            throw new ArgumentException($"KV buckets per octave must be between 1 (powers of two) and 16 (got {BucketsPerOctave}).");
        }

        if (!QnnPerformanceModes.Contains(QnnPerformanceMode))
        {
            throw new ArgumentException($"unknown QNN performance mode '{QnnPerformanceMode}'; use one of {string.Join(", ", QnnPerformanceModes)}.");
        }
    }

    /// <summary>
    /// Applies the provider to session options: nothing for the CPU; for QNN the backend, performance
    /// mode and EP context cache (<paramref name="graphName"/> names the cached binary).
    /// </summary>
    public void ApplyProvider(SessionOptions so, string graphName)
    {
        if (Provider != ExecutionProviderKind.Qnn)
        {
            return;
        }

        var qnn = new Dictionary<string, string>
        {
            ["backend_path"] = QnnBackendPath ?? "libQnnHtp.so",
            ["htp_performance_mode"] = QnnPerformanceMode,
        };
        if (QnnContextCache is { } dir)
        {
            Directory.CreateDirectory(dir);
            so.AddSessionConfigEntry("ep.context_enable", "1");
            so.AddSessionConfigEntry("ep.context_file_path", Path.Combine(dir, graphName + "_ctx.onnx"));
        }

        try
        {
            so.AppendExecutionProvider("QNN", qnn);
        }
        catch (Exception ex)
        {
            throw new InvalidOperationException($"The QNN execution provider is not available in this build ({ex.Message}). Build with -p:CoordGenQnn=true on a Snapdragon device (docs/snapdragon.md), or use --provider cpu.", ex);
        }
    }
}

/// <summary>
/// Owns the compiled graphs of one model: every (width W, capacity bucket C) pair it is asked for,
/// compiled on first use. The weights are handed to every session as shared initializers
/// (SessionOptions.AddInitializer over the pinned float arrays of <see cref="ModelWeights"/>), and
/// pre-packed GEMM buffers go into one PrePackedWeightsContainer, so any number of graphs cost one
/// copy of the weights. Capacity buckets (256, 512, ... up to the maximum) keep attention cost
/// proportional to what a session holds rather than to the largest capacity: a cache grows into the
/// next bucket when it fills (<see cref="KvCache.EnsureRoom"/>).
/// Not thread-safe: one step at a time (the device actor serializes calls).
/// </summary>
public sealed class OrtModelRuntime : IDisposable
{
    public const int SmallestBucket = 256;

    private readonly Dictionary<(int Width, int Bucket), WidthGraph> _graphs = new();
    // Packed graphs, compiled on first use or in the background (PackedReady) so a scheduler never waits for one.
    private readonly System.Collections.Concurrent.ConcurrentDictionary<(int Slots, int Width, int Bucket, int Riders), Lazy<Task<WidthGraph>>> _packed = new();
    private readonly List<(string Name, OrtValue Value)> _weightValues = new();
    private readonly List<QuantizedTensor> _quantized = new();
    private readonly PrePackedWeightsContainer _prepacked;
    private readonly RuntimeOptions _options;

    // The step watchdog: one background thread per runtime ticks (every quarter of the limit, between 1 ms and
    // 1 s) and looks at the graph whose run is in progress, if any. Not a timer per run, which woke the timer
    // thread every step, and not a thread-pool timer, whose ticks wait behind a busy pool.
    private readonly ManualResetEventSlim _watchStop = new();
    private WidthGraph? _watched;
    private readonly bool _sharedEnv;
    private readonly int[] _widths;

    public OrtModelRuntime(ModelWeights weights, int capacity, IEnumerable<int> widths, RuntimeOptions? options = null)
    {
        Weights = weights;
        Config = weights.Config;
        Capacity = capacity;
        _options = options ?? new RuntimeOptions();
        _options.Validate();
        if (_options.StepWatchdog > TimeSpan.Zero)
        {
            static TimeSpan Quarter(TimeSpan limit) => TimeSpan.FromTicks(Math.Clamp(limit.Ticks / 4, TimeSpan.TicksPerMillisecond, TimeSpan.TicksPerSecond));
            var period = Quarter(_options.StepWatchdog);
            new Thread(() =>
            {
                // With fault injection on, often enough to end an injected hang near its own limit too.
                while (!_watchStop.Wait(Faults is { } f ? Quarter(f.HangLimit < _options.StepWatchdog ? f.HangLimit : _options.StepWatchdog) : period))
                {
                    Volatile.Read(ref _watched)?.CheckOverrun();
                }
            })
            { IsBackground = true, Name = "coordgen-step-watchdog" }.Start();
        }

        // Before any other ONNX Runtime object: the first one (an OrtValue, session options, a prepacked
        // weights container) creates the environment, after which it can no longer get global pools.
        _sharedEnv = GlobalThreadPools(_options.IntraOpThreads);
        _prepacked = new PrePackedWeightsContainer();
        Buckets = CapacityBuckets(capacity, _options.BucketsPerOctave);
        CachePool = new KvCachePool(_options.KvPool);
        _widths = widths.Distinct().Order().ToArray();
        bool quantized = _options.Weights != WeightFormat.F32;
        foreach (var t in weights.Tensors.Where(t => !quantized || !WeightQuantizer.IsLinear(t.Name)))
        {
            _weightValues.Add((t.Name, OrtValue.CreateTensorValueFromMemory(t.Data, t.Shape)));
        }

        if (quantized)
        {
            // Quantized once here, shared by every graph as the float weights are.
            foreach (var t in WeightQuantizer.QuantizedLinears(weights))
            {
                var q = WeightQuantizer.Quantize(t, _options.Weights);
                _quantized.Add(q);
                _weightValues.Add((LlamaGraphCompiler.QuantizedCodes(t.Name), OrtValue.CreateTensorValueFromMemory(q.Packed, [q.N, q.Blocks, q.BlockSize * q.Bits / 8])));
                _weightValues.Add((LlamaGraphCompiler.QuantizedScales(t.Name), OrtValue.CreateTensorValueFromMemory(q.Scales, [q.Scales.LongLength])));
            }
        }

        // The smallest bucket of every width is compiled now, so a bad model or provider fails at start.
        foreach (int w in _widths)
        {
            _ = Graph(w, Buckets[0]);
        }
    }

    public ModelWeights Weights { get; }

    public ModelConfig Config { get; }

    /// <summary>Largest KV capacity (slots) a session may use.</summary>
    public int Capacity { get; }

    /// <summary>KV capacity buckets, ascending; the last equals <see cref="Capacity"/>.</summary>
    public IReadOnlyList<int> Buckets { get; }

    public IReadOnlyCollection<int> Widths => _widths;

    /// <summary>The execution provider the graphs run on.</summary>
    public ExecutionProviderKind Provider => _options.Provider;

    /// <summary>Wall time to compile and load each (width, bucket) graph.</summary>
    public Dictionary<(int Width, int Bucket), double> GraphLoadMs { get; } = new();

    /// <summary>Bytes of weights held once and shared by every graph.</summary>
    public long SharedWeightBytes => Weights.TotalBytes - _quantized.Sum(q => (long)q.N * q.K * sizeof(float)) + _quantized.Sum(q => q.Bytes);

    /// <summary>The format the linear layers run in.</summary>
    public WeightFormat WeightFormat => _options.Weights;

    /// <summary>The quantized linear layers (empty for float32), e.g. for quality reports.</summary>
    public IReadOnlyList<QuantizedTensor> QuantizedWeights => _quantized;

    public int GraphCount => _graphs.Count;

    /// <summary>Ends the profiler of every graph compiled so far (<see cref="RuntimeOptions.ProfilePrefix"/>) and gives the trace files' paths.</summary>
    public IReadOnlyList<string> EndProfiling() =>
        _options.ProfilePrefix is null ? [] : [.. _graphs.Values.Concat(_packed.Values.Where(l => l.IsValueCreated && l.Value.IsCompletedSuccessfully).Select(l => l.Value.Result))
            .Select(g => g.EndProfiling()).Where(p => p is not null).Select(p => p!)];

    /// <summary>Graph runs the step watchdog has ended (<see cref="RuntimeOptions.StepWatchdog"/>).</summary>
    public int WatchdogTerminations => _graphs.Values.Sum(g => g.WatchdogTerminations)
        + _packed.Values.Where(l => l.IsValueCreated && l.Value.IsCompletedSuccessfully).Sum(l => l.Value.Result.WatchdogTerminations);

    private static readonly object EnvLock = new();
    private static bool? _globalPools;

    /// <summary>
    /// One intra-op thread pool for every session of the process, created with the ONNX Runtime
    /// environment. With a pool per session, dozens of (width, bucket) graphs each keep a worker
    /// spinning after its last run and steal the cores from the graph that runs now. The thread count
    /// of the first runtime created wins. False when the environment already existed without global pools
    /// (something made an ONNX Runtime object first); the constructor calls it before making any.
    /// </summary>
    private static bool GlobalThreadPools(int threads)
    {
        lock (EnvLock)
        {
            if (_globalPools is null)
            {
                if (OrtEnv.IsCreated)
                {
                    _globalPools = false;
                }
                else
                {
                    var options = new EnvironmentCreationOptions
                    {
                        logLevel = OrtLoggingLevel.ORT_LOGGING_LEVEL_ERROR,
                        logId = "coordgen",
                        threadOptions = new OrtThreadingOptions
                        {
                            GlobalIntraOpNumThreads = threads,
                            GlobalInterOpNumThreads = 1,
                            GlobalSpinControl = true,
                        },
                    };
                    OrtEnv.CreateInstanceWithOptions(ref options);

                    // One CPU arena for every session too: each (width, bucket) graph otherwise keeps an arena
                    // sized for its own largest run, and dozens of graphs hold hundreds of MiB that only one
                    // run at a time uses (sessions opt in with session.use_env_allocators).
                    using var cpu = new OrtMemoryInfo(OrtMemoryInfo.allocatorCPU, OrtAllocatorType.ArenaAllocator, 0, OrtMemType.Default);
                    using var arena = new OrtArenaCfg(0, -1, -1, -1);
                    OrtEnv.Instance().CreateAndRegisterAllocator(cpu, arena);
                    _globalPools = true;
                }
            }

            return _globalPools.Value;
        }
    }

    /// <summary>
    /// Width-1 graphs (plain decoding) keep only logits: the sampler reads one row and the extra head
    /// would cost every plain step. Wider graphs (verification, prefill) also give each row's top
    /// candidates (<see cref="LlamaGraphCompiler.TopCandidates"/>).
    /// </summary>
    public static int TopCandidatesFor(int width) => width >= 2 ? LlamaGraphCompiler.TopCandidates : 0;

    /// <summary>
    /// The KV capacities graphs are compiled for: 256, then <paramref name="perOctave"/> evenly spaced
    /// buckets per doubling (never closer than 256 slots), and <paramref name="capacity"/> itself last.
    /// With 4 per octave and C = 2048: 256, 512, 768, 1024, 1280, 1536, 1792, 2048.
    /// </summary>
    public static int[] CapacityBuckets(int capacity, int perOctave = 4)
    {
        var b = new List<int>();
        for (int octave = SmallestBucket; octave < capacity; octave *= 2)
        {
            int step = Math.Max(SmallestBucket, octave / perOctave);
            for (int c = octave; c < 2 * octave && c < capacity; c += step)
            {
                b.Add(c);
            }
        }

        b.Add(capacity);
        return [.. b];
    }

    /// <summary>A session's cache: memory from <see cref="CachePool"/> when it keeps some (decision 0030), handed back on Dispose.</summary>
    public KvCache CreateCache() => new(Config.NumLayers, Config.NumKvHeads, Config.HeadDim, Buckets, _options.Kv, CachePool);

    /// <summary>The memory of ended sessions' caches, kept for the next ones (<see cref="RuntimeOptions.KvPool"/>).</summary>
    public KvCachePool CachePool { get; }

    /// <summary>How this runtime's caches hold keys and values.</summary>
    public KvFormat Kv => _options.Kv;

    /// <summary>Compiles (and runs once) every (width, bucket) graph now instead of on first use.</summary>
    public void CompileAll() => Prepare(Capacity);

    /// <summary>
    /// Compiles every width's graphs for the buckets a session of up to <paramref name="slots"/> slots
    /// passes through, and runs each new one once on a scratch cache: a graph's first run carries ONNX
    /// Runtime's allocations (several times a step), which would otherwise land in a user's request.
    /// </summary>
    public void Prepare(int slots)
    {
        using var scratch = CreateCache();
        foreach (int b in Buckets)
        {
            scratch.EnsureRoom(b);
            foreach (int w in _widths)
            {
                if (_graphs.ContainsKey((w, b)) && _runMs.ContainsKey((w, b)))
                {
                    continue;
                }

                var g = Graph(w, b);
                g.Buffers.SetLinear(new int[Math.Min(w, b)], 0, 0);
                g.Run(scratch, watched: false);   // a first run allocates and prepacks: never the watchdog's business
                _runMs.GetOrAdd((w, b), _ => new RunTimes()).Runs++;
            }

            if (b >= slots)
            {
                break;
            }
        }
    }

    /// <summary>
    /// The buffers of the width-W graph for <paramref name="cache"/>, growing the cache into a bucket
    /// with room for <paramref name="width"/> more tokens first. Fill them, then call <see cref="Run"/>.
    /// </summary>
    public StepBuffers Buffers(int width, KvCache cache)
    {
        cache.EnsureRoom(Math.Min(cache.Length + width, cache.Capacity));
        return Graph(width, cache.Bucket).Buffers;
    }

    /// <summary>
    /// Runs the width-W graph over the <see cref="StepBuffers"/> the caller filled (tokens, positions,
    /// mask) against <paramref name="cache"/>. Logits and the new keys/values land in the same buffers.
    /// </summary>
    public void Run(int width, KvCache cache)
    {
        Faults?.OnDeviceStep();
        StallIfHungUnwatched();
        var g = Graph(width, cache.Bucket);
        RunTimed(g, width, cache);
        var logits = g.Buffers.Logits.AsSpan(0, width * Config.VocabSize);
        Faults?.OnLogits(logits);
        if (!System.Numerics.Tensors.TensorPrimitives.IsFiniteAll<float>(logits))
        {
            // A real accelerator can return garbage (overflow in low precision, a driver fault); sampling
            // from it would silently corrupt the output, so the step fails and the caller recovers.
            throw new DeviceFaultException("the device returned non-finite logits (NaN or Inf); the step was discarded. Retry the request; if it keeps happening, check the model's dtype and the execution provider.");
        }
    }

    /// <summary>The widest verification tree: compiled widths above it are prefill chunks, never packed as trees.</summary>
    public const int MaxTreeWidth = 16;

    /// <summary>Slot counts of the packed graphs (issue 19): a packed step runs on the smallest that holds its sessions.</summary>
    public static readonly int[] PackedSlotCounts = [2, 4, 8, 16];

    /// <summary>
    /// Whether packed graphs write each session's new keys and values straight into its cache
    /// (GroupQueryAttention packing, <see cref="RuntimeOptions.PackedGroupQuery"/>): width-1 rows and trees
    /// alike, a tree's rows staged after the committed length as <see cref="KvCache.WriteLayers"/> stages them,
    /// for <see cref="KvCache.Keep"/>. <see cref="RunPacked"/> says so per run (a run of one session takes the plain graph).
    /// </summary>
    public bool PackedInPlace =>
        _options.PackedGroupQuery && !_options.AttentionInFloat64 && _options.Kv == KvFormat.F32 && _options.Weights == WeightFormat.F32 && _options.Provider == ExecutionProviderKind.Cpu;

    // GroupQueryAttention packing: slots a step does not fill write their (ignored) rows into a cache of their
    // own per bucket, shared by every idle slot of every graph of that bucket, never into a session's.
    private readonly System.Collections.Concurrent.ConcurrentDictionary<int, KvCache> _idleCaches = new();

    private KvCache IdleCache(int bucket) => _idleCaches.GetOrAdd(bucket, b =>
    {
        var c = CreateCache();
        c.EnsureRoom(b);
        return c;
    });

    /// <summary>
    /// The per-session buffers of a packed step: one session's rows in each, filled exactly as for a solo run
    /// of width <paramref name="width"/> (<see cref="StepBuffers.SetLinear"/>, a tree mask). Every cache moves
    /// into the bucket of the fullest first (one packed graph has one capacity). Fill them, then call
    /// <see cref="RunPacked"/>; each session's logits and new keys/values land in its own buffers.
    /// </summary>
    public IReadOnlyList<StepBuffers> PackedBuffers(int width, IReadOnlyList<KvCache> caches)
    {
        var g = PackedGraph(width, caches);
        return g.SlotBuffers.Take(caches.Count).ToArray();
    }

    /// <summary>
    /// Runs the rows of several sessions (<see cref="PackedBuffers"/>) as one run of a packed graph: the
    /// weights are read once for all of them, attention reads each session's own cache. One session runs
    /// the plain graph. Returns true when the run wrote each session's new rows into its cache itself
    /// (GroupQueryAttention packing, <see cref="PackedInPlace"/>): advance the caches instead of committing
    /// the rows from <see cref="PackedBuffers"/>.
    /// </summary>
    public bool RunPacked(int width, IReadOnlyList<KvCache> caches)
    {
        Faults?.OnDeviceStep();
        StallIfHungUnwatched();
        var g = PackedGraph(width, caches);
        // Slots the step does not fill read the first session's cache: nothing commits their rows, and a cache
        // of their own would have to follow every bucket the packs move through. In place (GroupQueryAttention)
        // they would write into it, so they get the bucket's idle cache instead.
        g.RunSlots(caches, g.InPlace ? IdleCache(caches[0].Bucket) : caches[0]);

        for (int i = 0; i < caches.Count; i++)
        {
            var logits = g.SlotBuffers[i].Logits.AsSpan(0, width * Config.VocabSize);
            Faults?.OnLogits(logits);
            if (!System.Numerics.Tensors.TensorPrimitives.IsFiniteAll<float>(logits))
            {
                Poison(caches); // in place, every slot's rows were written: any may hold the non-finite values
                throw new DeviceFaultException("the device returned non-finite logits (NaN or Inf) in a packed step; the step was discarded. Retry the request; if it keeps happening, check the model's dtype and the execution provider.");
            }
        }

        return g.InPlace;
    }

    /// <summary>
    /// Whether a prefill chunk of <paramref name="chunkWidth"/> tokens into <paramref name="chunk"/> can share one run with
    /// <paramref name="riders"/> sessions' steps (a mixed graph: width-1 steps, decision 0026, or trees, 0029): GroupQueryAttention packing
    /// (<see cref="PackedInPlace"/>), 1 to 15 riders, room in the chunk's cache for the chunk's padded rows, and the
    /// graph compiled. If it is not compiled yet its compilation starts in the background and this answers false, so a
    /// scheduler never waits for a compile.
    /// </summary>
    /// <param name="riderWidth">Rows of each rider: 1 (width-1 steps), or a tree width (decision 0029).</param>
    public bool CanMix(int chunkWidth, KvCache chunk, int riders, int riderWidth = 1)
    {
        if (!PackedInPlace || IsDisposed || chunkWidth < 2 || chunkWidth > Capacity || riders < 1 || riders >= PackedSlotCounts[^1] || chunk.Length + chunkWidth > chunk.Capacity)
        {
            return false;
        }

        return MixedReady(riders, chunkWidth, riderWidth);
    }

    /// <summary>Whether the mixed graph of a chunk of <paramref name="chunkWidth"/> beside <paramref name="riders"/> riders of <paramref name="riderWidth"/> rows is compiled; if not, its compilation starts in the background (false until it is done).</summary>
    public bool MixedReady(int riders, int chunkWidth, int riderWidth = 1) =>
        PackedInPlace && !IsDisposed && riders >= 1 && riders < PackedSlotCounts[^1] && chunkWidth >= 2 && riderWidth >= 1 && riderWidth <= MaxTreeWidth
        && PackedCompile(MixedSlots(riders, riderWidth), chunkWidth, Capacity, riderWidth).Value.IsCompletedSuccessfully;

    private readonly System.Collections.Concurrent.ConcurrentDictionary<(int Slots, int Chunk, int Riders), int> _mixRefusals = new();

    /// <summary>As <see cref="ProbeRefusedPack"/>, for a mixed run that its recent times refuse: 3 runs after every 21 refusals.</summary>
    public bool ProbeRefusedMix(int riders, int chunkWidth, int riderWidth = 1) =>
        _mixRefusals.AddOrUpdate((MixedSlots(riders, riderWidth), chunkWidth, riderWidth), 1, (_, n) => n + 1) % 24 >= 21;

    private readonly System.Collections.Concurrent.ConcurrentDictionary<int, int> _chunkAloneProbes = new();

    /// <summary>
    /// Whether a chunk of <paramref name="chunkWidth"/> that could mix should run alone this time, to measure the chunk
    /// alone (1 in 16 such chunks, asked while that time is unknown): once every chunk mixes, nothing else would time it,
    /// and mixing is priced and charged against it.
    /// </summary>
    public bool ProbeChunkAlone(int chunkWidth) => _chunkAloneProbes.AddOrUpdate(chunkWidth, 1, (_, n) => n + 1) % 16 == 0;

    /// <summary>Compiles (and runs once) the mixed graphs of a chunk of <paramref name="chunkWidth"/> tokens beside every packed slot count's riders of <paramref name="riderWidth"/> rows (<see cref="CanMix"/>).</summary>
    public void PrepareMixed(int chunkWidth, int riderWidth = 1)
    {
        if (!PackedInPlace)
        {
            return;
        }

        foreach (int s in riderWidth == 1 ? PackedSlotCounts : [.. TreeRiderCounts.Select(r => r + 1)])
        {
            PackedCompile(s, chunkWidth, Capacity, riderWidth).Value.GetAwaiter().GetResult();
        }
    }

    /// <summary>
    /// The buffers of a mixed run (<see cref="CanMix"/>): [0] the chunk's, filled as for a solo chunk of
    /// <paramref name="chunkWidth"/> (<see cref="StepBuffers.SetLinear"/>), then one buffer of <paramref name="riderWidth"/>
    /// rows per rider (a width-1 step, or a tree filled as for a packed tree run). Fill them, then call <see cref="RunMixed"/>.
    /// </summary>
    public IReadOnlyList<StepBuffers> MixedBuffers(int chunkWidth, KvCache chunk, IReadOnlyList<KvCache> riders, int riderWidth = 1) =>
        MixedGraph(chunkWidth, chunk, riders, riderWidth).SlotBuffers.Take(riders.Count + 1).ToArray();

    /// <summary>
    /// Runs a prefill chunk and its riders' steps (width-1 steps or trees of <paramref name="riderWidth"/> rows) as one
    /// run of a mixed graph: the weights are read once for all the rows, each slot attends over its own cache and writes
    /// its new rows into it (in place, from its length on: the chunk's cache then holds the chunk's padded rows past its
    /// real ones; advance the chunk's and each width-1 rider's cache by its real rows, and leave a tree's rows staged). Logits (and top candidates) land in each slot's buffers from <see cref="MixedBuffers"/>.
    /// </summary>
    public void RunMixed(int chunkWidth, KvCache chunk, IReadOnlyList<KvCache> riders, int riderWidth = 1)
    {
        Faults?.OnDeviceStep();
        StallIfHungUnwatched();
        var g = MixedGraph(chunkWidth, chunk, riders, riderWidth);
        KvCache[] caches = [chunk, .. riders];
        g.RunSlots(caches, IdleCache(riders.Max(c => c.Bucket)));
        for (int i = 0; i < caches.Length; i++)
        {
            var logits = g.SlotBuffers[i].Logits.AsSpan(0, (i == 0 ? chunkWidth : riderWidth) * Config.VocabSize);
            Faults?.OnLogits(logits);
            if (!System.Numerics.Tensors.TensorPrimitives.IsFiniteAll<float>(logits))
            {
                Poison(caches); // in place, every slot's rows were written: any may hold the non-finite values
                throw new DeviceFaultException("the device returned non-finite logits (NaN or Inf) in a mixed step; the step was discarded. Retry the request; if it keeps happening, check the model's dtype and the execution provider.");
            }
        }
    }

    // A faulty run's caches are never kept for another session (KvCachePool): the rows past their length may not be finite.
    private static void Poison(IEnumerable<KvCache> caches)
    {
        foreach (var c in caches)
        {
            c.Poisoned = true;
        }
    }

    /// <summary>Tree riders a mixed graph holds beside its chunk: an idle slot costs a tree's rows, so these graphs hold
    /// one more slot than these counts (2, 3, 5, 9, 16 slots) where width-1 riders' use the packed slot counts.</summary>
    public static readonly int[] TreeRiderCounts = [1, 2, 4, 8, 15];

    /// <summary>Slots of the mixed graph that holds a chunk and <paramref name="riders"/> riders of <paramref name="riderWidth"/> rows.</summary>
    public static int MixedSlots(int riders, int riderWidth) =>
        riderWidth == 1 ? PackedSlots(riders + 1) : 1 + TreeRiderCounts.First(c => c >= Math.Min(riders, TreeRiderCounts[^1]));

    private WidthGraph MixedGraph(int chunkWidth, KvCache chunk, IReadOnlyList<KvCache> riders, int riderWidth)
    {
        ObjectDisposedException.ThrowIf(IsDisposed, this);
        if (!PackedInPlace || riders.Count < 1 || riders.Count >= PackedSlotCounts[^1] || riderWidth < 1 || riderWidth > MaxTreeWidth)
        {
            throw new ArgumentException($"a mixed run holds one chunk and 1 to {PackedSlotCounts[^1] - 1} riders of 1 to {MaxTreeWidth} rows on GroupQueryAttention packing (got {riders.Count} riders of {riderWidth}; packing in place: {PackedInPlace}).");
        }

        chunk.EnsureRoom(chunk.Length + chunkWidth);
        foreach (var c in riders)
        {
            if (c.Length + riderWidth > c.Capacity && riderWidth > 1)
            {
                throw new ArgumentException($"a tree rider of {riderWidth} rows needs room for them in its cache ({c.Length} of {c.Capacity} slots used).");
            }

            c.EnsureRoom(Math.Min(c.Length + riderWidth, c.Capacity));
        }

        return PackedCompile(MixedSlots(riders.Count, riderWidth), chunkWidth, Capacity, riderWidth).Value.GetAwaiter().GetResult();
    }

    private readonly System.Collections.Concurrent.ConcurrentDictionary<(int Slots, int Chunk, int Riders), RunTimes> _mixedRunMs = new();

    /// <summary>Records a whole mixed step (a chunk of <paramref name="chunkWidth"/> beside <paramref name="riders"/> riders of <paramref name="riderWidth"/> rows, the host's work included).</summary>
    public void RecordMixedStep(int riders, int chunkWidth, double ms, int riderWidth = 1) => Record(_mixedRunMs.GetOrAdd((MixedSlots(riders, riderWidth), chunkWidth, riderWidth), _ => new RunTimes()), ms, skipFirst: false);

    /// <summary>Recent time of a mixed step of a chunk of <paramref name="chunkWidth"/> with up to <paramref name="riders"/> riders' graph of <paramref name="riderWidth"/> rows each (median of its last 15), or null before one ran.</summary>
    public double? RecentMixedRunMs(int riders, int chunkWidth, int riderWidth = 1) => _mixedRunMs.TryGetValue((MixedSlots(riders, riderWidth), chunkWidth, riderWidth), out var ring) ? Median(ring) : null;

    /// <summary>Slots of the packed graph that holds <paramref name="sessions"/> sessions (1: the plain graph).</summary>
    public static int PackedSlots(int sessions) => sessions <= 1 ? 1 : PackedSlotCounts.First(s => s >= sessions);

    private readonly System.Collections.Concurrent.ConcurrentDictionary<(int Slots, int Width, int Bucket), RunTimes> _packedRunMs = new();

    private readonly System.Collections.Concurrent.ConcurrentDictionary<(int Slots, int Width, int Bucket), int> _packedRefusals = new();

    /// <summary>
    /// Whether a pack that the recent packed times refuse should run anyway, to be measured again: 3 runs after
    /// every 21 refusals of the same graph. A packed time taken in a bad moment (a compile or a noisy neighbour
    /// on the same cores) would otherwise refuse that graph for good, since a refused pack is never timed again:
    /// on the 135M twin a 2-slot run once stood at 14x a plain step and kept 16 sessions at 2-3 per run.
    /// </summary>
    public bool ProbeRefusedPack(int slots, int width, int bucket) =>
        _packedRefusals.AddOrUpdate((slots, width, bucket), 1, (_, n) => n + 1) % 24 >= 21;

    /// <summary>
    /// Recent time of one packed step of <paramref name="slots"/> slots of <paramref name="width"/> rows in KV bucket <paramref name="bucket"/>,
    /// the host's work around the run included (median of its last 15 steps), or null before it has a steady one; with <see cref="RecentRunMs"/> of the
    /// plain width-1 graph it tells whether packing pays on this machine and model.
    /// </summary>
    public double? RecentPackedRunMs(int slots, int bucket, int width = 1) => _packedRunMs.TryGetValue((slots, width, bucket), out var ring) ? Median(ring) : null;

    /// <summary>Records a whole packed step of <paramref name="sessions"/> sessions at <paramref name="width"/> rows each (the run and the host's work around it: filling, committing, choosing) for <see cref="RecentPackedRunMs"/>.</summary>
    public void RecordPackedStep(int sessions, int bucket, double ms, int width = 1) => Record(_packedRunMs.GetOrAdd((PackedSlots(sessions), width, bucket), _ => new RunTimes()), ms, skipFirst: false);

    /// <summary>
    /// A packed step of <paramref name="slots"/> slots over a solo step of the same width, from their recent
    /// times in <paramref name="bucket"/>, or else in whichever buckets both were measured (median of those
    /// ratios); null when never measured. Packing n sessions pays when this is below n.
    /// </summary>
    public double? PackedCostRatio(int slots, int bucket, int width = 1)
    {
        double? Ratio(int b) => RecentPackedRunMs(slots, b, width) is { } p && RecentRunMs(width, b) is { } one && one > 0 ? p / one : null;
        if (Ratio(bucket) is { } here)
        {
            return here;
        }

        var known = Buckets.Select(Ratio).OfType<double>().Order().ToList();
        return known.Count == 0 ? null : known[known.Count / 2];
    }

    private WidthGraph PackedGraph(int width, IReadOnlyList<KvCache> caches)
    {
        ObjectDisposedException.ThrowIf(IsDisposed, this);
        if (caches.Count == 0 || caches.Count > PackedSlotCounts[^1])
        {
            throw new ArgumentException($"a packed step holds 1 to {PackedSlotCounts[^1]} sessions (got {caches.Count}).");
        }

        if (!_widths.Contains(width))
        {
            throw new ArgumentException($"no graph for width {width}; this runtime was built for widths {string.Join(",", _widths)}");
        }

        // A joined graph has one capacity: every cache moves into the bucket the fullest needs. In place
        // (GroupQueryAttention) each cache keeps its own bucket, with room for the step's rows; the graph of the
        // largest one runs them (its capacity only sizes the masks). Moving every cache up cost a 4-stream pack
        // 0.5 s when a 1,500-token newcomer joined it (decision 0024).
        bool ownSizes = caches.Count > 1 && PackedInPlace;
        int bucket = caches.Max(c => c.BucketFor(Math.Min(c.Length + width, c.Capacity)));
        foreach (var c in caches)
        {
            c.EnsureRoom(ownSizes ? Math.Min(c.Length + width, c.Capacity) : bucket);
        }

        if (caches.Count == 1)
        {
            return Graph(width, bucket);
        }

        return PackedCompile(PackedSlots(caches.Count), width, bucket).Value.GetAwaiter().GetResult();
    }

    // riders: 0 for a packed graph; a mixed graph's rows per rider (1, or a tree's width).
    private Lazy<Task<WidthGraph>> PackedCompile(int slots, int width, int bucket, int riders = 0) =>
        _packed.GetOrAdd((slots, width, bucket, riders), key => new Lazy<Task<WidthGraph>>(() => Task.Run(() => CompilePacked(key))));

    private WidthGraph CompilePacked((int Slots, int Width, int Bucket, int Riders) key)
    {
        ObjectDisposedException.ThrowIf(IsDisposed, this);
        var g = new WidthGraph(this, new GraphShape(key.Width, key.Bucket), key.Slots, key.Riders);

        // Its first run allocates (several runs' time): done here, off the device's critical path.
        using var scratch = CreateCache();
        scratch.EnsureRoom(key.Riders > 0 ? Buckets.FirstOrDefault(b => b >= key.Width, Capacity) : key.Bucket);
        g.SlotBuffers[0].SetLinear([0], 0, 0);
        g.RunSlots([scratch], scratch, watched: false);
        return g;
    }

    /// <summary>
    /// Compiles (and runs once) the packed graphs of every slot count for the buckets a session of up to
    /// <paramref name="slots"/> slots passes through, as <see cref="Prepare"/> does for the plain graphs:
    /// width 1, and with <paramref name="trees"/> every compiled width from 2 to <see cref="MaxTreeWidth"/> (the verification widths).
    /// </summary>
    public void PreparePacked(int slots, bool trees = false)
    {
        int[] widths = [1, .. _widths.Where(w => trees && w >= 2 && w <= MaxTreeWidth).Order()];
        foreach (int b in Buckets)
        {
            foreach (int s in PackedSlotCounts)
            {
                foreach (int w in widths)
                {
                    PackedCompile(s, w, b).Value.GetAwaiter().GetResult();
                }
            }

            if (b >= slots)
            {
                break;
            }
        }
    }

    /// <summary>
    /// Whether the packed graph for <paramref name="sessions"/> sessions of width <paramref name="width"/> in
    /// KV bucket <paramref name="bucket"/> is compiled; if not, its compilation starts in the background and
    /// this answers false until it is done, so a scheduler packs only onto graphs that are ready (a graph's
    /// compilation would otherwise stall the step that first needs it).
    /// </summary>
    public bool PackedReady(int sessions, int width, int bucket)
    {
        if (sessions <= 1 || IsDisposed)
        {
            return sessions <= 1;
        }

        var compile = PackedCompile(PackedSlots(sessions), width, bucket).Value;
        return compile.IsCompletedSuccessfully;
    }

    private void RunTimed(WidthGraph g, int width, KvCache cache)
    {
        long t0 = Stopwatch.GetTimestamp();
        g.Run(cache);
        double ms = Stopwatch.GetElapsedTime(t0).TotalMilliseconds;
        Record(_runMs.GetOrAdd((width, cache.Bucket), _ => new RunTimes()), ms);
    }

    private static void Record(RunTimes ring, double ms, bool skipFirst = true)
    {
        lock (ring)
        {
            // A graph's first run carries ONNX Runtime's first-run allocations: not a step time (packed graphs
            // ran once when they were compiled).
            if (ring.Runs++ > 0 || !skipFirst)
            {
                ring.Samples[ring.Count++ % ring.Samples.Length] = ms;
            }
        }
    }

    private readonly System.Collections.Concurrent.ConcurrentDictionary<(int Width, int Bucket), RunTimes> _runMs = new();

    private sealed class RunTimes
    {
        public readonly double[] Samples = new double[15];
        public int Count;
        public int Runs;
    }

    /// <summary>
    /// Recent time of one run of the width-<paramref name="width"/> graph in KV bucket
    /// <paramref name="bucket"/>, over all sessions: the median of its last 15 runs (a shared, noisy
    /// machine makes single runs jump), or null before it has a steady run.
    /// </summary>
    public double? RecentRunMs(int width, int bucket) => _runMs.TryGetValue((width, bucket), out var ring) ? Median(ring) : null;

    private static double? Median(RunTimes ring)
    {
        if (ring.Count == 0)
        {
            return null;
        }

        Span<double> s = stackalloc double[15];
        int n;
        lock (ring)
        {
            n = Math.Min(ring.Count, ring.Samples.Length);
            ring.Samples.AsSpan(0, n).CopyTo(s);
        }

        s = s[..n];
        s.Sort();
        return s[n / 2];
    }

    /// <summary>Fault hooks (tests and <c>bench faults</c> only); null in production.</summary>
    public IFaultInjector? Faults { get; set; }

    // An injected hang with the step watchdog off: nothing would end it, so it stalls and fails the step.
    private void StallIfHungUnwatched()
    {
        if (_options.StepWatchdog <= TimeSpan.Zero && Faults is { } f && f.TakeHang())
        {
            Thread.Sleep(f.HangLimit);
            throw new InjectedFaultException(FaultKind.DeviceHang, $"injected: the device step did not finish in time (stalled {f.HangLimit.TotalMilliseconds:F0} ms)");
        }
    }

    private WidthGraph Graph(int width, int bucket)
    {
        ObjectDisposedException.ThrowIf(IsDisposed, this);
        if (!_graphs.TryGetValue((width, bucket), out var g))
        {
            if (!_widths.Contains(width))
            {
                throw new ArgumentException($"no graph for width {width}; this runtime was built for widths {string.Join(",", _widths)}");
            }

            var sw = Stopwatch.StartNew();
            _graphs[(width, bucket)] = g = new WidthGraph(this, new GraphShape(width, bucket));
            GraphLoadMs[(width, bucket)] = sw.Elapsed.TotalMilliseconds;
        }

        return g;
    }

    /// <summary>
    /// Folder of the compiled graphs (one .onnx per width and bucket, kept for inspection, e.g. with
    /// Netron). The weights are not in it: beside the graphs lies a sparse placeholder that the graphs'
    /// external-data references name, and every session gets the real tensors through AddInitializer.
    /// </summary>
    public string GraphDirectory { get; } = Directory.CreateTempSubdirectory("coordgen-graphs-").FullName;

    private string WriteGraph(GraphShape shape, int slots = 1, bool groupQuery = false, int mixed = 0)
    {
        string placeholder = Path.Combine(GraphDirectory, LlamaGraphCompiler.SharedWeightsFile);
        if (!File.Exists(placeholder))
        {
            using var fs = File.Create(placeholder);
            fs.SetLength(Weights.Tensors.Max(t => t.Data.LongLength) * sizeof(float));
        }

        string path = Path.Combine(GraphDirectory, slots == 1 ? $"w{shape.Width}_c{shape.Capacity}.onnx" : $"s{slots}_w{shape.Width}_c{shape.Capacity}{(groupQuery ? "_gqa" : "")}{(mixed > 0 ? "_mixed" : "")}{(mixed > 1 ? $"_r{mixed}" : "")}.onnx");
        File.WriteAllBytes(path, LlamaGraphCompiler.CompileBytes(Config, shape, Weights.LmHeadName == "lm_head.weight", TopCandidatesFor(shape.Width), _options.Weights, slots, _options.Kv, groupQuery, _options.AttentionInFloat64, mixed > 0, _options.UsesFusedOps, Math.Max(mixed, 1)));
        return path;
    }

    private SessionOptions CreateSessionOptions(string graphName)
    {
        var so = new SessionOptions
        {
            GraphOptimizationLevel = GraphOptimizationLevel.ORT_ENABLE_ALL,
            ExecutionMode = ExecutionMode.ORT_SEQUENTIAL,
            IntraOpNumThreads = _options.IntraOpThreads,
            LogSeverityLevel = OrtLoggingLevel.ORT_LOGGING_LEVEL_ERROR,
        };
        if (_options.ProfilePrefix is { } prefix)
        {
            so.ProfileOutputPathPrefix = prefix + graphName; // before enabling: the prefix is read when profiling starts
            so.EnableProfiling = true;
        }

        if (_sharedEnv)
        {
            so.DisablePerSessionThreads();
            so.AddSessionConfigEntry("session.use_env_allocators", "1");
        }

        _options.ApplyProvider(so, graphName);

        // The graphs declare every weight as an external initializer; these OrtValues (over the pinned
        // arrays of ModelWeights) replace them in every session, so all widths read one copy.
        foreach (var (name, value) in _weightValues)
        {
            so.AddInitializer(name, value);
        }

        return so;
    }

    /// <summary>True once disposed; every later use throws <see cref="ObjectDisposedException"/>.</summary>
    public bool IsDisposed { get; private set; }

    public void Dispose()
    {
        if (IsDisposed)
        {
            return;
        }

        IsDisposed = true;
        _watchStop.Set();
        foreach (var g in _graphs.Values)
        {
            g.Dispose();
        }

        foreach (var compile in _packed.Values.Where(l => l.IsValueCreated).Select(l => l.Value))
        {
            // One still compiling is disposed once it is built: a background compile never outlives its graph.
            // (One that failed, or found the runtime disposed, has no graph to dispose.)
            compile.ContinueWith(
                t =>
                {
                    if (t.IsCompletedSuccessfully)
                    {
                        t.Result.Dispose();
                    }
                },
                CancellationToken.None,
                TaskContinuationOptions.ExecuteSynchronously,
                TaskScheduler.Default).Wait(TimeSpan.FromSeconds(30));
        }

        foreach (var (_, v) in _weightValues)
        {
            v.Dispose();
        }

        foreach (var idle in _idleCaches.Values)
        {
            idle.Dispose();
        }

        CachePool.Dispose();

        _prepacked.Dispose();
        try
        {
            Directory.Delete(GraphDirectory, recursive: true);
        }
        catch (IOException)
        {
            // A leftover temp folder is harmless.
        }
    }

    private sealed class WidthGraph : IDisposable
    {
        private readonly InferenceSession _session;
        private bool _profileEnded;

        /// <summary>Ends this session's profiler, once; its trace file's path (null if it was not profiling or has ended).</summary>
        public string? EndProfiling()
        {
            if (_profileEnded || !_so.EnableProfiling)
            {
                return null;
            }

            _profileEnded = true;
            return _session.EndProfiling();
        }
        private readonly SessionOptions _so;
        private readonly RunOptions _run = new();
        private readonly object _gate = new();
        private readonly OrtModelRuntime _owner;
        private TimeSpan _watchdog;
        private long _runStart;
        private bool _running;
        private bool _terminated;
        private readonly string[] _inputNames;
        private readonly string[] _outputNames;
        private readonly OrtValue[] _inputs;
        private readonly OrtValue[] _outputs;
        private readonly int _layers;
        private readonly int _slots;

        /// <param name="slots">1: the plain graph, reading and writing <see cref="Buffers"/> in place. More: a
        /// packed graph (<see cref="LlamaGraphCompiler.CompileBytes"/>) over <see cref="Buffers"/> of all its
        /// rows, copied from and to each session's <see cref="SlotBuffers"/> around the run; each slot's new
        /// keys and values are written straight into its own buffers.</param>
        /// <param name="riders">Above 0, a mixed graph (<see cref="LlamaGraphCompiler.CompileBytes"/>): slot 0 holds a prefill chunk of
        /// <paramref name="shape"/>'s width, the other slots this many rows each (one decode row, or a tree); always in place.</param>
        public WidthGraph(OrtModelRuntime owner, GraphShape shape, int slots = 1, int riders = 0)
        {
            bool mixed = riders > 0;
            var c = owner.Config;
            _layers = c.NumLayers;
            _slots = slots;
            _owner = owner;
            _watchdog = owner._options.StepWatchdog;
            _so = owner.CreateSessionOptions(slots == 1 ? $"w{shape.Width}_c{shape.Capacity}" : $"s{slots}_w{shape.Width}_c{shape.Capacity}{(mixed ? "_mixed" : "")}{(riders > 1 ? $"_r{riders}" : "")}");
            InPlace = slots > 1 && owner.PackedInPlace;
            if (mixed && !InPlace)
            {
                throw new InvalidOperationException("mixed graphs (a prefill chunk beside decode rows) need GroupQueryAttention packing: float32 weights and caches on the CPU provider.");
            }

            string path = owner.WriteGraph(shape, slots, InPlace, riders);
            _session = new InferenceSession(path, _so, owner._prepacked);
            _rows = [.. Enumerable.Range(0, slots).Select(s => !mixed || s == 0 ? shape.Width : riders)];
            _offsets = [.. Enumerable.Range(0, slots).Select(s => _rows.Take(s).Sum())];
            int topK = TopCandidatesFor(shape.Width), n = _rows.Sum();
            var kv = owner._options.Kv;
            Buffers = new StepBuffers(n, shape.Capacity, c, topK, maskRows: slots == 1 ? null : mixed ? 1 : shape.Width, kv);
            SlotBuffers = slots == 1 ? [Buffers] : [.. _rows.Select(r => new StepBuffers(r, shape.Capacity, c, topK, kv: kv))];
            Mixed = mixed;

            var pasts = Enumerable.Range(0, _layers).SelectMany(l => Enumerable.Range(0, slots).SelectMany(s => new[] { LlamaGraphCompiler.PastKey(l, s, slots), LlamaGraphCompiler.PastValue(l, s, slots) }));
            var presents = Enumerable.Range(0, _layers).SelectMany(l => Enumerable.Range(0, slots).SelectMany(s => new[] { LlamaGraphCompiler.PresentKey(l, s, slots), LlamaGraphCompiler.PresentValue(l, s, slots) }));
            string[] riderMask = riders > 1 ? [LlamaGraphCompiler.RiderMask] : [];
            _inputNames = InPlace ? ["input_ids", "position_ids", "attention_mask", .. pasts, LlamaGraphCompiler.KvLengths, .. riderMask] : ["input_ids", "position_ids", "attention_mask", .. pasts];
            string[] top = topK > 0 ? [LlamaGraphCompiler.TopIds, LlamaGraphCompiler.TopProbs] : [];
            _outputNames = ["logits", .. presents, .. top];
            _inputs = new OrtValue[_inputNames.Length];
            _inputs[0] = OrtValue.CreateTensorValueFromMemory(Buffers.TokenIds, [1, n]);
            _inputs[1] = OrtValue.CreateTensorValueFromMemory(Buffers.Positions, [1, n]);
            // A mixed graph's mask is its chunk's own block, read from the chunk slot's buffers directly.
            _inputs[2] = mixed
                ? OrtValue.CreateTensorValueFromMemory(SlotBuffers[0].Mask, [1, 1, shape.Width, shape.Capacity + shape.Width])
                : OrtValue.CreateTensorValueFromMemory(Buffers.Mask, [slots, 1, shape.Width, shape.Capacity + shape.Width]);
            if (InPlace)
            {
                _inputs[3 + (2 * _layers * slots)] = OrtValue.CreateTensorValueFromMemory(_kvLengths = GC.AllocateArray<int>(slots, pinned: true), [slots]);
            }

            if (riders > 1)
            {
                // Each tree rider's block (the last R columns of its own mask rows), gathered before each run.
                _riderMask = GC.AllocateArray<float>((slots - 1) * riders * riders, pinned: true);
                _inputs[^1] = OrtValue.CreateTensorValueFromMemory(_riderMask, [slots - 1, 1, riders, riders]);
            }

            _outputs = new OrtValue[_outputNames.Length];
            _outputs[0] = OrtValue.CreateTensorValueFromMemory(Buffers.Logits, [1, n, c.VocabSize]);
            long[] kvShape = [1, c.NumKvHeads, shape.Width, c.HeadDim];
            for (int l = 0; l < _layers && !InPlace; l++) // in place: each run binds the caches themselves
            {
                for (int s = 0; s < slots; s++)
                {
                    int at = 1 + (2 * ((l * slots) + s));
                    int rows = c.NumKvHeads * shape.Width * c.HeadDim;
                    _outputs[at] = KvCache.Tensor(SlotBuffers[s].NewKeys[l], rows, kvShape);
                    _outputs[at + 1] = KvCache.Tensor(SlotBuffers[s].NewValues[l], rows, kvShape);
                }
            }

            if (topK > 0)
            {
                long[] topShape = [1, n, topK];
                _outputs[1 + (2 * _layers * slots)] = OrtValue.CreateTensorValueFromMemory(Buffers.TopIds, topShape);
                _outputs[2 + (2 * _layers * slots)] = OrtValue.CreateTensorValueFromMemory(Buffers.TopProbs, topShape);
            }
        }

        public StepBuffers Buffers { get; }

        /// <summary>A GroupQueryAttention packed graph: its presents are the caches themselves (<see cref="PackedInPlace"/>).</summary>
        public bool InPlace { get; }

        /// <summary>A prefill chunk in slot 0 beside one decode row in each other slot.</summary>
        public bool Mixed { get; }

        // Each slot's rows, and where they start among the run's rows.
        private readonly int[] _rows;
        private readonly int[] _offsets;

        private readonly int[]? _kvLengths;

        private readonly float[]? _riderMask;

        /// <summary>Each packed session's own buffers (the plain graph's one is <see cref="Buffers"/>).</summary>
        public StepBuffers[] SlotBuffers { get; }

        public void Run(KvCache cache, bool watched = true) => RunSlots([cache], null, watched);

        /// <summary>Runs the graph with slot s reading <paramref name="caches"/>[s] (slots beyond them read <paramref name="idle"/>).</summary>
        public void RunSlots(IReadOnlyList<KvCache> caches, KvCache? idle, bool watched = true)
        {
            for (int s = 0; s < caches.Count + 1; s++)
            {
                // In place each cache keeps its own bucket (the graph's cache inputs have no fixed size).
                var cache = s < caches.Count ? caches[s] : idle;
                int rows = _rows[Math.Min(s, _slots - 1)];
                if (cache is not null && (InPlace ? cache.Length + rows > cache.Bucket || cache.Bucket > Buffers.Capacity : cache.Bucket != Buffers.Capacity))
                {
                    throw new InvalidOperationException($"cache is in bucket {cache.Bucket} with {cache.Length} slots used, which does not fit this graph ({Buffers.Capacity}, {rows} rows in its slot)");
                }
            }

            for (int s = 0; s < _slots; s++)
            {
                var cache = s < caches.Count ? caches[s] : idle!;
                for (int l = 0; l < _layers; l++)
                {
                    int at = 3 + (2 * ((l * _slots) + s));
                    _inputs[at] = cache.KeyValue(l);
                    _inputs[at + 1] = cache.ValueValue(l);
                    if (InPlace)
                    {
                        // The same memory is past and present: the node writes the new rows from the cache's length on.
                        _outputs[at - 2] = _inputs[at];
                        _outputs[at - 1] = _inputs[at + 1];
                    }
                }

                if (_kvLengths is not null)
                {
                    _kvLengths[s] = cache.Length;
                }

                if (_slots > 1)
                {
                    var slot = SlotBuffers[s];
                    if (s >= caches.Count)
                    {
                        slot.SetLinear([0], 0, 0); // an idle slot: one row that sees only itself
                    }

                    slot.TokenIds.CopyTo(Buffers.TokenIds, _offsets[s]);
                    slot.Positions.CopyTo(Buffers.Positions, _offsets[s]);
                    if (!Mixed && (!InPlace || slot.Width > 1))
                    {
                        slot.Mask.CopyTo(Buffers.Mask, s * slot.Mask.Length); // in place, the lengths are the mask (and a tree's last W columns its bias)
                    }
                    else if (_riderMask is not null && s > 0)
                    {
                        int r = _rows[s], cols = slot.Capacity + r;
                        for (int i = 0; i < r; i++)
                        {
                            slot.Mask.AsSpan((i * cols) + slot.Capacity, r).CopyTo(_riderMask.AsSpan((((s - 1) * r) + i) * r, r));
                        }
                    }
                }
            }

            RunGuarded(watched);
            if (_slots > 1)
            {
                int v = Buffers.VocabSize, k = Buffers.TopK;
                for (int s = 0; s < caches.Count; s++)
                {
                    var slot = SlotBuffers[s];
                    int at = _offsets[s], r = _rows[s];
                    Buffers.Logits.AsSpan(at * v, r * v).CopyTo(slot.Logits);
                    Buffers.TopIds.AsSpan(at * k, r * k).CopyTo(slot.TopIds);
                    Buffers.TopProbs.AsSpan(at * k, r * k).CopyTo(slot.TopProbs);
                }
            }
        }

        private void RunGuarded(bool watched)
        {
            if (!watched || _watchdog <= TimeSpan.Zero)
            {
                _session.Run(_run, _inputNames, _inputs, _outputNames, _outputs);
                return;
            }

            // An injected hang is a device that keeps computing: real runs of this graph, one after another,
            // until the watchdog ends one mid-run, exactly as it ends a run that hangs for real.
            bool hang = _owner.Faults?.TakeHang() ?? false;
            TimeSpan limit;
            lock (_gate)
            {
                _runStart = Stopwatch.GetTimestamp();
                _running = true;
                _terminated = false;
                _run.Terminate = false;
                _forced = hang;
                _runLimit = hang ? _owner.Faults!.HangLimit : _watchdog;
                limit = _runLimit;
            }

            Volatile.Write(ref _owner._watched, this);
            try
            {
                do
                {
                    _session.Run(_run, _inputNames, _inputs, _outputNames, _outputs);
                }
                while (hang);
            }
            catch (OnnxRuntimeException ex) when (Volatile.Read(ref _terminated))
            {
                throw new DeviceFaultException(hang
                    ? $"injected hang: the device kept computing past the {limit.TotalMilliseconds:F0} ms limit and the step watchdog ended its run ({ex.Message.Trim()}); the request resumes."
                    : $"the device step did not finish within the {limit.TotalMilliseconds:F0} ms step watchdog and was ended ({ex.Message.Trim()}); the request resumes, and this graph's limit is now {_watchdog.TotalMilliseconds:F0} ms.");
            }
            finally
            {
                Volatile.Write(ref _owner._watched, null);
                lock (_gate)
                {
                    _running = false;
                }
            }
        }

        /// <summary>Runs of this graph the watchdog ended (injected hangs among them); each real overrun doubled the graph's limit.</summary>
        public int WatchdogTerminations { get; private set; }

        // The run in progress is an injected hang, held to its own limit.
        private bool _forced;
        private TimeSpan _runLimit;

        /// <summary>The runtime's watchdog tick: ends this graph's run if it has overrun its limit (never a later run: the check and the run's start and end share a lock).</summary>
        public void CheckOverrun()
        {
            lock (_gate)
            {
                if (!_running || _terminated || Stopwatch.GetElapsedTime(_runStart) <= _runLimit)
                {
                    return;
                }

                try
                {
                    _run.Terminate = true;
                }
                catch (ObjectDisposedException)
                {
                    return; // the runtime is being disposed: nothing left to end
                }

                _terminated = true;
                WatchdogTerminations++;
                if (!_forced)
                {
                    _watchdog *= 2;
                }
            }
        }

        public void Dispose()
        {
            _session.Dispose();
            _so.Dispose();
            _run.Dispose();
            for (int i = 0; i < 3; i++)
            {
                _inputs[i].Dispose();
            }

            for (int i = 0; i < _outputs.Length; i++)
            {
                bool cache = InPlace && i >= 1 && i <= 2 * _layers * _slots;
                if (!cache)
                {
                    _outputs[i]?.Dispose(); // in place, the present outputs are the caches' own values
                }
            }

            if (InPlace)
            {
                _inputs[3 + (2 * _layers * _slots)].Dispose(); // kv_lengths
            }

            if (_riderMask is not null)
            {
                _inputs[^1].Dispose();
            }
        }
    }
}

/// <summary>
/// The pinned input and output buffers of one graph width. The caller writes tokens, positions and
/// mask rows, calls <see cref="OrtModelRuntime.Run"/>, then reads logits and new keys/values.
/// </summary>
public sealed class StepBuffers
{
    /// <param name="maskRows">A packed graph's buffers: its mask holds each slot's [rows, capacity + rows] block; null: one [width, capacity + width] block.</param>
    internal StepBuffers(int width, int capacity, ModelConfig c, int topK = 0, int? maskRows = null, KvFormat kv = KvFormat.F32)
    {
        TopK = topK;
        TopIds = GC.AllocateArray<long>(width * topK, pinned: true);
        TopProbs = GC.AllocateArray<float>(width * topK, pinned: true);
        Width = width;
        Capacity = capacity;
        VocabSize = c.VocabSize;
        TokenIds = GC.AllocateArray<long>(width, pinned: true);
        Positions = GC.AllocateArray<long>(width, pinned: true);
        Mask = GC.AllocateArray<float>(width * (capacity + (maskRows ?? width)), pinned: true);
        Logits = GC.AllocateArray<float>(width * c.VocabSize, pinned: true);
        NewKeys = Enumerable.Range(0, c.NumLayers).Select(_ => KvCache.Allocate(kv, c.NumKvHeads * width * c.HeadDim)).ToArray();
        NewValues = Enumerable.Range(0, c.NumLayers).Select(_ => KvCache.Allocate(kv, c.NumKvHeads * width * c.HeadDim)).ToArray();
    }

    public int Width { get; }

    public int Capacity { get; }

    public int VocabSize { get; }

    public long[] TokenIds { get; }

    public long[] Positions { get; }

    public float[] Mask { get; }

    public float[] Logits { get; }

    /// <summary>The step's new keys per layer, [Hkv, W, D], in the cache's format (float[] or Float16[]).</summary>
    public Array[] NewKeys { get; }

    /// <summary>The step's new values per layer, like <see cref="NewKeys"/>.</summary>
    public Array[] NewValues { get; }

    public ReadOnlySpan<float> LogitsRow(int row) => Logits.AsSpan(row * VocabSize, VocabSize);

    /// <summary>Candidates per row in <see cref="TopIds"/>/<see cref="TopProbs"/>; 0 when the graph has no top-K head.</summary>
    public int TopK { get; }

    /// <summary>Each row's <see cref="TopK"/> most likely next tokens, best first (ties: lower id first).</summary>
    public long[] TopIds { get; }

    /// <summary>Softmax probabilities of <see cref="TopIds"/>.</summary>
    public float[] TopProbs { get; }

    /// <summary>The greedy next token of a row: from the graph's top-K head when it has one, else the argmax of the logits.</summary>
    public int Argmax(int row) => TopK > 0 ? (int)TopIds[row * TopK] : System.Numerics.Tensors.TensorPrimitives.IndexOfMax(LogitsRow(row));

    /// <summary>Fills a causal chunk: tokens at positions start.., rows past <paramref name="tokens"/> padded.</summary>
    public void SetLinear(ReadOnlySpan<int> tokens, int startPosition, int cacheLength)
    {
        if (tokens.Length > Width)
        {
            throw new ArgumentException($"{tokens.Length} tokens exceed width {Width}");
        }

        for (int j = 0; j < Width; j++)
        {
            TokenIds[j] = j < tokens.Length ? tokens[j] : 0;
            Positions[j] = j < tokens.Length ? startPosition + j : startPosition;
        }

        AttentionMask.FillLinear(Mask, Width, Capacity, cacheLength, tokens.Length);
    }
}
