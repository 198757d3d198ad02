using System.Text;
using System.Text.Json.Nodes;
using CoordGen.Host.Serving;

namespace CoordGen.Host.Tests;

/// <summary>
/// Seeded random mutations of valid chat and completion requests: values replaced by other JSON types and
/// extremes, fields removed or added, lone surrogate escapes, truncated or byte-flipped bodies. Every
/// request keeps a small max_tokens unless the mutation is of max_tokens itself, so a run stays short.
/// </summary>
public static class RequestFuzzer
{
    private static readonly string[] Seeds =
    [
        """{"messages": [{"role": "system", "content": "The keeper lit the lamp."}, {"role": "user", "content": "Summarize."}], "max_tokens": 4, "temperature": 0.7, "top_p": 0.9, "seed": 3, "stop": ["\n"], "stream": false}""",
        """{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_tokens": 4, "stream": true, "stream_options": {"include_usage": true}, "speculation": {"method": "sam+ours", "width": 8}}""",
        """{"prompt": "The keeper", "max_tokens": 4, "top_k": 5, "n": 1, "stop": "x"}""",
        """{"prompt": ["The keeper"], "max_tokens": 3, "logprobs": null, "echo": false, "best_of": 1, "model": "coordgen-demo"}""",
    ];

    private static readonly string[] Replacements =
    [
        "null", "true", "false", "0", "-1", "1", "2.5", "1e308", "-1e308", "9223372036854775807", "18446744073709551616", "\"\"", "\"x\"",
        "\"\\ud800\"", "\"\\udfff tail\"", "\"\\u0000\"", "[]", "[null]", "[1, 2, 3]", "{}", "{\"type\": \"text\"}", "{\"a\": {\"b\": [1]}}",
        "\"" + new string('z', 5000) + "\"",
    ];

    public static IEnumerable<(string Path, byte[] Body)> Mutations(int seed, int count)
    {
        var rng = new Random(seed);
        for (int i = 0; i < count; i++)
        {
            string source = Seeds[rng.Next(Seeds.Length)];
            string path = source.Contains("\"messages\"", StringComparison.Ordinal) ? "/v1/chat/completions" : "/v1/completions";
            yield return (path, Mutate(source, rng));
        }
    }

    private static byte[] Mutate(string source, Random rng)
    {
        int kind = rng.Next(10);
        if (kind == 0)
        {
            // Truncated body.
            var bytes = Encoding.UTF8.GetBytes(source);
            return bytes[..rng.Next(bytes.Length)];
        }

        if (kind == 1)
        {
            // One byte flipped.
            var bytes = Encoding.UTF8.GetBytes(source);
            bytes[rng.Next(bytes.Length)] ^= (byte)(1 << rng.Next(8));
            return bytes;
        }

        var root = JsonNode.Parse(source)!;
        var containers = new List<JsonNode>();
        Collect(root, containers);
        var target = containers[rng.Next(containers.Count)];
        switch (kind)
        {
            case 2 when target is JsonObject o && o.Count > 0:
            {
                string key = o.ElementAt(rng.Next(o.Count)).Key;
                o.Remove(key);
                break;
            }

            case 3 when target is JsonObject o:
                o["unknown_" + rng.Next(100)] = Placeholder(rng);
                break;
            case 4 when target is JsonArray a:
                a.Add(Placeholder(rng));
                break;
            default:
                Replace(target, rng);
                break;
        }

        if (root is JsonObject top && !top.ContainsKey("max_tokens") && !top.ContainsKey("max_completion_tokens"))
        {
            top["max_tokens"] = 4;
        }

        // Replacement values go in as placeholders and are put back as raw JSON text, since a lone surrogate
        // escape cannot live in a JsonNode.
        string text = root.ToJsonString();
        for (int i = 0; i < Replacements.Length; i++)
        {
            text = text.Replace($"\"@@{i}@@\"", Replacements[i], StringComparison.Ordinal);
        }

        return Encoding.UTF8.GetBytes(text);
    }

    private static JsonNode Placeholder(Random rng) => JsonValue.Create($"@@{rng.Next(Replacements.Length)}@@");

    private static void Replace(JsonNode target, Random rng)
    {
        var value = Placeholder(rng);
        switch (target)
        {
            case JsonObject o when o.Count > 0:
                o[o.ElementAt(rng.Next(o.Count)).Key] = value;
                break;
            case JsonArray a when a.Count > 0:
                a[rng.Next(a.Count)] = value;
                break;
        }
    }

    private static void Collect(JsonNode node, List<JsonNode> into)
    {
        into.Add(node);
        switch (node)
        {
            case JsonObject o:
                foreach (var (_, v) in o)
                {
                    if (v is JsonObject or JsonArray)
                    {
                        Collect(v, into);
                    }
                }

                break;
            case JsonArray a:
                foreach (var v in a)
                {
                    if (v is JsonObject or JsonArray)
                    {
                        Collect(v!, into);
                    }
                }

                break;
        }
    }
}

/// <summary>The request parser in process, over many more mutations than the HTTP test sends.</summary>
public class RequestParserFuzzTests
{
    [Fact]
    public void Parser_should_answer_every_mutated_request_with_a_value_or_an_api_error()
    {
        int refused = 0, parsed = 0;
        foreach (var (path, body) in RequestFuzzer.Mutations(seed: 11, count: 5000))
        {
            try
            {
                using var doc = RequestParser.ReadDocument(body);
                _ = path.Contains("chat", StringComparison.Ordinal) ? RequestParser.ParseChat(doc.RootElement, hasRoleTokens: true) : RequestParser.ParseCompletion(doc.RootElement);
                parsed++;
            }
            catch (ApiException ex)
            {
                Assert.InRange(ex.Status, 400, 499);
                Assert.False(string.IsNullOrWhiteSpace(ex.Message));
                refused++;
            }
        }

        Assert.True(parsed > 100 && refused > 100, $"parsed {parsed}, refused {refused}: the mutations should reach both");
    }
}
