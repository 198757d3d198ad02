using CoordGen.Engine.Runtime;
using CoordGen.Messages;

namespace CoordGen.Actors.Device;

/// <summary>
/// The device's prefix cache (decision 0019) and its share of the KV budget. The cache itself is used only
/// by the device's prefill steps, which run one at a time; this holder, on the mailbox thread, says which
/// step gets it and how much room it has, and applies diagnostics (switch off and on, empty, report)
/// between steps, never under one.
/// </summary>
internal sealed class DevicePrefixCache(long kvBudget)
{
    private readonly PrefixCache? _cache = kvBudget > 0 ? new PrefixCache() : null;
    private bool _enabled = kvBudget > 0;
    private bool _clear;
    private readonly List<(string Owner, long Generation)> _releases = [];

    /// <summary>The cache for a prefill step (null when off).</summary>
    public PrefixCache? ForPrefill => _enabled ? _cache : null;

    /// <summary>Bytes the cache may hold while <paramref name="active"/> sessions hold a cache of <paramref name="perSession"/> bytes each.</summary>
    public long Room(int active, long perSession) => kvBudget - (active * perSession);

    /// <summary>
    /// Drops the runtime's kept caches (<see cref="KvCachePool"/>, decision 0030) that the budget has no room for
    /// beside the running sessions' caches and this cache's blocks: kept caches yield to prefix blocks.
    /// </summary>
    public void TrimPool(KvCachePool pool, int active, long perSession)
    {
        if (_cache is not null)
        {
            pool.Trim((int)Math.Max(0, (Room(active, perSession) - _cache.Bytes) / perSession));
        }
    }

    /// <summary>Switches the cache on or off; it is emptied before the next step either way.</summary>
    public void Set(bool enabled)
    {
        _enabled = enabled && _cache is not null;
        _clear = true;
    }

    /// <summary>Releases a context store's pinned blocks (<see cref="PrefixCache.Unpin"/>) before the next step.</summary>
    public void Release(string owner, long throughGeneration) => _releases.Add((owner, throughGeneration));

    /// <summary>Applies a pending switch and releases: the device calls this when no step is running.</summary>
    public void BetweenSteps()
    {
        if (_clear)
        {
            _cache?.Clear();
            _clear = false;
            Telemetry.PrefixBytes = 0;
        }

        foreach (var (owner, generation) in _releases)
        {
            _cache?.Unpin(owner, generation);
        }

        Telemetry.PrefixPinnedBlocks = _cache?.PinnedBlocks ?? 0;

        _releases.Clear();
    }

    /// <summary>What the cache holds and has done (when no step is running).</summary>
    public DiagnosticsProtocol.PrefixCacheStats Stats()
    {
        BetweenSteps();
        var (lookups, hits) = _cache?.Lookups ?? (0, 0);
        var (reused, prefilled) = _cache?.Tokens ?? (0, 0);
        return new(_enabled, _cache?.BlockCount ?? 0, _cache?.Bytes ?? 0, lookups, hits, reused, prefilled, _cache?.Evictions ?? 0) { PinnedBlocks = _cache?.PinnedBlocks ?? 0 };
    }
}
