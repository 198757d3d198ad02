using System.Text.Json;

namespace CoordGen.Engine.Model;

/// <summary>
/// The subset of a Hugging Face <c>config.json</c> that a Llama-family decoder needs.
/// Llama, Qwen2 and Mistral-style checkpoints load as is; Qwen2 adds q/k/v projection biases.
/// </summary>
public sealed record ModelConfig
{
    public static readonly IReadOnlySet<string> SupportedArchitectures = new HashSet<string>(StringComparer.Ordinal)
    {
        "LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM",
    };

    public required string Architecture { get; init; }
    public required int HiddenSize { get; init; }
    public required int IntermediateSize { get; init; }
    public required int NumLayers { get; init; }
    public required int NumHeads { get; init; }
    public required int NumKvHeads { get; init; }
    public required int HeadDim { get; init; }
    public required float RmsNormEps { get; init; }
    public required float RopeTheta { get; init; }
    public required int VocabSize { get; init; }
    public required int MaxPositionEmbeddings { get; init; }
    public required bool TieWordEmbeddings { get; init; }
    public required bool AttentionBias { get; init; }
    public int? BosTokenId { get; init; }

    /// <summary>RoPE scaling from config.json's rope_scaling (null = none).</summary>
    public RopeScaling? RopeScaling { get; init; }
    public IReadOnlyList<int> EosTokenIds { get; init; } = [];

    public int KvDim => NumKvHeads * HeadDim;

    /// <summary>RoPE inverse frequencies (D/2 values), with the configured scaling applied.</summary>
    public float[] RopeInverseFrequencies()
    {
        var inv = new double[HeadDim / 2];
        for (int i = 0; i < inv.Length; i++)
        {
            inv[i] = 1.0 / Math.Pow(RopeTheta, 2.0 * i / HeadDim);
        }

        RopeScaling?.Apply(inv);
        return inv.Select(v => (float)v).ToArray();
    }
    public int QDim => NumHeads * HeadDim;

    /// <summary>Parameter count implied by the shape (embeddings counted once when tied).</summary>
    public long ParameterCount
    {
        get
        {
            long perLayer = (long)HiddenSize * QDim + 2L * HiddenSize * KvDim + (long)QDim * HiddenSize
                + 3L * HiddenSize * IntermediateSize + 2L * HiddenSize;
            if (AttentionBias)
            {
                perLayer += QDim + 2L * KvDim;
            }

            long embed = (long)VocabSize * HiddenSize;
            return embed * (TieWordEmbeddings ? 1 : 2) + NumLayers * perLayer + HiddenSize;
        }
    }

    public static ModelConfig Load(string path)
    {
        if (!File.Exists(path))
        {
            throw new ModelLoadException($"config.json not found at '{path}'. A model directory needs config.json, model.safetensors and tokenizer.json in the Hugging Face layout.");
        }

        using var doc = JsonDocument.Parse(File.ReadAllText(path));
        return Parse(doc.RootElement, path);
    }

    public static ModelConfig Parse(JsonElement root, string source = "config.json")
    {
        string arch = root.TryGetProperty("architectures", out var archs) && archs.ValueKind == JsonValueKind.Array && archs.GetArrayLength() > 0
            ? archs[0].GetString() ?? ""
            : root.TryGetProperty("model_type", out var mt) ? MapModelType(mt.GetString()) : "";
        if (!SupportedArchitectures.Contains(arch))
        {
            throw new ModelLoadException($"{source}: unsupported architecture '{arch}'. CoordGen compiles {string.Join(", ", SupportedArchitectures)}; convert the checkpoint to one of these or pick another model.");
        }

        int Int(string key, int? fallback = null)
        {
            if (root.TryGetProperty(key, out var v) && v.ValueKind == JsonValueKind.Number)
            {
                return v.GetInt32();
            }

            return fallback ?? throw new ModelLoadException($"{source}: required key '{key}' is missing or not a number.");
        }

        float Float(string key, float fallback)
            => root.TryGetProperty(key, out var v) && v.ValueKind == JsonValueKind.Number ? v.GetSingle() : fallback;

        bool Bool(string key, bool fallback)
            => root.TryGetProperty(key, out var v) && (v.ValueKind == JsonValueKind.True || v.ValueKind == JsonValueKind.False) ? v.GetBoolean() : fallback;

        int hidden = Int("hidden_size");
        int heads = Int("num_attention_heads");
        int headDim = root.TryGetProperty("head_dim", out var hd) && hd.ValueKind == JsonValueKind.Number ? hd.GetInt32() : hidden / heads;
        var eos = new List<int>();
        if (root.TryGetProperty("eos_token_id", out var e))
        {
            if (e.ValueKind == JsonValueKind.Number)
            {
                eos.Add(e.GetInt32());
            }
            else if (e.ValueKind == JsonValueKind.Array)
            {
                eos.AddRange(e.EnumerateArray().Where(x => x.ValueKind == JsonValueKind.Number).Select(x => x.GetInt32()));
            }
        }

        var cfg = new ModelConfig
        {
            Architecture = arch,
            HiddenSize = hidden,
            IntermediateSize = Int("intermediate_size"),
            NumLayers = Int("num_hidden_layers"),
            NumHeads = heads,
            NumKvHeads = Int("num_key_value_heads", heads),
            HeadDim = headDim,
            RmsNormEps = Float("rms_norm_eps", 1e-6f),
            RopeTheta = Float("rope_theta", 10000f),
            VocabSize = Int("vocab_size"),
            MaxPositionEmbeddings = Int("max_position_embeddings", 2048),
            TieWordEmbeddings = Bool("tie_word_embeddings", false),
            AttentionBias = arch == "Qwen2ForCausalLM" || Bool("attention_bias", false),
            BosTokenId = root.TryGetProperty("bos_token_id", out var b) && b.ValueKind == JsonValueKind.Number ? b.GetInt32() : null,
            RopeScaling = root.TryGetProperty("rope_scaling", out var rs) && rs.ValueKind == JsonValueKind.Object ? RopeScaling.Parse(rs, source) : null,
            EosTokenIds = eos,
        };
        cfg.Validate(source);
        return cfg;
    }

    private static string MapModelType(string? modelType) => modelType switch
    {
        "llama" => "LlamaForCausalLM",
        "qwen2" => "Qwen2ForCausalLM",
        "mistral" => "MistralForCausalLM",
        _ => modelType ?? "",
    };

    public void Validate(string source = "config")
    {
        void Require(bool ok, string what)
        {
            if (!ok)
            {
                throw new ModelLoadException($"{source}: {what}");
            }
        }

        Require(HiddenSize > 0 && IntermediateSize > 0 && NumLayers > 0 && VocabSize > 0, "sizes must be positive.");
        Require(NumHeads > 0 && NumKvHeads > 0 && NumHeads % NumKvHeads == 0, $"num_attention_heads ({NumHeads}) must be a multiple of num_key_value_heads ({NumKvHeads}).");
        Require(HeadDim > 0 && HeadDim % 2 == 0, $"head_dim ({HeadDim}) must be even for rotary embeddings.");
    }

    public string ToJson()
    {
        var o = new Dictionary<string, object?>
        {
            ["architectures"] = new[] { Architecture },
            ["model_type"] = Architecture switch { "Qwen2ForCausalLM" => "qwen2", "MistralForCausalLM" => "mistral", _ => "llama" },
            ["hidden_size"] = HiddenSize,
            ["intermediate_size"] = IntermediateSize,
            ["num_hidden_layers"] = NumLayers,
            ["num_attention_heads"] = NumHeads,
            ["num_key_value_heads"] = NumKvHeads,
            ["head_dim"] = HeadDim,
            ["rms_norm_eps"] = RmsNormEps,
            ["rope_theta"] = RopeTheta,
            ["vocab_size"] = VocabSize,
            ["max_position_embeddings"] = MaxPositionEmbeddings,
            ["tie_word_embeddings"] = TieWordEmbeddings,
            ["attention_bias"] = AttentionBias,
            ["hidden_act"] = "silu",
            ["bos_token_id"] = BosTokenId,
            ["eos_token_id"] = EosTokenIds.Count == 1 ? EosTokenIds[0] : EosTokenIds,
        };
        if (RopeScaling is { } rs)
        {
            o["rope_scaling"] = new Dictionary<string, object>
            {
                ["rope_type"] = rs.Type,
                ["factor"] = rs.Factor,
                ["low_freq_factor"] = rs.LowFreqFactor,
                ["high_freq_factor"] = rs.HighFreqFactor,
                ["original_max_position_embeddings"] = rs.OriginalMaxPositions,
            };
        }

        return JsonSerializer.Serialize(o, new JsonSerializerOptions { WriteIndented = true });
    }
}

/// <summary>
/// RoPE scaling: "linear" divides every frequency by the factor; "llama3" (Llama 3.1/3.2) keeps high
/// frequencies, divides low ones and interpolates between, as Hugging Face's reference does.
/// </summary>
public sealed record RopeScaling(string Type, double Factor, double LowFreqFactor, double HighFreqFactor, int OriginalMaxPositions)
{
    public static RopeScaling Parse(JsonElement e, string source)
    {
        string type = (e.TryGetProperty("rope_type", out var t) ? t.GetString() : e.TryGetProperty("type", out var t2) ? t2.GetString() : null) ?? "default";
        double D(string k, double fallback) => e.TryGetProperty(k, out var v) && v.ValueKind == JsonValueKind.Number ? v.GetDouble() : fallback;
        var r = new RopeScaling(type, D("factor", 1), D("low_freq_factor", 1), D("high_freq_factor", 4), (int)D("original_max_position_embeddings", 8192));
        if (type is not ("default" or "linear" or "llama3"))
        {
            throw new ModelLoadException($"{source}: rope_scaling type '{type}' is not supported; CoordGen implements linear and llama3. Remove rope_scaling to use plain RoPE at short contexts.");
        }

        return r;
    }

    public void Apply(double[] inv)
    {
        if (Type == "linear")
        {
            for (int i = 0; i < inv.Length; i++)
            {
                inv[i] /= Factor;
            }
        }
        else if (Type == "llama3")
        {
            double lowWavelen = OriginalMaxPositions / LowFreqFactor;
            double highWavelen = OriginalMaxPositions / HighFreqFactor;
            for (int i = 0; i < inv.Length; i++)
            {
                double wavelen = 2 * Math.PI / inv[i];
                if (wavelen > lowWavelen)
                {
                    inv[i] /= Factor;
                }
                else if (wavelen >= highWavelen)
                {
                    double smooth = ((OriginalMaxPositions / wavelen) - LowFreqFactor) / (HighFreqFactor - LowFreqFactor);
                    inv[i] = ((1 - smooth) * inv[i] / Factor) + (smooth * inv[i]);
                }
            }
        }
    }
}

/// <summary>A model directory that cannot be loaded; the message says what to fix.</summary>
public sealed class ModelLoadException(string message, Exception? inner = null) : Exception(message, inner);
