using System.Text.Json;
using CoordGen.Engine.Model;
using CoordGen.Engine.Onnx;
using CoordGen.Engine.Runtime;
using Microsoft.ML.OnnxRuntime;

namespace CoordGen.Engine.Tests;

/// <summary>The ONNX Runtime GenAI export (GenAiExport): GenAI's decoder contract, the same logits as our graphs.</summary>
public class GenAiExportTests
{
    [Theory]
    [InlineData(false, true)]
    [InlineData(true, false)]
    public void Exported_graph_should_compute_our_logits_when_run_as_genai_runs_it(bool bias, bool tied)
    {
        var config = TestModels.Tiny(bias: bias, tied: tied);
        var weights = ModelWeights.Random(config, seed: 11, scale: 0.2f);
        string dir = Directory.CreateTempSubdirectory("coordgen-genai-test-").FullName;
        try
        {
            GenAiExport.Write(weights, dir, contextLength: 64, threads: 1, new HashSet<int> { 1, 7 });
            using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, GenAiExport.ConfigFile)));
            var model = doc.RootElement.GetProperty("model");
            Assert.Equal([1, 7], model.GetProperty("eos_token_id").EnumerateArray().Select(e => e.GetInt32()));
            Assert.Equal(config.NumLayers, model.GetProperty("decoder").GetProperty("num_hidden_layers").GetInt32());

            int[] ids = [3, 9, 27, 4, 4, 18, 30];
            var expected = new List<float[]>();
            using (var rt = new OrtModelRuntime(weights, capacity: 32, widths: [1]))
            {
                TestModels.RunChunked(rt, ids, 1, (_, row) => expected.Add(row));
            }

            // As GenAI does: the prompt (5 tokens) with an empty past, then one token at a time with the presents as the past.
            using var session = new InferenceSession(Path.Combine(dir, GenAiExport.GraphFile));
            var past = Enumerable.Range(0, 2 * config.NumLayers).Select(_ => (Data: Array.Empty<float>(), Length: 0)).ToArray();
            int done = 0;
            foreach (int n in new[] { 5, 1, 1 })
            {
                var inputs = new Dictionary<string, OrtValue>
                {
                    ["input_ids"] = OrtValue.CreateTensorValueFromMemory(ids[done..(done + n)].Select(i => (long)i).ToArray(), [1, n]),
                    ["attention_mask"] = OrtValue.CreateTensorValueFromMemory(Enumerable.Repeat(1L, done + n).ToArray(), [1, done + n]),
                    ["position_ids"] = OrtValue.CreateTensorValueFromMemory(Enumerable.Range(done, n).Select(i => (long)i).ToArray(), [1, n]),
                };
                for (int l = 0; l < config.NumLayers; l++)
                {
                    inputs[$"past_key_values.{l}.key"] = OrtValue.CreateTensorValueFromMemory(past[2 * l].Data, [1, config.NumKvHeads, done, config.HeadDim]);
                    inputs[$"past_key_values.{l}.value"] = OrtValue.CreateTensorValueFromMemory(past[(2 * l) + 1].Data, [1, config.NumKvHeads, done, config.HeadDim]);
                }

                string[] names = ["logits", .. Enumerable.Range(0, config.NumLayers).SelectMany(l => new[] { $"present.{l}.key", $"present.{l}.value" })];
                using var outputs = session.Run(new RunOptions(), inputs, names);
                var logits = outputs[0].GetTensorDataAsSpan<float>().ToArray();
                for (int i = 0; i < n; i++)
                {
                    TestModels.AssertClose(expected[done + i], logits.AsSpan(i * config.VocabSize, config.VocabSize), rel: 1e-5, what: $"position {done + i}");
                }

                for (int k = 0; k < past.Length; k++)
                {
                    Assert.Equal([1, config.NumKvHeads, done + n, config.HeadDim], outputs[1 + k].GetTensorTypeAndShape().Shape);
                    past[k] = (outputs[1 + k].GetTensorDataAsSpan<float>().ToArray(), done + n);
                }

                foreach (var v in inputs.Values)
                {
                    v.Dispose();
                }

                done += n;
            }
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }
}
