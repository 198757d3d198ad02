using CoordGen.Engine.Model;

namespace CoordGen.Actors.Tests;

/// <summary>The small random-weight Llama the actor specs run on (real graphs, milliseconds per step).</summary>
internal static class TinyModel
{
    public static readonly ModelConfig Config = new()
    {
        Architecture = "LlamaForCausalLM",
        HiddenSize = 32,
        IntermediateSize = 48,
        NumLayers = 2,
        NumHeads = 4,
        NumKvHeads = 2,
        HeadDim = 8,
        RmsNormEps = 1e-5f,
        RopeTheta = 10000f,
        VocabSize = 64,
        MaxPositionEmbeddings = 256,
        TieWordEmbeddings = true,
        AttentionBias = false,
    };

    public static ModelWeights Weights(int seed, float scale = 0.5f) => ModelWeights.Random(Config, seed, scale);
}
