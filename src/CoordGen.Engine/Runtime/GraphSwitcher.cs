using System.Collections.Concurrent;

namespace CoordGen.Engine.Runtime;

/// <summary>
/// Moves the blocks of a <see cref="BlockModel"/> between graph variants in the background: one loader
/// thread loads the requested variants one at a time (as an NPU loads one graph at a time) while the
/// caller keeps computing; a block moves to its new variant just before it computes (<see cref="Apply"/>),
/// and its old variant is freed then, so a block holds both only between its load and its move.
/// Used for progressive switching to the narrow graph during prefill and for switching back to the
/// wide graph when the next request's prefill starts (docs/decisions/0004-progressive-scheduling.md).
/// Not thread-safe: one caller (the device) drives it.
/// </summary>
public sealed class GraphSwitcher : IDisposable
{
    private readonly BlockModel _model;
    private readonly int[] _width;
    private readonly Job?[] _pending;
    private readonly List<Job> _cancelled = [];
    private readonly BlockingCollection<Job> _queue = [];
    private readonly Task _worker;

    /// <summary>Takes over <paramref name="model"/> whose block b has variant <paramref name="widths"/>[b] loaded.</summary>
    public GraphSwitcher(BlockModel model, IReadOnlyList<int> widths)
    {
        if (widths.Count != model.Blocks)
        {
            throw new ArgumentException($"need one width per block ({model.Blocks}), got {widths.Count}.");
        }

        _model = model;
        _width = [.. widths];
        _pending = new Job?[model.Blocks];
        _worker = Task.Factory.StartNew(Work, TaskCreationOptions.LongRunning);
    }

    /// <summary>The variant block <paramref name="block"/> computes on now.</summary>
    public int WidthOf(int block) => _width[block];

    /// <summary>True when no block has a move pending.</summary>
    public bool Idle => _pending.All(p => p is null);

    /// <summary>
    /// Asks for block <paramref name="block"/> on <paramref name="width"/>: queues its load behind the
    /// loads already asked for. A pending move of the block to another variant is called off (a load
    /// not started is skipped; one already done is freed).
    /// </summary>
    public void Request(int block, int width)
    {
        if (_pending[block] is { } p)
        {
            if (p.Width == width)
            {
                return;
            }

            p.Cancelled = true;
            _cancelled.Add(p);
            _pending[block] = null;
        }

        if (_width[block] != width)
        {
            var job = new Job(block, width);
            _pending[block] = job;
            _queue.Add(job);
        }

        Reap();
    }

    /// <summary>
    /// Before block <paramref name="block"/> computes: moves it to its requested variant when that is
    /// loaded, or waits for the load when the requested width is <paramref name="waitFor"/> (a planned
    /// switch the planner already counted the wait of). Returns the width the block computes on.
    /// </summary>
    public int Apply(int block, int? waitFor = null)
    {
        if (_pending[block] is { } job && (job.Done.IsSet || job.Width == waitFor))
        {
            job.Done.Wait();
            job.Error?.Throw();
            _model.Unload(block, _width[block]);
            _width[block] = job.Width;
            _pending[block] = null;
        }

        Reap();
        return _width[block];
    }

    /// <summary>Waits for every pending move and applies it.</summary>
    public void ApplyAll()
    {
        for (int b = 0; b < _width.Length; b++)
        {
            if (_pending[b] is { } job)
            {
                Apply(b, job.Width);
            }
        }

        foreach (var c in _cancelled)
        {
            c.Done.Wait();
        }

        Reap();
    }

    public void Dispose()
    {
        _queue.CompleteAdding();
        _worker.Wait();
        Reap();
        _queue.Dispose();
    }

    /// <summary>Frees what called-off loads loaded (once they are done), unless a block computes on it.</summary>
    private void Reap()
    {
        for (int i = _cancelled.Count - 1; i >= 0; i--)
        {
            var c = _cancelled[i];
            if (!c.Done.IsSet)
            {
                continue;
            }

            if (c.Loaded && _width[c.Block] != c.Width && _pending[c.Block]?.Width != c.Width)
            {
                _model.Unload(c.Block, c.Width);
            }

            _cancelled.RemoveAt(i);
        }
    }

    private void Work()
    {
        foreach (var job in _queue.GetConsumingEnumerable())
        {
            try
            {
                if (!job.Cancelled && !_model.IsLoaded(job.Block, job.Width))
                {
                    _model.Load(job.Block, job.Width);
                    job.Loaded = true;
                }
            }
            catch (Exception ex)
            {
                job.Error = System.Runtime.ExceptionServices.ExceptionDispatchInfo.Capture(ex);
            }
            finally
            {
                job.Done.Set();
            }
        }
    }

    private sealed class Job(int block, int width)
    {
        public int Block { get; } = block;

        public int Width { get; } = width;

        public volatile bool Cancelled;

        public bool Loaded { get; set; }

        public System.Runtime.ExceptionServices.ExceptionDispatchInfo? Error { get; set; }

        public ManualResetEventSlim Done { get; } = new();
    }
}
