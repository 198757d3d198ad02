using System.Runtime.InteropServices;
using Microsoft.ML.OnnxRuntime;

namespace CoordGen.Engine.Runtime;

/// <summary>
/// One session's key/value cache. Per layer, one pinned buffer for keys and one for values (float32, or
/// float16 with <see cref="KvFormat.F16"/>), sized for the largest capacity. The buffer is laid out [1, Hkv, B, D] for the current capacity
/// bucket B (the prefix of the buffer), and wrapped in OrtValues that every graph of that bucket reads
/// in place: no step copies the cache. After a step, only the new rows are written into their slots
/// (<see cref="Commit"/>). When a step needs more room than B, the cache moves into the next bucket
/// (<see cref="EnsureRoom"/>): each head's rows shift to their new offsets, once per bucket change.
/// Slot i holds the token at sequence position i; tree verification compacts the accepted path into
/// consecutive slots through <see cref="Commit"/>'s row map.
/// </summary>
public sealed class KvCache : IDisposable
{
    // Buffers: float[] or Float16[] per layer; every move below is a byte copy, whatever the format. Null once disposed.
    private KvStore? _store;
    private readonly KvCachePool? _pool;
    private readonly int[] _buckets;
    private readonly int _e;

    public KvCache(int layers, int kvHeads, int headDim, IReadOnlyList<int> buckets, KvFormat format = KvFormat.F32)
        : this(layers, kvHeads, headDim, buckets, format, pool: null)
    {
    }

    /// <summary>A cache whose memory comes from <paramref name="pool"/> when it keeps one (then with its old contents, all
    /// past this cache's length, which starts at 0), and goes back to it on <see cref="Dispose"/>.</summary>
    public KvCache(int layers, int kvHeads, int headDim, IReadOnlyList<int> buckets, KvFormat format, KvCachePool? pool)
    {
        Layers = layers;
        KvHeads = kvHeads;
        HeadDim = headDim;
        Format = format;
        _e = format.ElementBytes();
        _buckets = [.. buckets];
        Capacity = _buckets[^1];
        Bucket = _buckets[0];
        _pool = pool;
        _store = pool?.Rent();
        if (_store is null)
        {
            var keys = new Array[layers];
            var values = new Array[layers];
            for (int l = 0; l < layers; l++)
            {
                keys[l] = Allocate(format, kvHeads * Capacity * headDim);
                values[l] = Allocate(format, kvHeads * Capacity * headDim);
            }

            _store = new KvStore(keys, values);
        }
    }

    private KvStore Store => _store ?? throw new ObjectDisposedException(nameof(KvCache), "this KV cache was disposed (its memory may serve another session now): a session's cache is used only by its owner, until it is disposed.");

    private Array[] KeyBuffers => Store.Keys;

    private Array[] ValueBuffers => Store.Values;

    /// <summary>Set when a step over this cache returned non-finite values: its memory is then never kept for another session.</summary>
    public bool Poisoned { get; set; }

    /// <summary>A pinned buffer of <paramref name="n"/> elements of <paramref name="format"/> (float[] or Float16[]).</summary>
    public static Array Allocate(KvFormat format, int n) =>
        format == KvFormat.F16 ? GC.AllocateArray<Float16>(n, pinned: true) : GC.AllocateArray<float>(n, pinned: true);

    /// <summary>An OrtValue over a buffer from <see cref="Allocate"/>.</summary>
    public static OrtValue Tensor(Array buffer, int n, long[] shape) => buffer switch
    {
        float[] f => OrtValue.CreateTensorValueFromMemory(OrtMemoryInfo.DefaultInstance, new Memory<float>(f, 0, n), shape),
        Float16[] h => OrtValue.CreateTensorValueFromMemory(OrtMemoryInfo.DefaultInstance, new Memory<Float16>(h, 0, n), shape),
        _ => throw new ArgumentException($"a KV buffer is float[] or Float16[] (got {buffer.GetType().Name})."),
    };

    /// <summary>A buffer's bytes (float[] or Float16[]).</summary>
    public static Span<byte> Raw(Array buffer) => buffer switch
    {
        float[] f => MemoryMarshal.AsBytes(f.AsSpan()),
        Float16[] h => MemoryMarshal.AsBytes(h.AsSpan()),
        _ => throw new ArgumentException($"a KV buffer is float[] or Float16[] (got {buffer.GetType().Name})."),
    };

    /// <summary>How keys and values are held.</summary>
    public KvFormat Format { get; }

    public int Layers { get; }

    public int KvHeads { get; }

    /// <summary>Most slots this cache can ever hold.</summary>
    public int Capacity { get; }

    /// <summary>The capacity bucket the buffers are laid out for now.</summary>
    public int Bucket { get; private set; }

    public int HeadDim { get; }

    /// <summary>Number of committed slots (tokens whose keys/values are in the cache).</summary>
    public int Length { get; private set; }

    public long Bytes => BytesFor(Layers, KvHeads, HeadDim, Capacity, Format);

    /// <summary>Bytes of one session's cache (keys and values, every layer) at <paramref name="capacity"/> slots.</summary>
    public static long BytesFor(int layers, int kvHeads, int headDim, int capacity, KvFormat format = KvFormat.F32) => 2L * layers * kvHeads * capacity * headDim * format.ElementBytes();

    internal OrtValue KeyValue(int layer) => View().Keys[layer];

    internal OrtValue ValueValue(int layer) => View().Values[layer];

    private (OrtValue[] Keys, OrtValue[] Values) View()
    {
        var views = Store.Views;
        if (!views.TryGetValue(Bucket, out var v))
        {
            long[] shape = [1, KvHeads, Bucket, HeadDim];
            int n = KvHeads * Bucket * HeadDim;
            v = (KeyBuffers.Select(a => Tensor(a, n, shape)).ToArray(), ValueBuffers.Select(a => Tensor(a, n, shape)).ToArray());
            views[Bucket] = v;
        }

        return v;
    }

    /// <summary>The bucket <see cref="EnsureRoom"/> would leave the cache in for <paramref name="slots"/> slots.</summary>
    public int BucketFor(int slots) => Math.Max(Bucket, _buckets.FirstOrDefault(b => b >= slots, Capacity));

    /// <summary>Moves the cache into the smallest bucket holding <paramref name="slots"/> slots (never shrinks).</summary>
    public void EnsureRoom(int slots)
    {
        if (slots <= Bucket)
        {
            return;
        }

        if (slots > Capacity)
        {
            throw new InvalidOperationException($"KV cache full: {slots} slots needed, capacity {Capacity}");
        }

        int next = _buckets.First(b => b >= slots);
        int d = HeadDim * _e;
        for (int l = 0; l < Layers; l++)
        {
            // Last head first, so no head's rows are overwritten before they move.
            for (int h = KvHeads - 1; h > 0; h--)
            {
                Move(KeyBuffers[l], h * Bucket * d, h * next * d, Length * d);
                Move(ValueBuffers[l], h * Bucket * d, h * next * d, Length * d);
            }
        }

        Bucket = next;
    }

    /// <summary>
    /// Copies new keys/values (layout [1,Hkv,W,D] per layer) into the cache: row <c>rows[i]</c> of the
    /// step goes to slot <c>Length + i</c>. Linear steps pass 0..m-1; tree steps pass the accepted path.
    /// </summary>
    /// <remarks>The new rows are in the cache's <see cref="Format"/> (the graphs write them so).</remarks>
    public void Commit(IReadOnlyList<Array> newKeys, IReadOnlyList<Array> newValues, int width, ReadOnlySpan<int> rows)
    {
        CheckFormat(newKeys[0]);
        EnsureRoom(Length + rows.Length);
        int d = HeadDim * _e;
        for (int l = 0; l < Layers; l++)
        {
            var srcK = Raw(newKeys[l]);
            var srcV = Raw(newValues[l]);
            var dstK = Raw(KeyBuffers[l]);
            var dstV = Raw(ValueBuffers[l]);
            for (int h = 0; h < KvHeads; h++)
            {
                for (int i = 0; i < rows.Length; i++)
                {
                    int src = ((h * width) + rows[i]) * d;
                    int dst = ((h * Bucket) + Length + i) * d;
                    srcK.Slice(src, d).CopyTo(dstK.Slice(dst, d));
                    srcV.Slice(src, d).CopyTo(dstV.Slice(dst, d));
                }
            }
        }

        Length += rows.Length;
    }

    // Rows are copied as bytes: a source in the other format would be silently wrong.
    private void CheckFormat(Array rows)
    {
        if ((rows is Float16[]) != (Format == KvFormat.F16))
        {
            throw new ArgumentException($"new keys and values are {rows.GetType().Name} but this cache holds {Format.Name()}: build them with KvCache.Allocate(cache.Format, ...).");
        }
    }

    private static void Move(Array buffer, int from, int to, int bytes)
    {
        var raw = Raw(buffer);
        raw.Slice(from, bytes).CopyTo(raw.Slice(to, bytes));
    }

    /// <summary>
    /// Writes rows 0..count-1 of a step's new keys/values for layers [first, end) into slots
    /// at..at+count-1, without committing them: the blocks of a split model each write their own layers
    /// (and a block running a chunk as narrow sub-chunks writes each sub-chunk before the next reads it).
    /// <see cref="Advance"/> commits once every layer holds the rows. Arrays are indexed by layer.
    /// </summary>
    public void WriteLayers(int first, int end, IReadOnlyList<Array?> newKeys, IReadOnlyList<Array?> newValues, int width, int count, int at)
    {
        CheckFormat(newKeys[first]!);
        EnsureRoom(at + count);
        int d = HeadDim * _e;
        for (int l = first; l < end; l++)
        {
            var srcK = Raw(newKeys[l]!);
            var srcV = Raw(newValues[l]!);
            var dstK = Raw(KeyBuffers[l]);
            var dstV = Raw(ValueBuffers[l]);
            for (int h = 0; h < KvHeads; h++)
            {
                srcK.Slice(h * width * d, count * d).CopyTo(dstK.Slice(((h * Bucket) + at) * d, count * d));
                srcV.Slice(h * width * d, count * d).CopyTo(dstV.Slice(((h * Bucket) + at) * d, count * d));
            }
        }
    }

    /// <summary>
    /// Commits a verified path out of slots staged with <see cref="WriteLayers"/> at <see cref="Length"/>
    /// (a tree step's rows, written before its verdict was known): staged row <c>rows[i]</c> moves to
    /// slot <c>Length + i</c>. <paramref name="rows"/> ascends from 0 (the root), so every row moves
    /// down or stays and no row is overwritten before it moves.
    /// </summary>
    public void Keep(ReadOnlySpan<int> rows)
    {
        if (Length + rows.Length > Bucket)
        {
            throw new InvalidOperationException($"cannot commit {rows.Length} slots: bucket {Bucket} holds {Bucket - Length} more");
        }

        int d = HeadDim * _e;
        for (int i = 0; i < rows.Length; i++)
        {
            if (rows[i] < i || (i > 0 && rows[i] <= rows[i - 1]))
            {
                throw new ArgumentException("kept rows must ascend from the root", nameof(rows));
            }

            if (rows[i] == i)
            {
                continue;
            }

            for (int l = 0; l < Layers; l++)
            {
                for (int h = 0; h < KvHeads; h++)
                {
                    int head = ((h * Bucket) + Length) * d;
                    Move(KeyBuffers[l], head + (rows[i] * d), head + (i * d), d);
                    Move(ValueBuffers[l], head + (rows[i] * d), head + (i * d), d);
                }
            }
        }

        Length += rows.Length;
    }

    /// <summary>Commits <paramref name="count"/> slots written with <see cref="WriteLayers"/>.</summary>
    public void Advance(int count)
    {
        if (Length + count > Bucket)
        {
            throw new InvalidOperationException($"cannot commit {count} slots: bucket {Bucket} holds {Bucket - Length} more");
        }

        Length += count;
    }

    /// <summary>Bytes one slot takes: its keys and values in every layer.</summary>
    public long SlotBytes => BytesFor(Layers, KvHeads, HeadDim, 1, Format);

    /// <summary>Bytes <see cref="CopySlotsTo"/> writes for <paramref name="count"/> slots.</summary>
    public long SlotBytesFor(int count) => 2L * Layers * KvHeads * count * HeadDim * _e;

    /// <summary>
    /// Copies committed slots [from, from + count) into <paramref name="dest"/>, laid out per layer keys
    /// then values, each [Hkv, count, D] (the layout <see cref="AppendSlots"/> reads): a prefix cache's block.
    /// </summary>
    public void CopySlotsTo(int from, int count, Span<byte> dest)
    {
        if (from < 0 || count < 0 || from + count > Length)
        {
            throw new ArgumentOutOfRangeException(nameof(count), $"slots [{from}, {from + count}) are not all committed ({Length} are).");
        }

        int d = HeadDim * _e, run = count * d, at = 0;
        for (int l = 0; l < Layers; l++)
        {
            foreach (var buffer in (Array[])[KeyBuffers[l], ValueBuffers[l]])
            {
                var raw = Raw(buffer);
                for (int h = 0; h < KvHeads; h++)
                {
                    raw.Slice(((h * Bucket) + from) * d, run).CopyTo(dest.Slice(at, run));
                    at += run;
                }
            }
        }
    }

    /// <summary>Appends <paramref name="count"/> slots laid out as <see cref="CopySlotsTo"/> writes them, and commits them.</summary>
    public void AppendSlots(ReadOnlySpan<byte> src, int count)
    {
        EnsureRoom(Length + count);
        int d = HeadDim * _e, run = count * d, at = 0;
        for (int l = 0; l < Layers; l++)
        {
            foreach (var buffer in (Array[])[KeyBuffers[l], ValueBuffers[l]])
            {
                var raw = Raw(buffer);
                for (int h = 0; h < KvHeads; h++)
                {
                    src.Slice(at, run).CopyTo(raw.Slice(((h * Bucket) + Length) * d, run));
                    at += run;
                }
            }
        }

        Length += count;
    }

    /// <summary>Copies another cache's committed slots (same shape) into this one, e.g. to reuse one prefill.</summary>
    public void CopyFrom(KvCache other)
    {
        if (other.Layers != Layers || other.KvHeads != KvHeads || other.Capacity != Capacity || other.HeadDim != HeadDim || other.Format != Format)
        {
            throw new ArgumentException("caches differ in shape or format");
        }

        Length = 0;
        Bucket = other.Bucket;
        int span = other.Length * HeadDim * _e;
        for (int l = 0; l < Layers; l++)
        {
            for (int h = 0; h < KvHeads; h++)
            {
                int off = h * Bucket * HeadDim * _e;
                Raw(other.Store.Keys[l]).Slice(off, span).CopyTo(Raw(KeyBuffers[l]).Slice(off, span));
                Raw(other.Store.Values[l]).Slice(off, span).CopyTo(Raw(ValueBuffers[l]).Slice(off, span));
            }
        }

        Length = other.Length;
    }

    /// <summary>Hands the memory back to the pool the cache came from (unless <see cref="Poisoned"/> or the pool is full), else
    /// frees its OrtValues. The cache is unusable afterwards; disposing it again does nothing.</summary>
    public void Dispose()
    {
        var store = Interlocked.Exchange(ref _store, null); // two owners disposing at once hand it back once
        if (store is not null && (Poisoned || _pool?.Return(store) != true))
        {
            store.DisposeViews();
        }
    }
}
