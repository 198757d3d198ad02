using System.Text.Json;
using CoordGen.Engine.Model;
using CoordGen.Engine.Tokenization;

namespace CoordGen.Engine.Tests;

public class RopeScalingTests
{
    private static ModelConfig Llama32(string scaling) => ModelConfig.Parse(JsonDocument.Parse($$"""
        {"architectures":["LlamaForCausalLM"],"hidden_size":2048,"intermediate_size":8192,"num_hidden_layers":16,
         "num_attention_heads":32,"num_key_value_heads":8,"head_dim":64,"vocab_size":128256,"rope_theta":500000.0,
         "rope_scaling":{{scaling}}}
        """).RootElement);

    [Fact]
    public void Llama3_scaling_should_match_the_reference_frequencies()
    {
        var c = Llama32("""{"rope_type":"llama3","factor":32.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}""");
        var inv = c.RopeInverseFrequencies();
        // Values from an independent Python implementation of the Hugging Face llama3 rule.
        double[] expected = [1.0, 0.0165604, 8.57026e-06, 1.10288e-06, 9.41831e-08];
        int[] at = [0, 10, 20, 25, 31];
        for (int i = 0; i < at.Length; i++)
        {
            Assert.Equal(expected[i], inv[at[i]], expected[i] * 1e-5);
        }
    }

    [Fact]
    public void Unknown_rope_scaling_should_be_rejected_with_advice()
    {
        var ex = Assert.Throws<ModelLoadException>(() => Llama32("""{"rope_type":"yarn","factor":4.0}"""));
        Assert.Contains("yarn", ex.Message);
    }

    [Fact]
    public void Digits_pre_tokenizer_should_split_numbers_into_single_digits()
    {
        var demo = Path.Combine(Paths.DemoModel, "tokenizer.json");
        var json = File.ReadAllText(demo).Replace("\"pre_tokenizer\": {\"type\": \"ByteLevel\"",
            "\"pre_tokenizer\": {\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Digits\", \"individual_digits\": true}, {\"type\": \"ByteLevel\"");
        Assert.NotEqual(File.ReadAllText(demo), json);
        json = json.Replace("\"use_regex\": true}, \"post_processor\"", "\"use_regex\": true}]}, \"post_processor\"");
        string path = Path.GetTempFileName();
        try
        {
            File.WriteAllText(path, json);
            var tok = HfTokenizer.Load(path);
            var ids = tok.Encode("year 2026");
            Assert.Equal("year 2026", tok.Decode(ids));
            Assert.Equal(["2", "0", "2", "6"], ids.Select(i => tok.Decode([i])).TakeLast(4).ToArray());
        }
        finally
        {
            File.Delete(path);
        }
    }
}
