using Microsoft.ML.OnnxRuntime;

namespace CoordGen.Engine.Runtime;

/// <summary>
/// One cache's memory: per layer a pinned buffer for keys and one for values, and the OrtValues laid over
/// them for each capacity bucket. It outlives the <see cref="KvCache"/> that used it when a pool keeps it.
/// </summary>
internal sealed class KvStore(Array[] keys, Array[] values)
{
    public Array[] Keys { get; } = keys;

    public Array[] Values { get; } = values;

    /// <summary>OrtValues over the buffers' prefix for a bucket: made on first use of that bucket, kept with the buffers.</summary>
    public Dictionary<int, (OrtValue[] Keys, OrtValue[] Values)> Views { get; } = new();

    public void DisposeViews()
    {
        foreach (var (k, v) in Views.Values)
        {
            foreach (var o in k.Concat(v))
            {
                o.Dispose();
            }
        }

        Views.Clear();
    }
}

/// <summary>
/// The memory of caches whose sessions ended, kept for the next sessions of the same runtime (decision 0030).
/// A fresh buffer's pages are mapped by the operating system on first write, and under a step's threads that
/// made every KV bucket move of a new session cost 26-37 ms instead of 1-2 ms; a kept buffer's pages are mapped
/// already. The pool never holds more than <see cref="Limit"/> caches, and never more memory than the runtime once
/// had in use at the same time (a cache is made only when none is kept). Buffers are not cleared: a new owner
/// starts at length 0, and slots past a cache's length are masked in every graph (their old keys and values are
/// finite, so they weigh exactly zero), as a tree's unkept rows already are. A cache that saw a device fault
/// (<see cref="KvCache.Poisoned"/>) is never kept. Thread-safe: sessions end on any thread.
/// </summary>
public sealed class KvCachePool(int limit) : IDisposable
{
    private readonly Stack<KvStore> _idle = new();
    private readonly Lock _gate = new();
    private bool _disposed;

    /// <summary>Most caches kept (0 = none: every cache's memory goes back to the garbage collector).</summary>
    public int Limit { get; } = limit >= 0 ? limit : throw new ArgumentOutOfRangeException(nameof(limit), $"a KV pool keeps 0 or more caches (got {limit}).");

    /// <summary>Caches kept now.</summary>
    public int Idle
    {
        get
        {
            lock (_gate)
            {
                return _idle.Count;
            }
        }
    }

    /// <summary>Caches made with memory from the pool so far.</summary>
    public long Reused { get; private set; }

    internal KvStore? Rent()
    {
        lock (_gate)
        {
            if (_idle.TryPop(out var s))
            {
                Reused++;
                return s;
            }

            return null;
        }
    }

    /// <summary>Keeps <paramref name="store"/> if there is room; false when the caller should dispose it.</summary>
    internal bool Return(KvStore store)
    {
        lock (_gate)
        {
            if (_disposed || _idle.Count >= Limit)
            {
                return false;
            }

            _idle.Push(store);
            return true;
        }
    }

    /// <summary>Frees kept caches beyond <paramref name="keep"/> (their memory goes back to the garbage collector).</summary>
    public void Trim(int keep)
    {
        lock (_gate)
        {
            while (_idle.Count > Math.Max(0, keep))
            {
                _idle.Pop().DisposeViews();
            }
        }
    }

    public void Dispose()
    {
        lock (_gate)
        {
            _disposed = true;
            while (_idle.TryPop(out var s))
            {
                s.DisposeViews();
            }
        }
    }
}
