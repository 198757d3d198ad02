using System.Diagnostics;
using CoordGen.Engine.Generation;
using CoordGen.Engine.Runtime;

using CoordGen.Messages;

namespace CoordGen.Engine.Speculative;

/// <summary>Which retrieval drafter proposes the main chain.</summary>
public enum DrafterKind
{
    /// <summary>Prompt Lookup Decoding (the reference baseline).</summary>
    Pld,

    /// <summary>Suffix automaton over prompt + output with adaptive draft length.</summary>
    Sam,
}

/// <summary>What a speculative run uses. The named methods of the benchmark are presets.</summary>
public sealed record SpeculationOptions
{
    public DrafterKind Drafter { get; init; } = DrafterKind.Sam;

    /// <summary>Static verification width W (root token plus W - 1 draft nodes).</summary>
    public int Width { get; init; } = 16;

    public bool UseHistory { get; init; }

    public bool UseCalibration { get; init; }

    public bool UseReuse { get; init; }

    /// <summary>
    /// Per step, verify on the compiled width (1 = a plain step, up to <see cref="Width"/>) that gives the
    /// most tokens per millisecond, from this session's recent acceptance and the runtime's recent run
    /// times; an empty draft always takes a plain step. Off: every step runs the full width (the
    /// benchmarks of fixed widths).
    /// </summary>
    public bool AdaptiveWidth { get; init; }

    /// <summary>Adaptive width's cost of one run per width, in ms, when it should not come from the runtime's own timings (a device profile in what-if runs). Null: measured.</summary>
    public Func<int, double>? WidthCostMs { get; init; }

    /// <summary>Add alternate branches (other occurrences, other next tokens) to fill the width.</summary>
    public bool UseTree { get; init; }

    /// <summary>Adaptive length n = min(MaxDraft, 1 + floor(matchLength * Alpha)).</summary>
    public float Alpha { get; init; } = 1.5f;

    public int MaxDraft { get; init; } = 12;

    public CalibrationOptions Calibration { get; init; } = new();

    public static SpeculationOptions ForMethod(string method, int width) => method switch
    {
        "pld" => new() { Drafter = DrafterKind.Pld, Width = width },
        "sam" => new() { Drafter = DrafterKind.Sam, Width = width },
        "sam+history" => new() { Drafter = DrafterKind.Sam, Width = width, UseHistory = true },
        "pld+ours" => new() { Drafter = DrafterKind.Pld, Width = width, UseCalibration = true, UseReuse = true, UseTree = true },
        "sam+ours" => new() { Drafter = DrafterKind.Sam, Width = width, UseCalibration = true, UseReuse = true, UseTree = true },
        _ => throw new ArgumentException($"unknown method '{method}'; use one of ar, pld, sam, sam+history, pld+ours, sam+ours."),
    };

    /// <summary>A request's options: its method at its width, adaptive or not, drafting from a context store when it names one. The device and the drafter derive the same options from the same request.</summary>
    public static SpeculationOptions ForRequest(string method, int width, bool adaptiveWidth, bool hasContext)
    {
        var o = ForMethod(method, width) with { AdaptiveWidth = adaptiveWidth };
        return hasContext ? o with { UseHistory = true } : o;
    }
}

/// <summary>A prompt already in a KV cache, with its last logits and (for calibration) per-position top-k.</summary>
public sealed record Prefilled(int[] Prompt, KvCache Cache, float[] LastLogits, PrefillTopK? TopK, double PrefillMs, double TopKMs) : IDisposable
{
    /// <summary>The calibrator failed during this prefill; generation goes on without calibrated drafts.</summary>
    public bool CalibrationFailed { get; init; }

    /// <summary>The chunks' logits went to a calibrator elsewhere (a calibrator actor); its calibrated paths go to the session's drafter later (<see cref="SessionDrafter.AttachCalibration"/>).</summary>
    public bool CalibrationDeferred { get; init; }

    private bool _adopted;

    /// <summary>Hands the cache to a session that will own it (the caller uses this prefill once); Dispose then leaves it alone.</summary>
    internal KvCache Adopt()
    {
        if (_adopted)
        {
            throw new InvalidOperationException("this prefill's cache was already handed to a session.");
        }

        _adopted = true;
        return Cache;
    }

    public void Dispose()
    {
        if (!_adopted)
        {
            Cache.Dispose();
        }
    }
}

/// <summary>Outcome of one speculative generation.</summary>
public sealed record SpeculativeResult(IReadOnlyList<int> Tokens, GenerationStats Stats, DraftAccounting Accounting, double DraftMs, double CalibrationMs, double DeviceMs)
{
    /// <summary>Each token's log-probabilities when <see cref="SamplingOptions.Logprobs"/> asked for them; otherwise null.</summary>
    public IReadOnlyList<TokenLogprobs>? Logprobs { get; init; }
}

/// <summary>
/// Retrieval-based speculative decoding over the static-width graphs: each step builds a token tree
/// from the drafters, verifies it in one width-W pass, walks the tree with the model's own choices
/// (argmax, or one draw from the sampling distribution per emitted token), commits the accepted
/// path's keys/values into consecutive cache slots and keeps the model's next token as the new root.
/// Every emitted token is the model's own choice given the accepted prefix, so greedy output equals
/// plain greedy decoding and sampling keeps the model's distribution (one draw per token, as plain
/// sampling does, so the same seed gives the same text).
/// </summary>
public sealed class SpeculativeDecoder
{
    private readonly OrtModelRuntime _runtime;
    private readonly Generator _plain;

    public SpeculativeDecoder(OrtModelRuntime runtime)
    {
        _runtime = runtime;
        _plain = new Generator(runtime);
    }

    /// <summary>
    /// Prefills a prompt once (with the per-position top-k that calibration needs); several runs can
    /// then start from it (<see cref="Generate(Prefilled, int, SamplingOptions, IReadOnlySet{int}, SpeculationOptions, HistoryStore?, Func{int, bool}?, CancellationToken)"/>).
    /// </summary>
    public Prefilled Prefill(ReadOnlySpan<int> prompt, CalibrationOptions? calibration)
    {
        var (session, finish) = BeginPrefill(prompt.ToArray(), calibration);
        while (!session.Step())
        {
        }

        return finish();
    }

    /// <summary>
    /// Chunked prefill as steps (with the per-position top-k calibration needs): run <see cref="PrefillSession.Step"/>
    /// until done, then call Finish for the <see cref="Prefilled"/> (which owns the cache).
    /// </summary>
    /// <param name="offload">With calibration: instead of gathering the top-k here, hand each chunk's
    /// top-k rows (a copy the receiver owns) to this calibrator; the result is marked
    /// <see cref="Prefilled.CalibrationDeferred"/>.</param>
    /// <param name="prefix">A cached prefix of <paramref name="prompt"/> (<see cref="PrefixCache.Lookup"/>, with
    /// calibration rows when calibrating): its slots are copied in and only the rest is prefilled; its
    /// calibration rows go first, so calibration sees every prompt position as without the cache.</param>
    public (PrefillSession Session, Func<Prefilled> Finish) BeginPrefill(int[] prompt, CalibrationOptions? calibration, Action<TopRows>? offload = null, PrefixHit? prefix = null)
    {
        var cache = _runtime.CreateCache();
        int cached = prefix?.Tokens ?? 0;
        TopRows? cachedRows;
        try
        {
            if (cached > 0)
            {
                prefix!.CopyInto(cache);
            }

            cachedRows = cached > 0 && calibration is not null ? prefix!.TopRows(calibration.TopK) : null;
        }
        catch
        {
            cache.Dispose();
            throw;
        }

        if (calibration is not null && offload is not null)
        {
            return BeginOffloadedPrefill(cache, prompt, calibration.TopK, offload, cachedRows);
        }

        PrefillTopK? topK = calibration is null ? null : new PrefillTopK(calibration.TopK);
        if (topK is not null && cachedRows is not null)
        {
            topK.Add(cachedRows);
        }

        double topKMs = 0;
        bool failed = false;
        PrefillSession session;
        try
        {
            session = _plain.BeginPrefill(cache, prompt[cached..], topK is null ? null : (b, _, n) =>
            {
                if (failed)
                {
                    return;
                }

                long t0 = Stopwatch.GetTimestamp();
                try
                {
                    _runtime.Faults?.OnCalibrate();
                    topK.AddChunk(b, n);
                }
                catch (Exception ex) when (ex is not OperationCanceledException)
                {
                    failed = true;
                }

                topKMs += Stopwatch.GetElapsedTime(t0).TotalMilliseconds;
            });
        }
        catch
        {
            cache.Dispose();
            throw;
        }

        return (session, () => new Prefilled(prompt, cache, session.LastLogits, failed ? null : topK, session.ElapsedMs, topKMs) { CalibrationFailed = failed });
    }

    private (PrefillSession Session, Func<Prefilled> Finish) BeginOffloadedPrefill(KvCache cache, int[] prompt, int k, Action<TopRows> offload, TopRows? cachedRows)
    {
        double copyMs = 0;
        bool failed = false;
        PrefillSession session;
        try
        {
            if (cachedRows is not null)
            {
                try
                {
                    offload(cachedRows);
                }
                catch (Exception ex) when (ex is not OperationCanceledException)
                {
                    failed = true;
                }
            }

            session = _plain.BeginPrefill(cache, prompt[cache.Length..], (b, _, n) =>
            {
                if (failed)
                {
                    return;
                }

                long t0 = Stopwatch.GetTimestamp();
                try
                {
                    _runtime.Faults?.OnCalibrate();
                    offload(PrefillTopK.RowsOf(b, n, k));
                }
                catch (Exception ex) when (ex is not OperationCanceledException)
                {
                    failed = true;
                }

                copyMs += Stopwatch.GetElapsedTime(t0).TotalMilliseconds;
            });
        }
        catch
        {
            cache.Dispose();
            throw;
        }

        return (session, () => new Prefilled(prompt, cache, session.LastLogits, null, session.ElapsedMs, copyMs) { CalibrationFailed = failed, CalibrationDeferred = !failed });
    }

    public SpeculativeResult Generate(ReadOnlySpan<int> prompt, int maxTokens, SamplingOptions sampling, IReadOnlySet<int> stopTokens,
        SpeculationOptions spec, HistoryStore? history = null, Func<int, bool>? onToken = null, CancellationToken cancellation = default)
    {
        using var pre = Prefill(prompt, spec.UseCalibration ? spec.Calibration : null);
        return Generate(pre, maxTokens, sampling, stopTokens, spec, history, onToken, cancellation);
    }

    public SpeculativeResult Generate(Prefilled pre, int maxTokens, SamplingOptions sampling, IReadOnlySet<int> stopTokens,
        SpeculationOptions spec, HistoryStore? history = null, Func<int, bool>? onToken = null, CancellationToken cancellation = default)
    {
        using var session = Start(pre, maxTokens, sampling, stopTokens, spec, history, onToken);
        while (!session.Step(cancellation))
        {
        }

        return session.Result();
    }

    /// <summary>A generation from a prefilled prompt as steps, for schedulers that interleave sessions.</summary>
    /// <param name="adoptCache">The session takes <paramref name="pre"/>'s cache instead of copying it (a few
    /// milliseconds for a long prompt, on the device's critical path); only for a prefill started once.</param>
    /// <param name="onLogprobs">Called with each emitted token's log-probabilities just before <paramref name="onToken"/> (when <see cref="SamplingOptions.Logprobs"/> asks for them).</param>
    /// <param name="externalDrafter">The session's trees come from a drafter elsewhere (<see cref="SpeculativeSession.Offer"/>): it builds no draft state of its own.</param>
    public SpeculativeSession Start(Prefilled pre, int maxTokens, SamplingOptions sampling, IReadOnlySet<int> stopTokens,
        SpeculationOptions spec, HistoryStore? history = null, Func<int, bool>? onToken = null, bool adoptCache = false, Action<TokenLogprobs>? onLogprobs = null, bool externalDrafter = false) =>
        new(_runtime, _plain, pre, maxTokens, sampling, stopTokens, spec, history, onToken, adoptCache, onLogprobs, externalDrafter) { SharedAcceptance = _acceptance, SharedNodeAcceptance = _nodeAcceptance };

    private readonly AcceptanceMemory _acceptance = new();
    private readonly NodeAcceptance _nodeAcceptance = new();

    internal static void BuildTree(SpeculationOptions spec, List<int> sequence, DraftSources sources, DraftCursors cursors,
        List<int[]> branches, DraftTree tree, Span<int> draft, List<int> chainNodes, bool chainTrusted)
    {
        var (sam, calibrated, history, reuse, ngrams, consensus) = sources;
        var (samCursor, calCursor, histCursor) = cursors;

        // 1. The main chain from the chosen drafter.
        int n;
        if (spec.Drafter == DrafterKind.Pld)
        {
            n = PromptLookup.Draft(sequence, draft);
        }
        else if (consensus is not null)
        {
            // Trees: what the occurrences of the sequence's end agree on, as long as the width allows.
            n = samCursor.Length == 0 ? 0 : consensus.Draft(sequence, Math.Min(spec.MaxDraft, tree.Capacity), draft);
        }
        else
        {
            n = samCursor.Length == 0 ? 0 : sam.Continuation(samCursor, Math.Min(AdaptiveLength(spec, samCursor), tree.Capacity), draft);
        }

        // With other sources on, the main chain first takes at most ~60% of the width; it gets the rest
        // back at the end (AddPath continues a shared prefix), after the other sources had their turn.
        bool others = spec.UseCalibration || spec.UseReuse || spec.UseTree || spec.UseHistory;
        int first = others && !chainTrusted ? Math.Max(2, tree.Capacity - ((tree.Capacity * 2) / 5)) : n;
        var mainChain = draft[..n].ToArray();
        tree.AddPath(mainChain.AsSpan(0, Math.Min(n, first)), DraftSource.Prompt);
        for (int i = 0, at = -1; i < Math.Min(n, first); i++)
        {
            at = tree.Child(at, draft[i]);
            if (at < 0)
            {
                break;
            }

            chainNodes.Add(at);
        }

        // 1b. With prompt lookup as the main chain, the consensus chain comes right after it.
        if (spec.Drafter == DrafterKind.Pld && consensus is not null && samCursor.Length > 0)
        {
            int m = consensus.Draft(sequence, Math.Min(spec.MaxDraft, tree.Capacity), draft);
            tree.AddPath(draft[..m], DraftSource.Prompt);
        }

        // 2. The calibrated index: the model's own likely continuation of what the output ends with.
        if (calibrated is not null && calCursor.Length > 0)
        {
            int m = calibrated.Automaton.Continuation(calCursor, Math.Min(spec.MaxDraft, tree.Capacity), draft);
            tree.AddPath(draft[..m], DraftSource.Calibrated);
        }

        // 3. Past responses of the same task.
        if (history is not null && spec.UseHistory && histCursor.Length > 0)
        {
            foreach (var path in history.Continuations(histCursor, spec.UseTree ? 2 : 1, spec.MaxDraft))
            {
                tree.AddPath(path, DraftSource.History);
            }
        }

        // 4. Other occurrences of the last bigram: their distinct continuations, most recent first.
        if (ngrams is not null)
        {
            Span<int> firsts = stackalloc int[4];
            ngrams.Continuations(4, Math.Max(2, tree.Capacity / 4), firsts, branches);
            foreach (var b in branches)
            {
                tree.AddPath(b, DraftSource.Prompt);
            }
        }

        // 5. The main chain's remainder.
        if (n > first)
        {
            tree.AddPath(mainChain, DraftSource.Prompt);
            chainNodes.Clear();
            for (int i = 0, at = -1; i < n; i++)
            {
                at = tree.Child(at, mainChain[i]);
                if (at < 0)
                {
                    break;
                }

                chainNodes.Add(at);
            }
        }

        // 6. Alternates: continuations of shorter matches (other occurrences) fill the remaining width.
        if (spec.UseTree && samCursor.Length > 0)
        {
            // With prompt lookup as the main chain, the automaton's longest-match continuation is a branch too.
            if (spec.Drafter == DrafterKind.Pld)
            {
                int m = sam.Continuation(samCursor, Math.Min(AdaptiveLength(spec, samCursor), tree.Capacity), draft);
                tree.AddPath(draft[..m], DraftSource.Prompt);
            }

            AddShorterMatches(sam, samCursor, tree, draft, DraftSource.Prompt);
            AddOtherContinuations(sam, samCursor.State, samCursor.Length, except: -1, from: -1, maxLength: 6, tree, draft);

            // 7. Branches at the chain's likely rejection points: where the context went on from a prefix of
            // the chain with another token, that continuation, hanging from the chain node it follows.
            int state = samCursor.State, length = samCursor.Length;
            for (int i = 0; i + 1 < chainNodes.Count && tree.Count < tree.Capacity; i++)
            {
                if (!sam.TryNext(state, tree.Token(chainNodes[i]), out state))
                {
                    break;
                }

                length++;
                AddOtherContinuations(sam, state, length, except: tree.Token(chainNodes[i + 1]), from: chainNodes[i], maxLength: 5, tree, draft);
            }
        }

        // 8. Width left over: the calibrated index's continuations of shorter matches too.
        if (spec.UseTree && calibrated is not null && calCursor.Length > 0)
        {
            AddShorterMatches(calibrated.Automaton, calCursor, tree, draft, DraftSource.Calibrated);
        }

        // 9. Width left over: copies that resume after a one-token edit (the model put its own word in place of the
        // context's, added one or dropped one), so drafting picks the passage up again at the very next step.
        if (ngrams is not null && tree.Count < tree.Capacity)
        {
            ngrams.EditContinuations(2, Math.Max(2, tree.Capacity / 4), branches);
            foreach (var b in branches)
            {
                tree.AddPath(b, DraftSource.Prompt);
            }
        }

        // 10. Width still left: the reused segment from earlier rejections (paper §3.4).
        if (reuse is not null && reuse.Offer().Length > 0)
        {
            tree.AddPath(reuse.Offer(), DraftSource.Reused);
        }
    }

    // The paper's adaptive draft length: n = min(max, 1 + floor(match length * alpha)).
    private static int AdaptiveLength(SpeculationOptions spec, MatchCursor cursor) => Math.Min(spec.MaxDraft, 1 + (int)(cursor.Length * spec.Alpha));

    // Continuations (up to 6 tokens) of the cursor's shorter matches, i.e. other occurrences of its suffixes: at most 4.
    private static void AddShorterMatches(SuffixAutomaton sa, MatchCursor cursor, DraftTree tree, Span<int> draft, DraftSource source)
    {
        var c = cursor;
        for (int k = 0; k < 4 && tree.Count < tree.Capacity; k++)
        {
            int link = sa.Link(c.State);
            if (link <= 0)
            {
                break;
            }

            c = new MatchCursor(link, sa.StateLength(link));
            int m = sa.Continuation(c, Math.Min(6, tree.Capacity), draft);
            tree.AddPath(draft[..m], source);
        }
    }

    // Every token the context followed this state with (but except), each with its continuation, up to maxLength tokens, under node from.
    private static void AddOtherContinuations(SuffixAutomaton sam, int state, int length, int except, int from, int maxLength, DraftTree tree, Span<int> draft)
    {
        foreach (int t in sam.OutTokens(state))
        {
            if (tree.Count >= tree.Capacity)
            {
                break;
            }

            if (t >= 0 && t != except && sam.TryNext(state, t, out int s))
            {
                draft[0] = t;
                int m = sam.Continuation(new MatchCursor(s, length + 1), Math.Min(maxLength - 1, tree.Capacity), draft[1..]);
                tree.AddPath(draft[..(m + 1)], DraftSource.Prompt, from);
            }
        }
    }

    // Eq. 3 on the main chain: predictions at each chain row, the first mismatch, the longest agreeing run after it.
    internal static void ObserveReuse(DraftReuse reuse, DraftTree tree, List<int> chainNodes, ReadOnlySpan<int> rowArgmax, Span<int> scratch)
    {
        int n = chainNodes.Count;
        if (n == 0)
        {
            return;
        }

        Span<int> chain = scratch[..n];
        Span<int> predicted = stackalloc int[n];
        for (int i = 0; i < n; i++)
        {
            chain[i] = tree.Token(chainNodes[i]);
            int row = i == 0 ? 0 : chainNodes[i - 1] + 1;
            predicted[i] = rowArgmax[row];
        }

        int e = 0;
        while (e < n && chain[e] == predicted[e])
        {
            e++;
        }

        if (e < n)
        {
            reuse.Observe(chain, predicted, e);
        }
    }
}

/// <summary>
/// Accepted draft tokens of the last verification steps of every session of one decoder: the prior an
/// adaptive-width session uses before it has seen enough steps of its own (short answers would
/// otherwise spend their whole life warming up at the full width). Thread-safe.
/// </summary>
public sealed class AcceptanceMemory
{
    private readonly int[] _ring = new int[64];
    private int _count;

    public void Add(int accepted)
    {
        lock (_ring)
        {
            _ring[_count++ % _ring.Length] = accepted;
        }
    }

    /// <summary>Copies up to <paramref name="dest"/>.Length recent observations; returns how many.</summary>
    public int Recent(Span<int> dest)
    {
        lock (_ring)
        {
            int n = Math.Min(Math.Min(_count, _ring.Length), dest.Length);
            for (int i = 0; i < n; i++)
            {
                dest[i] = _ring[(_count - 1 - i) % _ring.Length]; // newest first; i < n <= _count
            }

            return n;
        }
    }
}
