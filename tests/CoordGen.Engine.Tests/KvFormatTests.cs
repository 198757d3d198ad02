using CoordGen.Engine.Generation;
using CoordGen.Engine.Model;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Speculative;
using CoordGen.Engine.Workloads;
using Microsoft.ML.OnnxRuntime;

namespace CoordGen.Engine.Tests;

/// <summary>Float16 KV caches (decision 0020): half the bytes, logits close to float32's, speculation lossless on them, and the prefix cache exact.</summary>
public class KvFormatTests
{
    private static readonly Lazy<ModelBundle> Demo = new(() => ModelBundle.Load(Paths.DemoModel));

    [Fact]
    public void F16_cache_should_hold_half_the_bytes_and_give_the_float32_logits_within_float16_rounding()
    {
        var demo = Demo.Value;
        int[] prompt = demo.Tokenizer.Encode(PromptTemplate.Render("The lighthouse at Brannock Point was built in 1871 by the engineer Ada Kerr. Its lamp burned whale oil until 1902, when the keepers changed to kerosene; the tower is 31 metres tall.", "Summarize the document.", demo.HasRoleTokens));
        using var f32 = new OrtModelRuntime(demo.Weights, capacity: 512, widths: [1, 64]);
        using var f16 = new OrtModelRuntime(demo.Weights, capacity: 512, widths: [1, 64], new RuntimeOptions { Kv = KvFormat.F16 });
        using var c32 = f32.CreateCache();
        using var c16 = f16.CreateCache();
        Assert.Equal(KvFormat.F16, c16.Format);
        Assert.Equal(c32.Bytes / 2, c16.Bytes);
        Assert.Equal(c32.SlotBytes / 2, c16.SlotBytes);

        // Prefill moves the cache from the 256-slot bucket to the next: the rows move with it in either format.
        int[] longer = [.. Enumerable.Repeat(prompt, 300 / prompt.Length + 1).SelectMany(p => p).Take(300)];
        var a = new Generator(f32).Prefill(c32, longer);
        var b = new Generator(f16).Prefill(c16, longer);
        Assert.True(c16.Bucket > 256);
        TestModels.AssertClose(a, b, 0.05, "last logits, float16 KV against float32");
        Assert.Equal(System.Numerics.Tensors.TensorPrimitives.IndexOfMax(a), System.Numerics.Tensors.TensorPrimitives.IndexOfMax(b));

        // The cache holds float16 values: keys read back as float16 equal the float32 keys rounded.
        var k32 = c32.KeyValue(0).GetTensorDataAsSpan<float>();
        var k16 = c16.KeyValue(0).GetTensorDataAsSpan<Float16>();
        for (int i = 0; i < 64; i++)
        {
            Assert.True(Math.Abs(k32[i] - (float)k16[i]) <= Math.Max(1e-3, Math.Abs(k32[i]) * 2e-3), $"key {i}: {k32[i]} against {(float)k16[i]}");
        }
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Speculative_greedy_should_equal_plain_greedy_with_a_float16_cache(bool adaptive)
    {
        var demo = Demo.Value;
        using var rt = new OrtModelRuntime(demo.Weights, capacity: 2048, widths: [1, 4, 8, 64], new RuntimeOptions { Kv = KvFormat.F16 });
        TestModels.AssertSpeculationLossless(demo, rt, adaptive);
    }

    private static float[] Halves(byte[] raw) => [.. System.Runtime.InteropServices.MemoryMarshal.Cast<byte, Half>(raw).ToArray().Select(h => (float)h)];

    [Fact]
    public void Prefix_cache_should_hold_float16_rows_and_start_the_same_generation()
    {
        var demo = Demo.Value;
        using var rt = new OrtModelRuntime(demo.Weights, capacity: 2048, widths: [1, 64], new RuntimeOptions { Kv = KvFormat.F16 });
        var plain = new Generator(rt);
        var items = WorkloadItem.Load(Path.Combine(Paths.RepoRoot, "workloads", "rag-shared.jsonl")).GroupBy(w => w.Document).First().Take(3).ToList();
        var prefix = new PrefixCache();
        foreach (var item in items)
        {
            int[] prompt = demo.Tokenizer.Encode(PromptTemplate.Render(item.Context, item.Prompt, demo.HasRoleTokens));
            var expected = plain.Generate(prompt, 24, new SamplingOptions(), demo.StopTokens).Tokens;

            var hit = prefix.Lookup(prompt);
            using var cache = rt.CreateCache();
            hit.CopyInto(cache);
            var last = plain.Prefill(cache, prompt.AsSpan(hit.Tokens));
            prefix.Insert(prompt, cache, null, long.MaxValue);
            Assert.Equal(prefix.Bytes, prefix.BlockCount * cache.SlotBytesFor(prefix.BlockTokens));

            using var fresh = rt.CreateCache();
            plain.Prefill(fresh, prompt);
            var (x, y) = (new byte[cache.SlotBytesFor(hit.Tokens)], new byte[fresh.SlotBytesFor(hit.Tokens)]);
            cache.CopySlotsTo(0, hit.Tokens, x);
            fresh.CopySlotsTo(0, hit.Tokens, y);
            // The cached rows (from other prompts, chunked otherwise) are what a fresh prefill writes, to float16 rounding.
            if (hit.Tokens > 0)
            {
                TestModels.AssertClose(Halves(y), Halves(x), 2e-3, "cached float16 keys and values");
            }

            Assert.Equal(expected[0], System.Numerics.Tensors.TensorPrimitives.IndexOfMax(last));
        }

        Assert.True(prefix.Lookups.Hits >= 2);
    }
}
