using System.Diagnostics;
using CoordGen.Engine.Generation;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Speculative;
using CoordGen.Messages;
using static CoordGen.Messages.GenerationProtocol;

namespace CoordGen.Actors.Device;

/// <summary>
/// The prefill phase of one run on the device, off the mailbox thread like every step: a prefix-cache
/// lookup (a hit is copied into the run's new cache), the rest of the prompt chunk by chunk (a speculative
/// run's calibration rows go to the calibrator as each chunk ends), then the prompt's whole blocks into
/// the prefix cache before decoding writes past them. The run's <see cref="DeviceSession"/> owns it.
/// </summary>
internal sealed class SessionPrefill(SessionRun id, DeviceProtocol.RunRequest request, SpeculationOptions? options, DeviceRoles roles) : IDisposable
{
    private PrefillSession? _prefill;
    private Func<Prefilled>? _finish;
    private KvCache? _plainCache;

    // The calibration rows of the prompt's positions, kept for the prefix cache (null when not calibrating).
    private List<TopRows>? _promptRows;

    /// <summary>Prompt tokens not prefilled yet.</summary>
    public int Remaining => _prefill?.Remaining ?? request.Prompt.Count;

    /// <summary>Prompt tokens whose keys and values came from the prefix cache (known after the first step).</summary>
    public int CachedTokens { get; private set; }

    /// <summary>
    /// One prefill chunk of up to <paramref name="chunkWidth"/> tokens (0 = the widest graph); the first
    /// looks the prompt up in <paramref name="prefix"/> and begins. <paramref name="room"/>: the bytes the
    /// prefix cache may hold meanwhile. <paramref name="riders"/>: other sessions' steps (width-1 steps or trees) that
    /// share the chunk's run (<see cref="PrefillSession.Step(int, IChunkRiders)"/>). True when the whole prompt is in the cache.
    /// </summary>
    public bool Step(OrtModelRuntime runtime, Generator plain, SpeculativeDecoder spec, PrefixCache? prefix, int chunkWidth, long room, IChunkRiders? riders = null)
    {
        Open(runtime, plain, spec, prefix, room);
        return _prefill!.Step(chunkWidth, riders);
    }

    /// <summary>Begins the prefill if it has not begun: looks the prompt up in <paramref name="prefix"/> and copies a hit into the run's new cache.</summary>
    public void Open(OrtModelRuntime runtime, Generator plain, SpeculativeDecoder spec, PrefixCache? prefix, long room)
    {
        if (_prefill is null)
        {
            Begin(runtime, plain, spec, prefix, room);
        }
    }

    /// <summary>Of the last step's time, what its riders are charged (<see cref="PrefillSession.LastRidersMs"/>).</summary>
    public double LastRidersMs => _prefill?.LastRidersMs ?? 0;

    private void Begin(OrtModelRuntime runtime, Generator plain, SpeculativeDecoder spec, PrefixCache? prefix, long room)
    {
        int[] prompt = [.. request.Prompt.Tokens];
        bool calibrating = options is { UseCalibration: true };

        // Look up first (it marks the chain used), copy the hit into the new cache (below), and only then
        // yield the room this session's cache takes: a trim never frees a block before it is copied.
        var hit = prefix?.Lookup(prompt, calibrating ? options!.Calibration.TopK : 0);
        CachedTokens = hit?.Tokens ?? 0;
        Telemetry.PrefixLookups.Add(1, new KeyValuePair<string, object?>("result", CachedTokens > 0 ? "hit" : "miss"));
        Telemetry.PrefixTokens.Add(CachedTokens, new KeyValuePair<string, object?>("source", "cache"));
        Telemetry.PrefixTokens.Add(prompt.Length - CachedTokens, new KeyValuePair<string, object?>("source", "prefill"));
        if (options is null)
        {
            _plainCache = runtime.CreateCache();
            hit?.CopyInto(_plainCache);
            _prefill = plain.BeginPrefill(_plainCache, prompt[CachedTokens..]);
        }
        else
        {
            // Calibration runs on the calibrator actor: each chunk's top-k rows go there as the device
            // moves on (a cached prefix's rows first), and are kept for the prefix cache.
            _promptRows = calibrating && prefix is not null ? [] : null;
            (_prefill, _finish) = spec.BeginPrefill(prompt, calibrating ? options.Calibration : null, rows =>
            {
                _promptRows?.Add(rows);
                roles.Calibrator.Tell(new CalibratorProtocol.Chunk(id, rows), roles.Device);
            }, hit);
        }

        Trimmed(prefix, () => prefix!.Trim(room));
    }

    /// <summary>A plain run's prefilled cache (now the caller's) and its prefill, once <see cref="Step"/> returned true.</summary>
    public (KvCache Cache, PrefillSession Prefill) TakePlain(PrefixCache? prefix, long room)
    {
        var cache = _plainCache!;
        Remember(prefix, cache, null, room);
        _plainCache = null;
        return (cache, _prefill!);
    }

    /// <summary>A speculative run's prefill (the caller disposes it), once <see cref="Step"/> returned true.</summary>
    public Prefilled TakeSpeculative(PrefixCache? prefix, long room)
    {
        var finish = _finish!;
        _finish = null; // the caller owns the prefill (and its cache) from here
        var pre = finish();
        Remember(prefix, pre.Cache, pre.CalibrationFailed ? null : _promptRows, room);
        _promptRows = null;
        return pre;
    }

    /// <summary>
    /// The prompt's whole blocks go into the prefix cache, before decoding writes past them, and those of a
    /// context store's documents are pinned for the store (<see cref="DeviceProtocol.RunRequest.KeepPrefix"/>). The cache is
    /// an optimisation: if keeping them fails (memory), the request goes on without (the cache stays
    /// consistent: a block enters whole or not at all).
    /// </summary>
    private void Remember(PrefixCache? prefix, KvCache cache, List<TopRows>? rows, long room)
    {
        if (prefix is null)
        {
            return;
        }

        try
        {
            int[] prompt = [.. request.Prompt.Tokens];
            Trimmed(prefix, () => prefix.Insert(prompt, cache, rows is { Count: > 0 } ? PrefixCache.Join(rows) : null, room));
            if (request.KeepPrefix is { } pin)
            {
                prefix.Pin(pin.Owner, pin.Generation, prompt, pin.Tokens);
                Telemetry.PrefixPinnedBlocks = prefix.PinnedBlocks;
            }
        }
        catch (Exception ex) when (ex is not OperationCanceledException)
        {
            Telemetry.Source.StartActivity("coordgen.prefix_cache_insert_failed", ActivityKind.Internal, request.Trace)?.SetStatus(ActivityStatusCode.Error, ex.Message).Dispose();
        }
    }

    /// <summary>Runs a change to the prefix cache and reports the blocks it evicted and the bytes it holds.</summary>
    private static void Trimmed(PrefixCache? prefix, Action change)
    {
        if (prefix is null)
        {
            return;
        }

        long evicted = prefix.Evictions;
        change();
        Telemetry.PrefixEvictions.Add(prefix.Evictions - evicted);
        Telemetry.PrefixBytes = prefix.Bytes;
        Telemetry.PrefixPinnedBlocks = prefix.PinnedBlocks;
    }

    /// <summary>Releases a cache not handed on: a prefill abandoned half way (or whose last step failed after its
    /// tokens were in), or a plain one never taken.</summary>
    public void Dispose()
    {
        _plainCache?.Dispose();
        _plainCache = null;
        if (_finish is not null)
        {
            _finish().Dispose();
            _finish = null;
        }
    }
}
