using System.Diagnostics;
using CoordGen.Engine.Runtime;

namespace CoordGen.Engine.Generation;

/// <summary>Timings of one generation, for tokens/s reports and the engine-overhead bar.</summary>
public sealed record GenerationStats
{
    public int PromptTokens { get; init; }
    public int GeneratedTokens { get; init; }
    public double PrefillMs { get; init; }
    public double DecodeMs { get; init; }

    /// <summary>Time spent inside ONNX Runtime's Run for decode steps (the bare graph cost).</summary>
    public double DecodeRunMs { get; init; }
    public string StopReason { get; init; } = "";

    public double PrefillTokensPerSecond => PrefillMs > 0 ? PromptTokens / (PrefillMs / 1000) : 0;
    public double DecodeTokensPerSecond => DecodeMs > 0 ? GeneratedTokens / (DecodeMs / 1000) : 0;
}

public sealed record GenerationResult(IReadOnlyList<int> Tokens, GenerationStats Stats)
{
    /// <summary>Each token's log-probabilities when <see cref="SamplingOptions.Logprobs"/> asked for them; otherwise null.</summary>
    public IReadOnlyList<TokenLogprobs>? Logprobs { get; init; }
}

/// <summary>
/// Plain autoregressive generation over the static graphs: chunked prefill at the widest compiled
/// width, then one token per step at width 1. This is the baseline every speculative method must
/// reproduce token for token under greedy decoding.
/// </summary>
public sealed class Generator
{
    private readonly OrtModelRuntime _runtime;

    public Generator(OrtModelRuntime runtime, int decodeWidth = 1)
    {
        _runtime = runtime;
        DecodeWidth = decodeWidth;
        PrefillWidth = runtime.Widths.Max();
        if (!runtime.Widths.Contains(decodeWidth))
        {
            throw new ArgumentException($"the runtime has no width-{decodeWidth} graph for decoding");
        }
    }

    public int PrefillWidth { get; }

    public int DecodeWidth { get; }

    internal OrtModelRuntime Runtime => _runtime;

    /// <summary>
    /// Prefills <paramref name="tokens"/> into <paramref name="cache"/> in chunks and returns the logits
    /// of the last prompt token. <paramref name="onChunk"/> sees every chunk's buffers (calibration reads
    /// all rows' logits from there).
    /// </summary>
    public float[] Prefill(KvCache cache, ReadOnlySpan<int> tokens, Action<StepBuffers, int, int>? onChunk = null)
    {
        var session = BeginPrefill(cache, tokens.ToArray(), onChunk);
        while (!session.Step())
        {
        }

        return session.LastLogits;
    }

    /// <summary>One width-1 step: feeds <paramref name="token"/>, commits it, returns the next-token logits.</summary>
    public ReadOnlySpan<float> Step(KvCache cache, int token)
    {
        var buf = _runtime.Buffers(DecodeWidth, cache);
        buf.SetLinear([token], cache.Length, cache.Length);
        _runtime.Run(DecodeWidth, cache);
        cache.Commit(buf.NewKeys, buf.NewValues, DecodeWidth, [0]);
        return buf.LogitsRow(0);
    }

    /// <summary>Generates up to <paramref name="maxTokens"/> tokens after the prompt, calling <paramref name="onToken"/> for each.</summary>
    public GenerationResult Generate(ReadOnlySpan<int> prompt, int maxTokens, SamplingOptions sampling, IReadOnlySet<int> stopTokens,
        Func<int, bool>? onToken = null, CancellationToken cancellation = default)
    {
        if (maxTokens < 1)
        {
            throw new ArgumentOutOfRangeException(nameof(maxTokens), $"max tokens must be at least 1 (got {maxTokens}).");
        }

        using var cache = _runtime.CreateCache();
        var sw = Stopwatch.StartNew();
        float[] logits = Prefill(cache, prompt);
        return Decode(cache, logits, prompt.Length, sw.Elapsed.TotalMilliseconds, maxTokens, sampling, stopTokens, onToken, cancellation);
    }

    /// <summary>
    /// Chunked prefill as steps: each <see cref="PrefillSession.Step"/> runs one chunk, so a scheduler can
    /// interleave prefill chunks with other sessions' decode steps. <paramref name="onChunk"/> as in <see cref="Prefill"/>.
    /// </summary>
    public PrefillSession BeginPrefill(KvCache cache, int[] tokens, Action<StepBuffers, int, int>? onChunk = null)
    {
        if (tokens.Length == 0)
        {
            throw new ArgumentException("the prompt is empty: give at least one token.");
        }

        if (cache.Length + tokens.Length >= cache.Capacity)
        {
            // A cached prefix already in the cache counts as prompt: the error names the whole prompt.
            throw new PromptTooLongException(cache.Length + tokens.Length, cache.Capacity - 1);
        }

        return new PrefillSession(this, _runtime, cache, tokens, onChunk);
    }

    /// <summary>Plain decoding as steps (one token per <see cref="PlainSession.Step"/>); owns <paramref name="cache"/>.</summary>
    /// <param name="onLogprobs">Called with each emitted token's log-probabilities just before <paramref name="onToken"/> (when <see cref="SamplingOptions.Logprobs"/> asks for them).</param>
    public PlainSession StartDecode(KvCache cache, float[] logits, int promptTokens, double prefillMs, int maxTokens, SamplingOptions sampling,
        IReadOnlySet<int> stopTokens, Func<int, bool>? onToken = null, Action<TokenLogprobs>? onLogprobs = null) =>
        new(this, cache, logits, promptTokens, prefillMs, maxTokens, sampling, stopTokens, onToken, onLogprobs);

    /// <summary>Decodes from a prefilled cache (consumed) whose last prompt logits are <paramref name="logits"/>.</summary>
    public GenerationResult Decode(KvCache cache, float[] logits, int promptTokens, double prefillMs, int maxTokens, SamplingOptions sampling,
        IReadOnlySet<int> stopTokens, Func<int, bool>? onToken = null, CancellationToken cancellation = default)
    {
        cancellation.ThrowIfCancellationRequested();

        // Not disposed here: the cache stays the caller's.
        var session = new PlainSession(this, cache, logits, promptTokens, prefillMs, maxTokens, sampling, stopTokens, onToken, null);
        while (!session.Done)
        {
            cancellation.ThrowIfCancellationRequested();
            session.Step();
        }

        return session.Result();
    }
}

/// <summary>One prompt's chunked prefill, a chunk per step.</summary>
public sealed class PrefillSession
{
    private readonly Generator _gen;
    private readonly OrtModelRuntime _runtime;
    private readonly KvCache _cache;
    private readonly int[] _tokens;
    private readonly Action<StepBuffers, int, int>? _onChunk;
    private readonly Stopwatch _clock = new();
    private int _next;

    internal PrefillSession(Generator gen, OrtModelRuntime runtime, KvCache cache, int[] tokens, Action<StepBuffers, int, int>? onChunk)
    {
        _gen = gen;
        _runtime = runtime;
        _cache = cache;
        _tokens = tokens;
        _onChunk = onChunk;
        LastLogits = new float[runtime.Config.VocabSize];
    }

    public bool Done => _next >= _tokens.Length;

    public int Remaining => _tokens.Length - _next;

    /// <summary>Logits after the last prompt token (valid once <see cref="Done"/>).</summary>
    public float[] LastLogits { get; }

    /// <summary>Device time spent so far (of mixed runs, what the riders were not charged).</summary>
    public double ElapsedMs => _clock.Elapsed.TotalMilliseconds - _ridersMs;

    // Of the mixed runs' time, what their riders were charged.
    private double _ridersMs;

    /// <summary>The cache the prompt goes into.</summary>
    public KvCache Cache => _cache;

    /// <summary>Of the last <see cref="Step"/>'s time, what its riders are charged (0 without riders).</summary>
    public double LastRidersMs { get; private set; }

    /// <summary>
    /// Runs the next chunk, <paramref name="width"/> tokens wide (0 = the generator's prefill width; a
    /// scheduler narrows it while other sessions decode); returns <see cref="Done"/>. With
    /// <paramref name="riders"/>, other sessions' width-1 steps share the chunk's run (a mixed graph, decision
    /// 0026; the caller checked <see cref="OrtModelRuntime.CanMix"/>): the chunk is <paramref name="width"/> rows,
    /// padded when fewer tokens are left, and each rider's step is taken exactly as in
    /// <see cref="NarrowSteps.RunPacked"/>.
    /// </summary>
    public bool Step(int width = 0, IReadOnlyList<INarrowStep>? riders = null) =>
        Step(width, riders is { Count: > 0 } ? new NarrowRiders(_runtime, riders) : null);

    /// <summary>
    /// Runs the next chunk, <paramref name="width"/> tokens wide (0 = the generator's prefill width); returns
    /// <see cref="Done"/>. With <paramref name="riders"/>, other sessions' steps share the chunk's run (a mixed graph
    /// whose other slots hold <see cref="IChunkRiders.Width"/> rows each: width-1 steps, decision 0026, or trees, decision
    /// 0029); when the runtime cannot mix (nothing left to prefill, no room for the padded chunk, the graph not compiled),
    /// the chunk runs alone and the riders in a packed run of their own, so every rider still takes its step.
    /// </summary>
    public bool Step(int width, IChunkRiders? riders)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(width);
        LastRidersMs = 0;
        if (riders is not null)
        {
            int mw = width > 0 ? width : _gen.PrefillWidth;
            if (!Done && _runtime.CanMix(mw, _cache, riders.Caches.Count, riders.Width))
            {
                return StepMixed(mw, riders);
            }

            bool done = Step(width, (IChunkRiders?)null);
            long r0 = Stopwatch.GetTimestamp();
            riders.RunPacked();
            LastRidersMs = Stopwatch.GetElapsedTime(r0).TotalMilliseconds;
            return done;
        }

        if (Done)
        {
            return true;
        }

        _clock.Start();
        int w = width > 0 ? width : _gen.PrefillWidth, left = _tokens.Length - _next;
        if (left < w)
        {
            // The last chunk runs on the narrowest graph that holds it, not padded out to the chunk width
            // (a prompt's tail after a cached prefix is often a few dozen tokens).
            w = _runtime.Widths.Where(x => x >= left && x < w).DefaultIfEmpty(w).Min();
        }

        int n = Math.Min(w, left);
        var buf = _runtime.Buffers(w, _cache);
        buf.SetLinear(_tokens.AsSpan(_next, n), _cache.Length, _cache.Length);
        _runtime.Run(w, _cache);
        _onChunk?.Invoke(buf, _next, n);
        Span<int> rows = stackalloc int[n];
        for (int i = 0; i < n; i++)
        {
            rows[i] = i;
        }

        _cache.Commit(buf.NewKeys, buf.NewValues, w, rows);
        _next += n;
        if (Done)
        {
            buf.LogitsRow(n - 1).CopyTo(LastLogits);
        }

        _clock.Stop();
        return Done;
    }

    // One run of the chunk (slot 0) and the riders' slots: each rider's rows are in its cache after it (in place).
    private bool StepMixed(int w, IChunkRiders riders)
    {
        long begin = Stopwatch.GetTimestamp();
        _clock.Start();
        int n = Math.Min(w, _tokens.Length - _next), count = riders.Caches.Count, riderWidth = riders.Width;
        var buffers = _runtime.MixedBuffers(w, _cache, riders.Caches, riderWidth);
        var buf = buffers[0];
        buf.SetLinear(_tokens.AsSpan(_next, n), _cache.Length, _cache.Length);
        var riderBuffers = buffers.Skip(1).ToArray();
        riders.Fill(riderBuffers);

        long t0 = Stopwatch.GetTimestamp();
        _runtime.RunMixed(w, _cache, riders.Caches, riderWidth);
        double runMs = Stopwatch.GetElapsedTime(t0).TotalMilliseconds;

        // The run wrote every slot's rows into its cache: the chunk's real rows are kept (its padding lies past
        // the length, overwritten later); a width-1 rider keeps its one row, a tree's rows stay staged past its length.
        _onChunk?.Invoke(buf, _next, n);
        _cache.Advance(n);
        _next += n;
        if (Done)
        {
            buf.LogitsRow(n - 1).CopyTo(LastLogits);
        }

        // What the riders cost of some time: its part beyond the chunk alone (the chunk width's recent solo run in this
        // bucket), or, before that is known, the riders' share of the rows.
        double? alone = _runtime.RecentRunMs(w, _cache.Bucket);
        double Charge(double ms) => alone is { } a ? Math.Clamp(ms - a, 0, ms) : ms * count * riderWidth / (w + (count * riderWidth));
        riders.Finish(riderBuffers, staged: true, Charge(runMs) / count);
        _clock.Stop();

        // Of the whole step's time, the host's work for the riders included, the riders are charged their part (the
        // timeline's decode time); the rest stays in this prefill's time.
        double stepMs = Stopwatch.GetElapsedTime(begin).TotalMilliseconds;
        LastRidersMs = Charge(stepMs);
        _ridersMs += LastRidersMs;
        _runtime.RecordMixedStep(count, w, stepMs, riderWidth);
        return Done;
    }
}

/// <summary>
/// Other sessions' steps taken for one run, each in its own slot of <see cref="Width"/> rows: riding in a prefill chunk's
/// run (<see cref="PrefillSession.Step(int, IChunkRiders)"/>), or in a packed run of their own. Width-1 steps
/// (<see cref="NarrowRiders"/>) or speculative sessions' trees (<c>SpeculativeSession.PackedTrees</c>).
/// </summary>
public interface IChunkRiders
{
    /// <summary>Rows of each rider's slot.</summary>
    int Width { get; }

    /// <summary>Each rider's cache, in slot order.</summary>
    IReadOnlyList<KvCache> Caches { get; }

    /// <summary>Fills each rider's rows into its slot's buffers.</summary>
    void Fill(IReadOnlyList<StepBuffers> buffers);

    /// <summary>After the run: each rider's results (its rows already in its cache when <paramref name="staged"/>), and its share of the run's milliseconds.</summary>
    void Finish(IReadOnlyList<StepBuffers> buffers, bool staged, double shareMs);

    /// <summary>The riders' steps in a packed run of their own.</summary>
    void RunPacked();
}

/// <summary>Width-1 steps riding in a chunk's run (decision 0026): each feeds its token and commits its one row.</summary>
public sealed class NarrowRiders(OrtModelRuntime runtime, IReadOnlyList<INarrowStep> steps) : IChunkRiders
{
    private readonly KvCache[] _caches = [.. steps.Select(x => x.NarrowCache)];

    public int Width => 1;

    public IReadOnlyList<KvCache> Caches => _caches;

    public void Fill(IReadOnlyList<StepBuffers> buffers)
    {
        for (int i = 0; i < steps.Count; i++)
        {
            buffers[i].SetLinear([steps[i].NarrowToken], _caches[i].Length, _caches[i].Length);
        }
    }

    public void Finish(IReadOnlyList<StepBuffers> buffers, bool staged, double shareMs)
    {
        for (int i = 0; i < steps.Count; i++)
        {
            if (staged)
            {
                _caches[i].Advance(1);
            }
            else
            {
                _caches[i].Commit(buffers[i].NewKeys, buffers[i].NewValues, 1, [0]);
            }

            steps[i].FinishNarrow(buffers[i].LogitsRow(0), shareMs);
        }
    }

    public void RunPacked() => NarrowSteps.RunPacked(runtime, steps);
}

/// <summary>
/// One width-1 step of some session that can ride in a packed run beside others: a plain session's next
/// token, or a speculative session's step that verifies its root alone (<see cref="NarrowSteps.RunPacked"/>).
/// </summary>
public interface INarrowStep
{
    /// <summary>The session's cache: the step's row is committed at its end.</summary>
    KvCache NarrowCache { get; }

    /// <summary>The token the step feeds.</summary>
    int NarrowToken { get; }

    /// <summary>The step ran: its row's logits (valid during the call) and this session's share of the run's milliseconds.</summary>
    void FinishNarrow(ReadOnlySpan<float> logits, double shareMs);
}

/// <summary>Packed width-1 runs over several sessions' caches, each in its own slot.</summary>
public static class NarrowSteps
{
    /// <summary>
    /// Runs every step in packed width-1 runs (up to <see cref="OrtModelRuntime.PackedSlotCounts"/>' largest per
    /// run): each feeds its token in its own slot against its own cache, commits the row, and finishes with its
    /// logits, exactly as the same step alone would.
    /// </summary>
    public static void RunPacked(OrtModelRuntime runtime, IReadOnlyList<INarrowStep> steps)
    {
        ArgumentNullException.ThrowIfNull(steps);
        foreach (var group in steps.Chunk(OrtModelRuntime.PackedSlotCounts[^1]))
        {
            long begin = Stopwatch.GetTimestamp();
            var riders = new NarrowRiders(runtime, group);
            var buffers = runtime.PackedBuffers(1, riders.Caches);
            riders.Fill(buffers);
            long t0 = Stopwatch.GetTimestamp();
            bool inPlace = runtime.RunPacked(1, riders.Caches); // true: the run wrote each row into its cache
            riders.Finish(buffers, inPlace, Stopwatch.GetElapsedTime(t0).TotalMilliseconds / group.Length);
            if (group.Length > 1)
            {
                runtime.RecordPackedStep(group.Length, riders.Caches.Max(c => c.Bucket), Stopwatch.GetElapsedTime(begin).TotalMilliseconds);
            }
        }
    }
}

/// <summary>Plain decoding, one token per step; disposes its cache.</summary>
public sealed class PlainSession : IDisposable, INarrowStep
{
    private readonly Generator _gen;
    private readonly KvCache _cache;
    private readonly float[] _logits;
    private readonly Sampler _sampler;
    private readonly IReadOnlySet<int> _stops;
    private readonly Func<int, bool>? _onToken;
    private readonly Action<TokenLogprobs>? _onLogprobs;
    private readonly List<TokenLogprobs>? _logprobs;
    private readonly int _maxTokens;
    private readonly int _promptTokens;
    private readonly double _prefillMs;
    private readonly List<int> _output = [];
    private readonly Stopwatch _clock = Stopwatch.StartNew();
    private double _runMs;
    private string _reason = "length";

    internal PlainSession(Generator gen, KvCache cache, float[] logits, int promptTokens, double prefillMs, int maxTokens, SamplingOptions sampling,
        IReadOnlySet<int> stopTokens, Func<int, bool>? onToken, Action<TokenLogprobs>? onLogprobs)
    {
        if (maxTokens < 1)
        {
            throw new ArgumentOutOfRangeException(nameof(maxTokens), $"max tokens must be at least 1 (got {maxTokens}).");
        }

        _gen = gen;
        _cache = cache;
        _logits = (float[])logits.Clone();
        _sampler = new Sampler(sampling);
        _stops = stopTokens;
        _onToken = onToken;
        _onLogprobs = onLogprobs;
        _logprobs = sampling.Logprobs is null ? null : [];
        _maxTokens = maxTokens;
        _promptTokens = promptTokens;
        _prefillMs = prefillMs;
        Done = Choose();
    }

    public bool Done { get; private set; }

    public IReadOnlyList<int> Output => _output;

    /// <summary>Each output token's log-probabilities, when <see cref="SamplingOptions.Logprobs"/> asked for them; otherwise null.</summary>
    public IReadOnlyList<TokenLogprobs>? Logprobs => _logprobs;

    /// <summary>The KV bucket its next step runs in (a packed step runs in the largest of its sessions').</summary>
    public int NextStepBucket => _cache.BucketFor(Math.Min(_cache.Length + 1, _cache.Capacity));

    /// <summary>Feeds the last chosen token, then chooses the next. Returns <see cref="Done"/>.</summary>
    public bool Step()
    {
        if (Done)
        {
            return true;
        }

        long t0 = Stopwatch.GetTimestamp();
        _gen.Step(_cache, _output[^1]).CopyTo(_logits);
        _runMs += Stopwatch.GetElapsedTime(t0).TotalMilliseconds;
        Done = Choose();
        return Done;
    }

    /// <summary>
    /// One decode step for each unfinished session of <paramref name="sessions"/>, as packed device runs
    /// (up to <see cref="OrtModelRuntime.PackedSlotCounts"/>' largest per run): every session feeds its last
    /// token in its own slot, against its own cache, and chooses its next token exactly as <see cref="Step"/>
    /// would. Each session's run time is its share of the packed runs. Returns the sessions still going.
    /// </summary>
    public static int StepPacked(IReadOnlyList<PlainSession> sessions)
    {
        ArgumentNullException.ThrowIfNull(sessions);
        var live = sessions.Where(x => !x.Done).ToList();
        if (live.Count > 0)
        {
            var runtime = live[0]._gen.Runtime;
            if (live.Any(x => x._gen.Runtime != runtime))
            {
                throw new ArgumentException("packed sessions must share one runtime.");
            }

            NarrowSteps.RunPacked(runtime, live);
        }

        return sessions.Count(x => !x.Done);
    }

    KvCache INarrowStep.NarrowCache => _cache;

    int INarrowStep.NarrowToken => _output[^1];

    void INarrowStep.FinishNarrow(ReadOnlySpan<float> logits, double shareMs)
    {
        logits.CopyTo(_logits);
        _runMs += shareMs;
        Done = Choose();
    }

    public GenerationResult Result() => new(_output, new GenerationStats
    {
        PromptTokens = _promptTokens,
        GeneratedTokens = _output.Count,
        PrefillMs = _prefillMs,
        DecodeMs = _clock.Elapsed.TotalMilliseconds,
        DecodeRunMs = _runMs,
        StopReason = _reason,
    })
    { Logprobs = _logprobs };

    public void Dispose() => _cache.Dispose();

    // Chooses and emits the next token; true when generation ends here.
    private bool Choose()
    {
        int next = _sampler.Next(_logits);
        if (_stops.Contains(next))
        {
            _reason = "stop";
            return true;
        }

        _output.Add(next);
        if (_logprobs is not null)
        {
            var lp = TokenLogprobs.Of(_logits, next, _sampler.Options.Logprobs!.Value);
            _logprobs.Add(lp);
            _onLogprobs?.Invoke(lp);
        }

        if (_onToken is not null && !_onToken(next))
        {
            _reason = "stop";
            return true;
        }

        if (_output.Count >= _maxTokens)
        {
            return true;
        }

        if (_cache.Length + 1 >= _cache.Capacity)
        {
            _reason = "capacity";
            return true;
        }

        return false;
    }
}

/// <summary>The prompt does not fit the KV capacity; the message says by how much.</summary>
public sealed class PromptTooLongException(int promptTokens, int room)
    : Exception($"The prompt has {promptTokens} tokens but the KV cache has room for {room}. Shorten the prompt or context, or start with a larger --capacity.")
{
    public int PromptTokens { get; } = promptTokens;

    public int Room { get; } = room;
}
