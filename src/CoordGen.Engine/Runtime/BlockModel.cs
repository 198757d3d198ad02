using System.Diagnostics;
using CoordGen.Engine.Model;
using CoordGen.Engine.Onnx;
using Microsoft.ML.OnnxRuntime;

namespace CoordGen.Engine.Runtime;

/// <summary>
/// A model split into blocks of consecutive decoder layers (the first with the embedding, the last with
/// the head), each compiled at several static widths. A block variant is loaded (an ONNX Runtime session
/// with its own pre-packed weights: like an NPU, variants do not share weight memory) and unloaded
/// explicitly, so graph-switching strategies can be run and timed for real (paper §3.2). A prefill
/// chunk runs through every block; a block on a narrower variant runs it as consecutive sub-chunks,
/// writing each sub-chunk's keys/values before the next reads them (graph equivalence by repetition).
/// </summary>
public sealed class BlockModel : IDisposable
{
    private readonly ModelWeights _weights;
    private readonly RuntimeOptions _options;
    private readonly Dictionary<string, OrtValue> _weightValues = new();
    private readonly Dictionary<(int Block, int Width), BlockSession> _loaded = new();
    private readonly object _gate = new();
    private readonly object _scratchGate = new();
    private KvCache? _scratch;
    private readonly string _dir = Directory.CreateTempSubdirectory("coordgen-blocks-").FullName;

    public BlockModel(ModelWeights weights, int capacity, int blocks, RuntimeOptions? options = null)
    {
        _weights = weights;
        Config = weights.Config;
        Capacity = capacity;
        _options = options ?? new RuntimeOptions();
        if (blocks < 1 || blocks > Config.NumLayers)
        {
            throw new ArgumentException($"blocks must be between 1 and the model's {Config.NumLayers} layers (got {blocks}).");
        }

        Ranges = [.. Enumerable.Range(0, blocks).Select(b => (b * Config.NumLayers / blocks, (b + 1) * Config.NumLayers / blocks))];
        foreach (var t in weights.Tensors)
        {
            _weightValues[t.Name] = OrtValue.CreateTensorValueFromMemory(t.Data, t.Shape);
        }

        using (var fs = File.Create(Path.Combine(_dir, LlamaGraphCompiler.SharedWeightsFile)))
        {
            fs.SetLength(weights.Tensors.Max(t => t.Data.LongLength) * sizeof(float));
        }
    }

    public ModelConfig Config { get; }

    public int Capacity { get; }

    public int Blocks => Ranges.Count;

    /// <summary>Each block's decoder layers [First, End).</summary>
    public IReadOnlyList<(int First, int End)> Ranges { get; }

    public KvCache CreateCache() => new(Config.NumLayers, Config.NumKvHeads, Config.HeadDim, [Capacity]);

    public bool IsLoaded(int block, int width)
    {
        lock (_gate)
        {
            return _loaded.ContainsKey((block, width));
        }
    }

    /// <summary>
    /// Loads a block variant: compiles, creates the session (pre-packing its weights) and runs it once on
    /// a scratch cache, so the load carries the first-run initialisation too and later runs are steady.
    /// Returns the milliseconds it took. Thread-safe.
    /// </summary>
    public double Load(int block, int width)
    {
        var sw = Stopwatch.StartNew();
        var session = new BlockSession(this, block, width);
        lock (_scratchGate)
        {
            _scratch ??= CreateCache();
            session.RunSub(_scratch, new int[width], new float[width * Config.HiddenSize], 0, 0, width, null);
        }

        lock (_gate)
        {
            if (!_loaded.TryAdd((block, width), session))
            {
                session.Dispose();
            }
        }

        return sw.Elapsed.TotalMilliseconds;
    }

    /// <summary>Frees a block variant (its session and pre-packed weights).</summary>
    public void Unload(int block, int width)
    {
        BlockSession? s;
        lock (_gate)
        {
            _loaded.Remove((block, width), out s);
        }

        s?.Dispose();
        if (s is not null)
        {
            ReturnFreedMemory();
        }
    }

    /// <summary>
    /// glibc keeps freed heap pages for reuse; after a variant's session and pre-packed weights are freed,
    /// hand them back to the system so switching really lowers the footprint (what an NPU's graph unload does).
    /// </summary>
    private static void ReturnFreedMemory()
    {
        if (!OperatingSystem.IsLinux())
        {
            return;
        }

        try
        {
            _ = MallocTrim(0);
        }
        catch (Exception ex) when (ex is DllNotFoundException or EntryPointNotFoundException)
        {
            // Not glibc (musl, for example): the memory is reused by later allocations instead.
        }
    }

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "malloc_trim")]
    private static extern int MallocTrim(nuint pad);

    /// <summary>
    /// Runs <paramref name="tokens"/> (the next prompt chunk, or a decode step) through every block at the
    /// cache's end; block b runs on width <paramref name="widthOf"/>(b), whose variant must be loaded.
    /// <paramref name="beforeBlock"/> is called before each block (a scheduler starts loads there).
    /// Commits the tokens and returns the logits of the last one.
    /// </summary>
    public float[] Run(KvCache cache, ReadOnlySpan<int> tokens, Func<int, int> widthOf, Action<int>? beforeBlock = null)
    {
        int n = tokens.Length, h = Config.HiddenSize, at = cache.Length;
        if (n == 0 || at + n > Capacity)
        {
            throw new ArgumentException($"{n} tokens at slot {at} do not fit capacity {Capacity}.");
        }

        var hidden = new float[n * h];
        float[] last = new float[Config.VocabSize];
        for (int b = 0; b < Blocks; b++)
        {
            beforeBlock?.Invoke(b);
            int w = widthOf(b);
            BlockSession s;
            lock (_gate)
            {
                if (!_loaded.TryGetValue((b, w), out s!))
                {
                    throw new InvalidOperationException($"block {b} has no loaded width-{w} variant.");
                }
            }

            for (int start = 0; start < n; start += w)
            {
                int m = Math.Min(w, n - start);
                s.RunSub(cache, tokens.Slice(start, m), hidden, start, at + start, m, b == Blocks - 1 && start + m == n ? last : null);
            }
        }

        cache.Advance(n);
        return last;
    }

    public void Dispose()
    {
        lock (_gate)
        {
            foreach (var s in _loaded.Values)
            {
                s.Dispose();
            }

            _loaded.Clear();
        }

        foreach (var v in _weightValues.Values)
        {
            v.Dispose();
        }

        _scratch?.Dispose();

        try
        {
            Directory.Delete(_dir, recursive: true);
        }
        catch (IOException)
        {
            // A leftover temp folder is harmless.
        }
    }

    private sealed class BlockSession : IDisposable
    {
        private readonly InferenceSession _session;
        private readonly SessionOptions _so;
        private readonly RunOptions _run = new();
        private readonly BlockModel _owner;
        private readonly int _first, _end, _width;
        private readonly bool _isFirst, _isLast;
        private readonly long[] _ids, _pos;
        private readonly float[] _mask, _hiddenIn, _out;
        private readonly float[]?[] _newK, _newV;
        private readonly string[] _inNames, _outNames;
        private readonly OrtValue[] _inputs, _outputs;

        public BlockSession(BlockModel owner, int block, int width)
        {
            _owner = owner;
            var c = owner.Config;
            (_first, _end) = owner.Ranges[block];
            _width = width;
            _isFirst = _first == 0;
            _isLast = _end == c.NumLayers;
            int cap = owner.Capacity;
            string path = Path.Combine(owner._dir, $"b{block}_w{width}.onnx");
            bool lmHead = owner._weights.LmHeadName == "lm_head.weight";
            File.WriteAllBytes(path, LlamaGraphCompiler.CompileBlockBytes(c, new GraphShape(width, cap), _first, _end, lmHead));
            _so = new SessionOptions
            {
                GraphOptimizationLevel = GraphOptimizationLevel.ORT_ENABLE_ALL,
                IntraOpNumThreads = owner._options.IntraOpThreads,
                LogSeverityLevel = OrtLoggingLevel.ORT_LOGGING_LEVEL_ERROR,
            };
            owner._options.ApplyProvider(_so, $"b{block}_w{width}");
            foreach (var (name, value) in owner._weightValues)
            {
                if (Uses(name, c, lmHead))
                {
                    _so.AddInitializer(name, value);
                }
            }

            _session = new InferenceSession(path, _so);
            _ids = GC.AllocateArray<long>(width, pinned: true);
            _pos = GC.AllocateArray<long>(width, pinned: true);
            _mask = GC.AllocateArray<float>(width * (cap + width), pinned: true);
            _hiddenIn = GC.AllocateArray<float>(width * c.HiddenSize, pinned: true);
            _out = GC.AllocateArray<float>(width * (_isLast ? c.VocabSize : c.HiddenSize), pinned: true);
            _newK = new float[c.NumLayers][];
            _newV = new float[c.NumLayers][];
            var inNames = new List<string> { _isFirst ? "input_ids" : LlamaGraphCompiler.HiddenIn, "position_ids", "attention_mask" };
            var outNames = new List<string> { _isLast ? "logits" : LlamaGraphCompiler.HiddenOut };
            long[] kvShape = [1, c.NumKvHeads, width, c.HeadDim];
            var outs = new List<OrtValue> { OrtValue.CreateTensorValueFromMemory(_out, _isLast ? [1, width, c.VocabSize] : [width, c.HiddenSize]) };
            for (int l = _first; l < _end; l++)
            {
                inNames.Add(LlamaGraphCompiler.PastKey(l));
                inNames.Add(LlamaGraphCompiler.PastValue(l));
                outNames.Add(LlamaGraphCompiler.PresentKey(l));
                outNames.Add(LlamaGraphCompiler.PresentValue(l));
                _newK[l] = GC.AllocateArray<float>(c.NumKvHeads * width * c.HeadDim, pinned: true);
                _newV[l] = GC.AllocateArray<float>(c.NumKvHeads * width * c.HeadDim, pinned: true);
                outs.Add(OrtValue.CreateTensorValueFromMemory(_newK[l]!, kvShape));
                outs.Add(OrtValue.CreateTensorValueFromMemory(_newV[l]!, kvShape));
            }

            _inNames = [.. inNames];
            _outNames = [.. outNames];
            _outputs = [.. outs];
            _inputs = new OrtValue[_inNames.Length];
            _inputs[0] = _isFirst ? OrtValue.CreateTensorValueFromMemory(_ids, [1, width]) : OrtValue.CreateTensorValueFromMemory(_hiddenIn, [width, c.HiddenSize]);
            _inputs[1] = OrtValue.CreateTensorValueFromMemory(_pos, [1, width]);
            _inputs[2] = OrtValue.CreateTensorValueFromMemory(_mask, [1, 1, width, cap + width]);
        }

        private bool Uses(string name, ModelConfig c, bool lmHead)
        {
            for (int l = _first; l < _end; l++)
            {
                if (name.StartsWith($"model.layers.{l}.", StringComparison.Ordinal))
                {
                    return true;
                }
            }

            return name switch
            {
                "model.embed_tokens.weight" => _isFirst || (_isLast && !lmHead),
                "model.norm.weight" or "lm_head.weight" => _isLast,
                _ => false,
            };
        }

        /// <summary>One sub-chunk: rows [start, start+m) of the chunk, at cache slot <paramref name="slot"/>.</summary>
        public void RunSub(KvCache cache, ReadOnlySpan<int> tokens, float[] hidden, int start, int slot, int m, float[]? lastLogits)
        {
            var c = _owner.Config;
            int h = c.HiddenSize, w = _width, cap = _owner.Capacity;
            for (int i = 0; i < w; i++)
            {
                _ids[i] = i < m ? tokens[i] : 0;
                _pos[i] = slot + Math.Min(i, m - 1);
            }

            if (!_isFirst)
            {
                Array.Clear(_hiddenIn);
                Array.Copy(hidden, start * h, _hiddenIn, 0, m * h);
            }

            AttentionMask.FillLinear(_mask, w, cap, slot, m);
            for (int l = _first; l < _end; l++)
            {
                _inputs[3 + (2 * (l - _first))] = cache.KeyValue(l);
                _inputs[4 + (2 * (l - _first))] = cache.ValueValue(l);
            }

            _session.Run(_run, _inNames, _inputs, _outNames, _outputs);
            if (_isLast)
            {
                if (lastLogits is not null)
                {
                    _out.AsSpan((m - 1) * c.VocabSize, c.VocabSize).CopyTo(lastLogits);
                }
            }
            else
            {
                Array.Copy(_out, 0, hidden, start * h, m * h);
            }

            cache.WriteLayers(_first, _end, _newK, _newV, w, m, slot);
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

            foreach (var o in _outputs)
            {
                o.Dispose();
            }
        }
    }
}
