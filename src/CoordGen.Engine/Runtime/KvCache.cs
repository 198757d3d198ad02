using Microsoft.ML.OnnxRuntime;

namespace CoordGen.Engine.Runtime;

/// <summary>
/// One session's key/value cache. Per layer, one pinned float buffer for keys and one for values,
/// sized for the largest capacity. The buffer is laid out [1, Hkv, B, D] for the current capacity
/// bucket B (the prefix of the buffer), and wrapped in OrtValues that every graph of that bucket reads
/// in place: no step copies the cache. After a step, only the new rows are written into their slots
/// (<see cref="Commit"/>). When a step needs more room than B, the cache moves into the next bucket
/// (<see cref="EnsureRoom"/>): each head's rows shift to their new offsets, once per bucket change.
/// Slot i holds the token at sequence position i; tree verification compacts the accepted path into
/// consecutive slots through <see cref="Commit"/>'s row map.
/// </summary>
public sealed class KvCache : IDisposable
{
    private readonly float[][] _keys;
    private readonly float[][] _values;
    private readonly int[] _buckets;
    private readonly Dictionary<int, (OrtValue[] Keys, OrtValue[] Values)> _views = new();

    public KvCache(int layers, int kvHeads, int headDim, IReadOnlyList<int> buckets)
    {
        Layers = layers;
        KvHeads = kvHeads;
        HeadDim = headDim;
        _buckets = [.. buckets];
        Capacity = _buckets[^1];
        Bucket = _buckets[0];
        _keys = new float[layers][];
        _values = new float[layers][];
        for (int l = 0; l < layers; l++)
        {
            _keys[l] = GC.AllocateArray<float>(kvHeads * Capacity * headDim, pinned: true);
            _values[l] = GC.AllocateArray<float>(kvHeads * Capacity * headDim, pinned: true);
        }
    }

    public int Layers { get; }

    public int KvHeads { get; }

    /// <summary>Most slots this cache can ever hold.</summary>
    public int Capacity { get; }

    /// <summary>The capacity bucket the buffers are laid out for now.</summary>
    public int Bucket { get; private set; }

    public int HeadDim { get; }

    /// <summary>Number of committed slots (tokens whose keys/values are in the cache).</summary>
    public int Length { get; private set; }

    public long Bytes => BytesFor(Layers, KvHeads, HeadDim, Capacity);

    /// <summary>Bytes of one session's cache (keys and values, every layer) at <paramref name="capacity"/> slots.</summary>
    public static long BytesFor(int layers, int kvHeads, int headDim, int capacity) => 2L * layers * kvHeads * capacity * headDim * sizeof(float);

    internal OrtValue KeyValue(int layer) => View().Keys[layer];

    internal OrtValue ValueValue(int layer) => View().Values[layer];

    private (OrtValue[] Keys, OrtValue[] Values) View()
    {
        if (!_views.TryGetValue(Bucket, out var v))
        {
            long[] shape = [1, KvHeads, Bucket, HeadDim];
            int n = KvHeads * Bucket * HeadDim;
            var info = OrtMemoryInfo.DefaultInstance;
            v = (_keys.Select(a => OrtValue.CreateTensorValueFromMemory(info, new Memory<float>(a, 0, n), shape)).ToArray(),
                 _values.Select(a => OrtValue.CreateTensorValueFromMemory(info, new Memory<float>(a, 0, n), shape)).ToArray());
            _views[Bucket] = v;
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
        int d = HeadDim;
        for (int l = 0; l < Layers; l++)
        {
            // Last head first, so no head's rows are overwritten before they move.
            for (int h = KvHeads - 1; h > 0; h--)
            {
                Array.Copy(_keys[l], h * Bucket * d, _keys[l], h * next * d, Length * d);
                Array.Copy(_values[l], h * Bucket * d, _values[l], h * next * d, Length * d);
            }
        }

        Bucket = next;
    }

    /// <summary>
    /// Copies new keys/values (layout [1,Hkv,W,D] per layer) into the cache: row <c>rows[i]</c> of the
    /// step goes to slot <c>Length + i</c>. Linear steps pass 0..m-1; tree steps pass the accepted path.
    /// </summary>
    public void Commit(IReadOnlyList<float[]> newKeys, IReadOnlyList<float[]> newValues, int width, ReadOnlySpan<int> rows)
    {
        EnsureRoom(Length + rows.Length);
        int d = HeadDim;
        for (int l = 0; l < Layers; l++)
        {
            var srcK = newKeys[l];
            var srcV = newValues[l];
            var dstK = _keys[l];
            var dstV = _values[l];
            for (int h = 0; h < KvHeads; h++)
            {
                for (int i = 0; i < rows.Length; i++)
                {
                    int src = ((h * width) + rows[i]) * d;
                    int dst = ((h * Bucket) + Length + i) * d;
                    Array.Copy(srcK, src, dstK, dst, d);
                    Array.Copy(srcV, src, dstV, dst, d);
                }
            }
        }

        Length += rows.Length;
    }

    /// <summary>
    /// Writes rows 0..count-1 of a step's new keys/values for layers [first, end) into slots
    /// at..at+count-1, without committing them: the blocks of a split model each write their own layers
    /// (and a block running a chunk as narrow sub-chunks writes each sub-chunk before the next reads it).
    /// <see cref="Advance"/> commits once every layer holds the rows. Arrays are indexed by layer.
    /// </summary>
    public void WriteLayers(int first, int end, IReadOnlyList<float[]?> newKeys, IReadOnlyList<float[]?> newValues, int width, int count, int at)
    {
        EnsureRoom(at + count);
        int d = HeadDim;
        for (int l = first; l < end; l++)
        {
            var srcK = newKeys[l]!;
            var srcV = newValues[l]!;
            for (int h = 0; h < KvHeads; h++)
            {
                Array.Copy(srcK, h * width * d, _keys[l], ((h * Bucket) + at) * d, count * d);
                Array.Copy(srcV, h * width * d, _values[l], ((h * Bucket) + at) * d, count * d);
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

        int d = HeadDim;
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
                    Array.Copy(_keys[l], head + (rows[i] * d), _keys[l], head + (i * d), d);
                    Array.Copy(_values[l], head + (rows[i] * d), _values[l], head + (i * d), d);
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
    public long SlotBytes => BytesFor(Layers, KvHeads, HeadDim, 1);

    /// <summary>Floats <see cref="CopySlotsTo"/> writes for <paramref name="count"/> slots.</summary>
    public int SlotFloats(int count) => 2 * Layers * KvHeads * count * HeadDim;

    /// <summary>
    /// Copies committed slots [from, from + count) into <paramref name="dest"/>, laid out per layer keys
    /// then values, each [Hkv, count, D] (the layout <see cref="AppendSlots"/> reads): a prefix cache's block.
    /// </summary>
    public void CopySlotsTo(int from, int count, Span<float> dest)
    {
        if (from < 0 || count < 0 || from + count > Length)
        {
            throw new ArgumentOutOfRangeException(nameof(count), $"slots [{from}, {from + count}) are not all committed ({Length} are).");
        }

        int d = HeadDim, run = count * d, at = 0;
        for (int l = 0; l < Layers; l++)
        {
            foreach (var buffer in (float[][])[_keys[l], _values[l]])
            {
                for (int h = 0; h < KvHeads; h++)
                {
                    buffer.AsSpan(((h * Bucket) + from) * d, run).CopyTo(dest.Slice(at, run));
                    at += run;
                }
            }
        }
    }

    /// <summary>Appends <paramref name="count"/> slots laid out as <see cref="CopySlotsTo"/> writes them, and commits them.</summary>
    public void AppendSlots(ReadOnlySpan<float> src, int count)
    {
        EnsureRoom(Length + count);
        int d = HeadDim, run = count * d, at = 0;
        for (int l = 0; l < Layers; l++)
        {
            foreach (var buffer in (float[][])[_keys[l], _values[l]])
            {
                for (int h = 0; h < KvHeads; h++)
                {
                    src.Slice(at, run).CopyTo(buffer.AsSpan(((h * Bucket) + Length) * d, run));
                    at += run;
                }
            }
        }

        Length += count;
    }

    /// <summary>Copies another cache's committed slots (same shape) into this one, e.g. to reuse one prefill.</summary>
    public void CopyFrom(KvCache other)
    {
        if (other.Layers != Layers || other.KvHeads != KvHeads || other.Capacity != Capacity || other.HeadDim != HeadDim)
        {
            throw new ArgumentException("caches differ in shape");
        }

        Length = 0;
        Bucket = other.Bucket;
        int span = other.Length * HeadDim;
        for (int l = 0; l < Layers; l++)
        {
            for (int h = 0; h < KvHeads; h++)
            {
                int off = h * Bucket * HeadDim;
                Array.Copy(other._keys[l], off, _keys[l], off, span);
                Array.Copy(other._values[l], off, _values[l], off, span);
            }
        }

        Length = other.Length;
    }

    public void Dispose()
    {
        foreach (var (k, v) in _views.Values)
        {
            foreach (var o in k.Concat(v))
            {
                o.Dispose();
            }
        }

        _views.Clear();
    }
}
