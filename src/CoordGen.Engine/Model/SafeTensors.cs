using System.Buffers.Binary;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;

namespace CoordGen.Engine.Model;

/// <summary>Element types a safetensors file may hold that CoordGen reads.</summary>
public enum SafeTensorDType
{
    F32,
    F16,
    BF16,
}

/// <summary>One tensor entry of a safetensors header.</summary>
public sealed record SafeTensorInfo(string Name, SafeTensorDType DType, long[] Shape, long Begin, long End, string File)
{
    public long ElementCount => Shape.Aggregate(1L, (a, b) => a * b);
}

/// <summary>
/// Reader and writer for the safetensors format (8-byte little-endian header length, JSON header,
/// raw little-endian data), including the sharded <c>model.safetensors.index.json</c> layout.
/// Every dtype is widened to float32 on load, since the CPU graphs compute in float32.
/// </summary>
public static class SafeTensors
{
    public static IReadOnlyDictionary<string, SafeTensorInfo> ReadHeader(string path)
    {
        using var fs = File.OpenRead(path);
        Span<byte> lenBytes = stackalloc byte[8];
        if (fs.Read(lenBytes) != 8)
        {
            throw new ModelLoadException($"'{path}' is truncated: it has no safetensors header. Re-download or re-export the weights.");
        }

        long headerLen = BinaryPrimitives.ReadInt64LittleEndian(lenBytes);
        if (headerLen <= 0 || headerLen > 100_000_000 || 8 + headerLen > fs.Length)
        {
            throw new ModelLoadException($"'{path}' is not a valid safetensors file (header length {headerLen}, file length {fs.Length}). Re-download or re-export the weights.");
        }

        var buf = new byte[headerLen];
        fs.ReadExactly(buf);
        JsonDocument doc;
        try
        {
            doc = JsonDocument.Parse(buf);
        }
        catch (JsonException ex)
        {
            throw new ModelLoadException($"'{path}' has a corrupt safetensors header: {ex.Message}. Re-download or re-export the weights.", ex);
        }

        var result = new Dictionary<string, SafeTensorInfo>(StringComparer.Ordinal);
        long dataStart = 8 + headerLen;
        using (doc)
        {
            foreach (var p in doc.RootElement.EnumerateObject())
            {
                if (p.Name == "__metadata__")
                {
                    continue;
                }

                string dt = p.Value.GetProperty("dtype").GetString() ?? "";
                var dtype = dt switch
                {
                    "F32" => SafeTensorDType.F32,
                    "F16" => SafeTensorDType.F16,
                    "BF16" => SafeTensorDType.BF16,
                    _ => throw new ModelLoadException($"'{path}': tensor '{p.Name}' has dtype {dt}; CoordGen loads F32, F16 and BF16 weights. Dequantize the checkpoint first."),
                };
                var shape = p.Value.GetProperty("shape").EnumerateArray().Select(x => x.GetInt64()).ToArray();
                var offs = p.Value.GetProperty("data_offsets").EnumerateArray().Select(x => x.GetInt64()).ToArray();
                var info = new SafeTensorInfo(p.Name, dtype, shape, dataStart + offs[0], dataStart + offs[1], path);
                long expected = info.ElementCount * (dtype == SafeTensorDType.F32 ? 4 : 2);
                if (offs[1] - offs[0] != expected)
                {
                    throw new ModelLoadException($"'{path}': tensor '{p.Name}' spans {offs[1] - offs[0]} bytes but its shape needs {expected}. The file is corrupt.");
                }

                if (info.End > fs.Length)
                {
                    throw new ModelLoadException($"'{path}' is truncated: tensor '{p.Name}' ends at byte {info.End} but the file has {fs.Length}. Re-download or re-export the weights.");
                }

                result[p.Name] = info;
            }
        }

        return result;
    }

    /// <summary>Headers of every tensor in a model directory (single file or sharded index).</summary>
    public static IReadOnlyDictionary<string, SafeTensorInfo> ReadDirectory(string dir)
    {
        string single = Path.Combine(dir, "model.safetensors");
        string index = Path.Combine(dir, "model.safetensors.index.json");
        if (File.Exists(single))
        {
            return ReadHeader(single);
        }

        if (!File.Exists(index))
        {
            throw new ModelLoadException($"No weights in '{dir}': expected model.safetensors or model.safetensors.index.json. Put the checkpoint's weight files in the model directory.");
        }

        using var doc = JsonDocument.Parse(File.ReadAllText(index));
        var files = doc.RootElement.GetProperty("weight_map").EnumerateObject().Select(p => p.Value.GetString()!).Distinct();
        var all = new Dictionary<string, SafeTensorInfo>(StringComparer.Ordinal);
        foreach (var f in files)
        {
            string shard = Path.Combine(dir, f);
            if (!File.Exists(shard))
            {
                throw new ModelLoadException($"Shard '{f}' listed in model.safetensors.index.json is missing from '{dir}'.");
            }

            foreach (var kv in ReadHeader(shard))
            {
                all[kv.Key] = kv.Value;
            }
        }

        return all;
    }

    /// <summary>Reads one tensor into <paramref name="dest"/> as float32.</summary>
    public static void ReadInto(SafeTensorInfo info, Span<float> dest)
    {
        if (dest.Length != info.ElementCount)
        {
            throw new ArgumentException($"destination holds {dest.Length} floats, tensor '{info.Name}' has {info.ElementCount}");
        }

        using var fs = File.OpenRead(info.File);
        fs.Seek(info.Begin, SeekOrigin.Begin);
        if (info.DType == SafeTensorDType.F32)
        {
            fs.ReadExactly(MemoryMarshal.AsBytes(dest));
            return;
        }

        const int chunk = 1 << 16;
        var buf = new byte[chunk * 2];
        int done = 0;
        while (done < dest.Length)
        {
            int n = Math.Min(chunk, dest.Length - done);
            fs.ReadExactly(buf, 0, n * 2);
            var halves = MemoryMarshal.Cast<byte, ushort>(buf.AsSpan(0, n * 2));
            var d = dest.Slice(done, n);
            if (info.DType == SafeTensorDType.F16)
            {
                for (int i = 0; i < n; i++)
                {
                    d[i] = (float)BitConverter.UInt16BitsToHalf(halves[i]);
                }
            }
            else
            {
                for (int i = 0; i < n; i++)
                {
                    d[i] = BitConverter.Int32BitsToSingle(halves[i] << 16);
                }
            }

            done += n;
        }
    }

    /// <summary>Writes tensors to one safetensors file in the given dtype.</summary>
    public static void Write(string path, IEnumerable<(string Name, long[] Shape, float[] Data)> tensors, SafeTensorDType dtype)
    {
        var list = tensors.OrderBy(t => t.Name, StringComparer.Ordinal).ToList();
        var header = new Dictionary<string, object>();
        long off = 0;
        int width = dtype == SafeTensorDType.F32 ? 4 : 2;
        foreach (var t in list)
        {
            long bytes = t.Data.LongLength * width;
            header[t.Name] = new Dictionary<string, object>
            {
                ["dtype"] = dtype.ToString(),
                ["shape"] = t.Shape,
                ["data_offsets"] = new[] { off, off + bytes },
            };
            off += bytes;
        }

        header["__metadata__"] = new Dictionary<string, string> { ["format"] = "pt" };
        var hb = Encoding.UTF8.GetBytes(JsonSerializer.Serialize(header));
        int pad = (8 - hb.Length % 8) % 8;
        using var fs = File.Create(path);
        Span<byte> len = stackalloc byte[8];
        BinaryPrimitives.WriteInt64LittleEndian(len, hb.Length + pad);
        fs.Write(len);
        fs.Write(hb);
        for (int i = 0; i < pad; i++)
        {
            fs.WriteByte((byte)' ');
        }

        foreach (var t in list)
        {
            if (dtype == SafeTensorDType.F32)
            {
                fs.Write(MemoryMarshal.AsBytes(t.Data.AsSpan()));
                continue;
            }

            var outBuf = new byte[t.Data.Length * 2];
            var halves = MemoryMarshal.Cast<byte, ushort>(outBuf.AsSpan());
            for (int i = 0; i < t.Data.Length; i++)
            {
                halves[i] = dtype == SafeTensorDType.F16
                    ? BitConverter.HalfToUInt16Bits((Half)t.Data[i])
                    : (ushort)(BitConverter.SingleToUInt32Bits(t.Data[i]) >> 16);
            }

            fs.Write(outBuf);
        }
    }
}
