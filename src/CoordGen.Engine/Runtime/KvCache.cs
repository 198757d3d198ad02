using Microsoft.ML.OnnxRuntime;

namespace CoordGen.Engine.Runtime;

/// <summary>
/// One session's key/value cache: per layer, a pinned float buffer of shape [1, Hkv, C, D] for keys
/// and one for values, wrapped once in OrtValues that every graph reads in place (no per-step copy of
/// the cache). After a step, only the W new rows are written into their slots (<see cref="Commit"/>).
/// Slot i holds the token at sequence position i for linear decoding; tree verification compacts the
/// accepted path into consecutive slots through <see cref="Commit"/>'s row map.
/// </summary>
public sealed class KvCache : IDisposable
{
    private readonly float[][] _keys;
    private readonly float[][] _values;
    private readonly OrtValue[] _keyValues;
    private readonly OrtValue[] _valueValues;

    public KvCache(int layers, int kvHeads, int capacity, int headDim)
    {
        Layers = layers;
        KvHeads = kvHeads;
        Capacity = capacity;
        HeadDim = headDim;
        long[] shape = [1, kvHeads, capacity, headDim];
        _keys = new float[layers][];
        _values = new float[layers][];
        _keyValues = new OrtValue[layers];
        _valueValues = new OrtValue[layers];
        for (int l = 0; l < layers; l++)
        {
            _keys[l] = GC.AllocateArray<float>(kvHeads * capacity * headDim, pinned: true);
            _values[l] = GC.AllocateArray<float>(kvHeads * capacity * headDim, pinned: true);
            _keyValues[l] = OrtValue.CreateTensorValueFromMemory(_keys[l], shape);
            _valueValues[l] = OrtValue.CreateTensorValueFromMemory(_values[l], shape);
        }
    }

    public int Layers { get; }

    public int KvHeads { get; }

    public int Capacity { get; }

    public int HeadDim { get; }

    /// <summary>Number of committed slots (tokens whose keys/values are in the cache).</summary>
    public int Length { get; private set; }

    public long Bytes => 2L * Layers * KvHeads * Capacity * HeadDim * sizeof(float);

    internal OrtValue KeyValue(int layer) => _keyValues[layer];

    internal OrtValue ValueValue(int layer) => _valueValues[layer];

    internal ReadOnlySpan<float> Keys(int layer) => _keys[layer];

    internal ReadOnlySpan<float> Values(int layer) => _values[layer];

    /// <summary>
    /// Copies new keys/values (layout [1,Hkv,W,D] per layer) into the cache: row <c>rows[i]</c> of the
    /// step goes to slot <c>Length + i</c>. Linear steps pass 0..m-1; tree steps pass the accepted path.
    /// </summary>
    public void Commit(IReadOnlyList<float[]> newKeys, IReadOnlyList<float[]> newValues, int width, ReadOnlySpan<int> rows)
    {
        if (Length + rows.Length > Capacity)
        {
            throw new InvalidOperationException($"KV cache full: {Length} + {rows.Length} > capacity {Capacity}");
        }

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
                    int dst = ((h * Capacity) + Length + i) * d;
                    Array.Copy(srcK, src, dstK, dst, d);
                    Array.Copy(srcV, src, dstV, dst, d);
                }
            }
        }

        Length += rows.Length;
    }

    /// <summary>Copies another cache's committed slots (same shape) into this one, e.g. to reuse one prefill.</summary>
    public void CopyFrom(KvCache other)
    {
        if (other.Layers != Layers || other.KvHeads != KvHeads || other.Capacity != Capacity || other.HeadDim != HeadDim)
        {
            throw new ArgumentException("caches differ in shape");
        }

        int span = other.Length * HeadDim;
        for (int l = 0; l < Layers; l++)
        {
            for (int h = 0; h < KvHeads; h++)
            {
                int off = h * Capacity * HeadDim;
                Array.Copy(other._keys[l], off, _keys[l], off, span);
                Array.Copy(other._values[l], off, _values[l], off, span);
            }
        }

        Length = other.Length;
    }

    /// <summary>Forgets slots past <paramref name="length"/> (their contents are masked from then on).</summary>
    public void Truncate(int length)
    {
        ArgumentOutOfRangeException.ThrowIfGreaterThan(length, Length);
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        Length = length;
    }

    public void Dispose()
    {
        foreach (var v in _keyValues)
        {
            v.Dispose();
        }

        foreach (var v in _valueValues)
        {
            v.Dispose();
        }
    }
}
