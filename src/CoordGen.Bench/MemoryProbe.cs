using System.Diagnostics;
using System.Numerics.Tensors;

namespace CoordGen.Host;

/// <summary>How fast this machine reads memory: the floor under a step that must read all its weights.</summary>
internal static class MemoryProbe
{
    /// <summary>GB/s of all cores summing disjoint slices of a 512 MiB array (far beyond any cache); the best of 5 passes.</summary>
    public static double ReadGbPerSecond()
    {
        var data = GC.AllocateUninitializedArray<float>(128 << 20);
        Array.Fill(data, 1f);
        int parts = Environment.ProcessorCount;
        int chunk = data.Length / parts;
        double best = 0;
        for (int pass = 0; pass < 6; pass++)
        {
            long t0 = Stopwatch.GetTimestamp();
            Parallel.For(0, parts, p => TensorPrimitives.Sum(data.AsSpan(p * chunk, chunk)));
            double s = Stopwatch.GetElapsedTime(t0).TotalSeconds;
            if (pass > 0)
            {
                best = Math.Max(best, (double)chunk * parts * sizeof(float) / s / 1e9);
            }
        }

        return best;
    }
}
