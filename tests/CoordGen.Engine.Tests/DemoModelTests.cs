using System.Text;
using System.Text.Json;
using CoordGen.Engine.Generation;
using CoordGen.Engine.Model;
using CoordGen.Engine.Runtime;

namespace CoordGen.Engine.Tests;

/// <summary>The embedded coordgen-demo model: tokenizer parity with the training tool, and graph logits against PyTorch.</summary>
public class DemoModelTests
{
    private static readonly Lazy<ModelBundle> Demo = new(() => ModelBundle.Load(Paths.DemoModel));

    private static JsonDocument Vectors() => JsonDocument.Parse(File.ReadAllText(Path.Combine(Paths.Vectors, "demo.json")));

    [Fact]
    public void Tokenizer_should_produce_the_training_tools_ids_when_encoding_the_reference_texts()
    {
        using var doc = Vectors();
        foreach (var c in doc.RootElement.GetProperty("cases").EnumerateArray())
        {
            string text = c.GetProperty("text").GetString()!;
            int[] expected = c.GetProperty("input_ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();
            Assert.Equal(expected, Demo.Value.Tokenizer.Encode(text));
        }
    }

    [Theory]
    [InlineData("plain ascii, with punctuation!? and  double  spaces\n\ttabs")]
    [InlineData("Ünïcödé — “quotes”, emoji 🎉👩‍💻, CJK 日本語の文章, Arabic العربية")]
    [InlineData("{\"id\": \"btn_7\", \"role\": \"button\"} <|end|> 12345 67.89")]
    [InlineData("\u0000\u0001 control\u007f bytes")]
    public void Tokenizer_should_round_trip_arbitrary_utf8(string text)
    {
        var tok = Demo.Value.Tokenizer;
        Assert.Equal(text, tok.Decode(tok.Encode(text)));
    }

    [Fact]
    public void Tokenizer_should_round_trip_random_unicode_strings()
    {
        var rng = new Random(5);
        var tok = Demo.Value.Tokenizer;
        for (int i = 0; i < 200; i++)
        {
            var sb = new StringBuilder();
            int len = rng.Next(1, 40);
            while (sb.Length < len)
            {
                int cp = rng.Next(4) switch { 0 => rng.Next(0x20, 0x7f), 1 => rng.Next(0xa0, 0x800), 2 => rng.Next(0x3000, 0xd7ff), _ => rng.Next(0x10000, 0x1ffff) };
                sb.Append(char.ConvertFromUtf32(cp));
            }

            string s = sb.ToString();
            Assert.Equal(s, tok.Decode(tok.Encode(s)));
        }
    }

    [Fact]
    public void Compiled_graph_should_match_pytorch_logits_when_running_the_demo_model()
    {
        using var doc = Vectors();
        int[] slice = doc.RootElement.GetProperty("vocab_slice").EnumerateArray().Select(e => e.GetInt32()).ToArray();
        var demo = Demo.Value;
        using var rt = new OrtModelRuntime(demo.Weights, capacity: 128, widths: [16]);
        foreach (var c in doc.RootElement.GetProperty("cases").EnumerateArray())
        {
            int[] ids = c.GetProperty("input_ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();
            int[] argmax = c.GetProperty("argmax").EnumerateArray().Select(e => e.GetInt32()).ToArray();
            var expected = c.GetProperty("logits_slice").EnumerateArray().Select(r => r.EnumerateArray().Select(e => e.GetSingle()).ToArray()).ToArray();
            TestModels.RunChunked(rt, ids, 16, (pos, row) =>
            {
                TestModels.AssertClose(expected[pos], slice.Select(j => row[j]).ToArray(), rel: 1e-4, what: $"position {pos}");
                Assert.Equal(argmax[pos], Sampler.Argmax(row));
            });
        }
    }
}
