using CoordGen.Engine.Tokenization;

namespace CoordGen.Engine.Model;

/// <summary>A loaded model directory: config, weights and tokenizer.</summary>
public sealed record ModelBundle(string Directory, ModelConfig Config, ModelWeights Weights, HfTokenizer Tokenizer)
{
    public string Name => Path.GetFileName(Path.TrimEndingDirectorySeparator(Path.GetFullPath(Directory)));

    public bool HasRoleTokens => Tokenizer.TokenId(PromptTemplate.UserToken) is not null;

    /// <summary>Token ids that end generation: the config's eos ids and the template's end token.</summary>
    public IReadOnlySet<int> StopTokens
    {
        get
        {
            var s = new HashSet<int>(Config.EosTokenIds);
            if (Tokenizer.TokenId(PromptTemplate.EndToken) is int end)
            {
                s.Add(end);
            }

            return s;
        }
    }

    public static ModelBundle Load(string dir, IProgress<double>? progress = null)
    {
        if (!System.IO.Directory.Exists(dir))
        {
            throw new ModelLoadException($"Model directory '{dir}' does not exist. Pass --model with a directory holding config.json, model.safetensors and tokenizer.json.");
        }

        var config = ModelConfig.Load(Path.Combine(dir, "config.json"));
        var tokenizer = HfTokenizer.Load(Path.Combine(dir, "tokenizer.json"));
        if (tokenizer.VocabSize > config.VocabSize)
        {
            throw new ModelLoadException($"'{dir}': tokenizer.json has {tokenizer.VocabSize} tokens but config.json says vocab_size {config.VocabSize}. The tokenizer does not belong to this model.");
        }

        var weights = ModelWeights.Load(dir, config, progress);
        return new ModelBundle(dir, config, weights, tokenizer);
    }
}
