using System.Text.Json;
using System.Text.RegularExpressions;
using Microsoft.ML.Tokenizers;

namespace CoordGen.Engine.Tokenization;

/// <summary>
/// Loads a Hugging Face <c>tokenizer.json</c> holding a byte-level BPE model into
/// Microsoft.ML.Tokenizers' <see cref="BpeTokenizer"/>. This class only adapts the file format:
/// pre-tokenization, merging and byte mapping are done by Microsoft.ML.Tokenizers.
/// </summary>
public sealed class HfTokenizer
{
    /// <summary>GPT-2's pre-tokenization pattern, used by the ByteLevel pre-tokenizer with use_regex.</summary>
    public const string Gpt2Pattern = @"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

    /// <summary>GPT-2's pattern with single digits as pieces (a Digits(individual_digits) pre-tokenizer before ByteLevel).</summary>
    public const string Gpt2IndividualDigitsPattern = @"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

    private readonly BpeTokenizer _bpe;
    private readonly string?[] _pieces;

    private HfTokenizer(BpeTokenizer bpe, Dictionary<string, int> special, int vocabSize, string?[] pieces)
    {
        _bpe = bpe;
        SpecialTokens = special;
        VocabSize = vocabSize;
        _pieces = pieces;
    }

    public IReadOnlyDictionary<string, int> SpecialTokens { get; }

    public int VocabSize { get; }

    public static HfTokenizer Load(string path)
    {
        if (!File.Exists(path))
        {
            throw new Model.ModelLoadException($"tokenizer.json not found at '{path}'. Copy the checkpoint's tokenizer.json into the model directory.");
        }

        using var doc = JsonDocument.Parse(File.ReadAllText(path));
        var root = doc.RootElement;
        var model = root.GetProperty("model");
        string type = model.TryGetProperty("type", out var t) ? t.GetString() ?? "" : "";
        if (type != "BPE")
        {
            throw new Model.ModelLoadException($"'{path}': tokenizer model type '{type}' is not supported; CoordGen loads byte-level BPE tokenizers.");
        }

        var vocab = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (var p in model.GetProperty("vocab").EnumerateObject())
        {
            vocab[p.Name] = p.Value.GetInt32();
        }

        var merges = new List<string>();
        foreach (var m in model.GetProperty("merges").EnumerateArray())
        {
            merges.Add(m.ValueKind == JsonValueKind.Array ? $"{m[0].GetString()} {m[1].GetString()}" : m.GetString()!);
        }

        var special = new Dictionary<string, int>(StringComparer.Ordinal);
        if (root.TryGetProperty("added_tokens", out var added))
        {
            foreach (var a in added.EnumerateArray())
            {
                special[a.GetProperty("content").GetString()!] = a.GetProperty("id").GetInt32();
            }
        }

        string pattern = FindPattern(root.TryGetProperty("pre_tokenizer", out var pre) ? pre : default, path);
        var options = new BpeOptions(vocab.Where(kv => !special.ContainsKey(kv.Key)))
        {
            Merges = merges,
            ByteLevel = true,
            SpecialTokens = special,
            PreTokenizer = new RegexPreTokenizer(new Regex(pattern, RegexOptions.Compiled), special),
        };
        int vocabSize = Math.Max(vocab.Count == 0 ? 0 : vocab.Values.Max() + 1, special.Count == 0 ? 0 : special.Values.Max() + 1);
        var pieces = new string?[vocabSize];
        foreach (var (piece, id) in vocab.Concat(special))
        {
            pieces[id] = piece;
        }

        return new HfTokenizer(BpeTokenizer.Create(options), special, vocabSize, pieces);
    }

    private static string FindPattern(JsonElement pre, string path)
    {
        if (pre.ValueKind != JsonValueKind.Object)
        {
            throw new Model.ModelLoadException($"'{path}': no pre_tokenizer; CoordGen expects a byte-level BPE tokenizer (ByteLevel or Split+ByteLevel).");
        }

        string kind = pre.GetProperty("type").GetString() ?? "";
        switch (kind)
        {
            case "ByteLevel":
                return Gpt2Pattern;
            case "Split" when pre.TryGetProperty("pattern", out var pat) && pat.TryGetProperty("Regex", out var rx):
                return rx.GetString()!;
            case "Sequence":
                bool digits = false;
                foreach (var p in pre.GetProperty("pretokenizers").EnumerateArray())
                {
                    string k = p.GetProperty("type").GetString() ?? "";
                    if (k == "Digits" && p.TryGetProperty("individual_digits", out var ind) && ind.GetBoolean())
                    {
                        // SmolLM2-style: every digit its own piece, then GPT-2's pattern on the rest.
                        digits = true;
                    }
                    else if (k == "Split" || (k == "ByteLevel" && (!p.TryGetProperty("use_regex", out var ur) || ur.GetBoolean())))
                    {
                        string pattern = FindPattern(p, path);
                        return digits && pattern == Gpt2Pattern ? Gpt2IndividualDigitsPattern : pattern;
                    }
                }

                return Gpt2Pattern;
            default:
                throw new Model.ModelLoadException($"'{path}': pre_tokenizer '{kind}' is not supported; CoordGen expects ByteLevel or Split+ByteLevel.");
        }
    }

    /// <summary>Token ids of <paramref name="text"/>; special-token strings in the text map to their ids.</summary>
    public int[] Encode(string text) => [.. _bpe.EncodeToIds(text)];

    public string Decode(IEnumerable<int> ids) => _bpe.Decode(ids) ?? "";

    public int? TokenId(string token) => SpecialTokens.TryGetValue(token, out int id) ? id : null;

    /// <summary>
    /// The bytes one token stands for (a token may hold part of a UTF-8 character, so its text alone can
    /// be lossy): the vocabulary piece with byte-level BPE's character-for-byte mapping undone; a special
    /// token's own text. Empty for an id outside the vocabulary.
    /// </summary>
    public byte[] TokenBytes(int id)
    {
        if ((uint)id >= (uint)_pieces.Length || _pieces[id] is not { } piece)
        {
            return [];
        }

        if (SpecialTokens.ContainsKey(piece))
        {
            return System.Text.Encoding.UTF8.GetBytes(piece);
        }

        var bytes = new byte[piece.Length];
        for (int i = 0; i < piece.Length; i++)
        {
            bytes[i] = CharToByte.TryGetValue(piece[i], out byte b) ? b : (byte)'?';
        }

        return bytes;
    }

    // Byte-level BPE writes each byte as a printable character: printable Latin-1 bytes as themselves,
    // the others (controls, space, 0x7F-0xA0, 0xAD) as U+0100 onwards in byte order.
    private static readonly Dictionary<char, byte> CharToByte = BuildCharToByte();

    private static Dictionary<char, byte> BuildCharToByte()
    {
        var map = new Dictionary<char, byte>(256);
        int next = 256;
        for (int b = 0; b < 256; b++)
        {
            bool printable = b is >= '!' and <= '~' or >= 0xA1 and <= 0xAC or >= 0xAE and <= 0xFF;
            map[(char)(printable ? b : next++)] = (byte)b;
        }

        return map;
    }
}
