namespace CoordGen.Engine.Model;

/// <summary>
/// The published shapes of popular small checkpoints: targets for random-weight stand-ins
/// (<c>coordgen model synth</c>) and for function-preserving twins (<c>coordgen model inflate</c>).
/// </summary>
public static class ShapeCatalog
{
    public static readonly IReadOnlyDictionary<string, ModelConfig> Shapes = new Dictionary<string, ModelConfig>(StringComparer.Ordinal)
    {
        ["smollm2-135m"] = Llama(576, 1536, 30, 9, 3, 64, 49152, 100000f, tied: true, bias: false, arch: "LlamaForCausalLM"),
        ["smollm2-360m"] = Llama(960, 2560, 32, 15, 5, 64, 49152, 100000f, tied: true, bias: false, arch: "LlamaForCausalLM"),
        ["qwen2.5-0.5b"] = Llama(896, 4864, 24, 14, 2, 64, 151936, 1000000f, tied: true, bias: true, arch: "Qwen2ForCausalLM"),
        ["llama-3.2-1b"] = Llama(2048, 8192, 16, 32, 8, 64, 128256, 500000f, tied: true, bias: false, arch: "LlamaForCausalLM"),
    };

    /// <summary>The shape of that name, or an error that lists the known ones.</summary>
    public static ModelConfig Get(string name) => Shapes.TryGetValue(name, out var c)
        ? c
        : throw new ArgumentException($"unknown shape '{name}'; choose one of {string.Join(", ", Shapes.Keys)}.");

    private static ModelConfig Llama(int hidden, int inter, int layers, int heads, int kv, int headDim, int vocab, float theta, bool tied, bool bias, string arch) => new()
    {
        Architecture = arch,
        HiddenSize = hidden,
        IntermediateSize = inter,
        NumLayers = layers,
        NumHeads = heads,
        NumKvHeads = kv,
        HeadDim = headDim,
        RmsNormEps = 1e-5f,
        RopeTheta = theta,
        VocabSize = vocab,
        MaxPositionEmbeddings = 8192,
        TieWordEmbeddings = tied,
        AttentionBias = bias,
        BosTokenId = 0,
        EosTokenIds = [0],
    };
}
