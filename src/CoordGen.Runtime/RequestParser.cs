using System.Text;
using System.Text.Json;
using CoordGen.Engine;
using static CoordGen.Messages.GenerationProtocol;

namespace CoordGen;

/// <summary>A completion request after validation: the rendered prompt text and generation settings.</summary>
public sealed record ParsedRequest(
    string? Model,
    string PromptText,
    int? MaxTokens,
    Sampling Sampling,
    IReadOnlyList<string> Stop,
    bool Stream,
    bool IncludeUsage,
    string? Method,
    int? Width,
    string? ContextStore)
{
    /// <summary>A chat request's messages (null for a text completion): the prompt is rendered from them again when a store's documents go first.</summary>
    public IReadOnlyList<(string Role, string Text)>? Turns { get; init; }

    /// <summary>
    /// The prompt with an in-prompt context store's <paramref name="documents"/> first, and the text they
    /// take at its start (whose keys and values the device keeps). A chat gets them as the first lines of
    /// its context section, before its system messages and history; a text completion gets them as its
    /// first lines.
    /// </summary>
    public (string Prompt, string Prefix) PromptWith(string documents, bool hasRoleTokens)
    {
        if (Turns is null)
        {
            string prefix = PromptTemplate.ContextPrefix(documents, modelHasRoleTokens: false);
            return (prefix + PromptText, prefix);
        }

        return (RequestParser.RenderChat([("system", documents), .. Turns], hasRoleTokens), PromptTemplate.ContextPrefix(documents, hasRoleTokens));
    }
}

/// <summary>
/// Reads OpenAI-style request bodies field by field, so that every mistake gets an error naming the
/// field and what it should be. Fields nobody defined are ignored, as OpenAI's clients send many; OpenAI
/// parameters CoordGen does not implement are refused by name unless they hold their neutral value.
/// CoordGen's own fields: <c>context_store</c> (a store to draft from), <c>speculation</c>
/// (<c>{"method": "sam+ours", "width": 8}</c>) and <c>top_k</c>.
/// </summary>
public static class RequestParser
{
    /// <summary>
    /// A request body as JSON, refused clearly when it is not UTF-8, not JSON, or holds a string with a lone
    /// UTF-16 surrogate escape (<c>"\ud800"</c>: JavaScript and Python clients send one when they cut a
    /// string inside an emoji; JSON parsers accept it, but it is no text).
    /// </summary>
    public static JsonDocument ReadDocument(ReadOnlyMemory<byte> body)
    {
        if (!System.Text.Unicode.Utf8.IsValid(body.Span))
        {
            throw ApiException.BadRequest("the request body is not valid UTF-8; encode the JSON (and every string in it) as UTF-8.");
        }

        JsonDocument doc;
        try
        {
            doc = JsonDocument.Parse(body);
        }
        catch (JsonException ex)
        {
            throw ApiException.BadRequest($"the request body is not valid JSON ({ex.Message.Split(" Path:")[0].TrimEnd('.')}); send a UTF-8 JSON object.");
        }

        try
        {
            CheckStrings(doc.RootElement, "$");
            return doc;
        }
        catch
        {
            doc.Dispose();
            throw;
        }
    }

    private static void CheckStrings(JsonElement e, string path)
    {
        switch (e.ValueKind)
        {
            case JsonValueKind.String:
                try
                {
                    _ = e.GetString();
                }
                catch (InvalidOperationException)
                {
                    throw ApiException.BadRequest($"'{path}' holds a lone UTF-16 surrogate escape (such as \\ud800 without its pair), which is not text: send whole characters (a string cut inside an emoji leaves one).", path.TrimStart('$', '.'));
                }

                break;
            case JsonValueKind.Object:
                foreach (var p in e.EnumerateObject())
                {
                    string name;
                    try
                    {
                        name = p.Name;
                    }
                    catch (InvalidOperationException)
                    {
                        throw ApiException.BadRequest($"a field name in '{path}' holds a lone UTF-16 surrogate escape, which is not text: send whole characters.", path.TrimStart('$', '.'));
                    }

                    CheckStrings(p.Value, path + "." + name);
                }

                break;
            case JsonValueKind.Array:
                int i = 0;
                foreach (var item in e.EnumerateArray())
                {
                    CheckStrings(item, $"{path}[{i++}]");
                }

                break;
        }
    }

    /// <summary>
    /// OpenAI parameters CoordGen does not implement: accepted at their neutral value (what a client sends
    /// when it does not mean to use them), refused otherwise with a 400 naming the parameter, never ignored.
    /// </summary>
    private static readonly (string Name, Func<JsonElement, bool> Neutral, string Why)[] Unsupported =
    [
        ("response_format", v => v.ValueKind == JsonValueKind.Object && v.TryGetProperty("type", out var t) && t.ValueKind == JsonValueKind.String && t.ValueEquals("text"), "only {\"type\": \"text\"} is served: no JSON mode or schemas"),
        ("tools", v => v.ValueKind == JsonValueKind.Array && v.GetArrayLength() == 0, "the models here do not call tools"),
        ("tool_choice", v => v.ValueKind == JsonValueKind.String && v.ValueEquals("none"), "the models here do not call tools"),
        ("functions", v => v.ValueKind == JsonValueKind.Array && v.GetArrayLength() == 0, "the models here do not call functions"),
        ("function_call", v => v.ValueKind == JsonValueKind.String && v.ValueEquals("none"), "the models here do not call functions"),
        ("frequency_penalty", v => v.ValueKind == JsonValueKind.Number && v.GetDouble() == 0, "penalties would change the model's distribution, which speculation keeps exactly"),
        ("presence_penalty", v => v.ValueKind == JsonValueKind.Number && v.GetDouble() == 0, "penalties would change the model's distribution, which speculation keeps exactly"),
        ("repetition_penalty", v => v.ValueKind == JsonValueKind.Number && v.GetDouble() == 1, "penalties would change the model's distribution, which speculation keeps exactly"),
        ("logit_bias", v => v.ValueKind == JsonValueKind.Object && !v.EnumerateObject().Any(), "biasing logits is not implemented"),
        ("echo", v => v.ValueKind == JsonValueKind.False, "the prompt is not echoed"),
        ("suffix", v => v.ValueKind == JsonValueKind.String && v.GetString()!.Length == 0, "insertion (text after the completion) is not implemented"),
        ("best_of", v => v.ValueKind == JsonValueKind.Number && v.TryGetInt32(out int n) && n == 1, "one sequence is generated per request"),
        ("prediction", _ => false, "predicted outputs are not taken; put the expected text in a context store (\"context_store\") and speculation drafts from it"),
        ("audio", _ => false, "the models here read and write text only"),
        ("modalities", v => v.ValueKind == JsonValueKind.Array && v.EnumerateArray().All(m => m.ValueKind == JsonValueKind.String && m.ValueEquals("text")), "the models here read and write text only"),
    ];

    private static void RefuseUnsupported(JsonElement body)
    {
        foreach (var (name, neutral, why) in Unsupported)
        {
            if (body.TryGetProperty(name, out var v) && v.ValueKind != JsonValueKind.Null && !neutral(v))
            {
                throw new ApiException(400, $"'{name}' is not supported by CoordGen ({why}); remove it from the request.", name, "unsupported_parameter");
            }
        }
    }

    public static ParsedRequest ParseChat(JsonElement body, bool hasRoleTokens)
    {
        RequireObject(body);
        if (!body.TryGetProperty("messages", out var messages))
        {
            throw ApiException.BadRequest("'messages' is required: an array of {\"role\": \"user\", \"content\": \"...\"} objects.", "messages");
        }

        if (messages.ValueKind != JsonValueKind.Array || messages.GetArrayLength() == 0)
        {
            throw ApiException.BadRequest("'messages' must be a non-empty array of {\"role\", \"content\"} objects.", "messages");
        }

        var turns = new List<(string Role, string Text)>();
        int i = 0;
        foreach (var m in messages.EnumerateArray())
        {
            string param = $"messages[{i++}]";
            if (m.ValueKind != JsonValueKind.Object)
            {
                throw ApiException.BadRequest($"'{param}' must be an object with 'role' and 'content'.", param);
            }

            string role = String(m, "role", param + ".role") ?? throw ApiException.BadRequest($"'{param}.role' is required (system, user or assistant).", param + ".role");
            if (role is not ("system" or "developer" or "user" or "assistant"))
            {
                throw ApiException.BadRequest($"'{param}.role' must be system, developer, user or assistant (got '{role}').", param + ".role");
            }

            turns.Add((role, Content(m, param + ".content")));
        }

        string rendered = RenderChat(turns, hasRoleTokens);
        return Common(body, rendered, chat: true) with { Turns = turns };
    }

    /// <summary>
    /// Chat turns into the model's template: system messages and earlier turns form the context section
    /// (what drafting retrieves from); the last message, which must be the user's, is the prompt.
    /// </summary>
    public static string RenderChat(IReadOnlyList<(string Role, string Text)> turns, bool hasRoleTokens)
    {
        if (turns.Count == 0 || turns[^1].Role != "user")
        {
            throw ApiException.BadRequest("the last message must be from the user: it is what the model answers.", "messages");
        }

        string prompt = turns[^1].Text;
        if (string.IsNullOrWhiteSpace(prompt))
        {
            throw ApiException.BadRequest("the last user message is empty: give the model something to answer.", "messages");
        }

        var context = new StringBuilder();
        foreach (var (role, text) in turns.Take(turns.Count - 1))
        {
            if (context.Length > 0)
            {
                context.Append('\n');
            }

            context.Append(role switch
            {
                "user" => "User: " + text,
                "assistant" => "Assistant: " + text,
                _ => text,
            });
        }

        return PromptTemplate.Render(context.Length == 0 ? null : context.ToString(), prompt, hasRoleTokens);
    }

    public static ParsedRequest ParseCompletion(JsonElement body)
    {
        RequireObject(body);
        if (!body.TryGetProperty("prompt", out var p))
        {
            throw ApiException.BadRequest("'prompt' is required: the text to continue.", "prompt");
        }

        string prompt = p.ValueKind switch
        {
            JsonValueKind.String => p.GetString()!,
            JsonValueKind.Array when p.GetArrayLength() == 1 && p[0].ValueKind == JsonValueKind.String => p[0].GetString()!,
            _ => throw ApiException.BadRequest("'prompt' must be a string (or an array holding one string).", "prompt"),
        };
        if (prompt.Length == 0)
        {
            throw ApiException.BadRequest("'prompt' is empty: give the model text to continue.", "prompt");
        }

        return Common(body, prompt, chat: false);
    }

    /// <summary>
    /// Log-probabilities asked for, as the number of alternatives per token (null: none). Chat takes
    /// <c>"logprobs": true</c> with <c>top_logprobs</c> 0-20; completions take <c>"logprobs": N</c> (OpenAI allows
    /// up to 5 there; CoordGen, like vLLM, up to 20).
    /// </summary>
    private static int? Logprobs(JsonElement body, bool chat)
    {
        int max = CoordGen.Engine.Generation.TokenLogprobs.MaxTop;
        if (!chat)
        {
            if (body.TryGetProperty("top_logprobs", out var t) && t.ValueKind != JsonValueKind.Null)
            {
                throw ApiException.BadRequest("'top_logprobs' belongs to /v1/chat/completions; on /v1/completions ask with \"logprobs\": N (0-20 alternatives per token).", "top_logprobs");
            }

            if (body.TryGetProperty("logprobs", out var b) && b.ValueKind is JsonValueKind.False)
            {
                return null;
            }

            int? n = Int(body, "logprobs");
            return n is < 0 || n > max ? throw ApiException.BadRequest($"'logprobs' must be between 0 and {max} (got {n}): the number of alternatives reported per token.", "logprobs") : n;
        }

        bool on = Bool(body, "logprobs") ?? false;
        int? top = Int(body, "top_logprobs");
        if (top is not null && !on)
        {
            throw ApiException.BadRequest("'top_logprobs' needs \"logprobs\": true as well.", "top_logprobs");
        }

        if (top is < 0 || top > max)
        {
            throw ApiException.BadRequest($"'top_logprobs' must be between 0 and {max} (got {top}).", "top_logprobs");
        }

        return on ? top ?? 0 : null;
    }

    private static ParsedRequest Common(JsonElement body, string prompt, bool chat)
    {
        RefuseUnsupported(body);
        if (body.TryGetProperty("n", out var n) && n.ValueKind != JsonValueKind.Null && (n.ValueKind != JsonValueKind.Number || !n.TryGetInt32(out int nv) || nv != 1))
        {
            throw ApiException.BadRequest("'n' must be 1: CoordGen returns one choice per request.", "n");
        }

        int? maxTokens = Int(body, "max_completion_tokens") ?? Int(body, "max_tokens");
        double temperature = Number(body, "temperature") ?? 0;
        double topP = Number(body, "top_p") ?? 1;
        int topK = Int(body, "top_k") ?? 0;
        long seed = body.TryGetProperty("seed", out var s) && s.ValueKind == JsonValueKind.Number && s.TryGetInt64(out long sv) ? sv
            : s.ValueKind is JsonValueKind.Undefined or JsonValueKind.Null ? 0
            : throw ApiException.BadRequest("'seed' must be an integer.", "seed");

        var stop = new List<string>();
        if (body.TryGetProperty("stop", out var st) && st.ValueKind != JsonValueKind.Null)
        {
            if (st.ValueKind == JsonValueKind.String)
            {
                stop.Add(st.GetString()!);
            }
            else if (st.ValueKind == JsonValueKind.Array && st.GetArrayLength() <= 4 && st.EnumerateArray().All(e => e.ValueKind == JsonValueKind.String))
            {
                stop.AddRange(st.EnumerateArray().Select(e => e.GetString()!));
            }
            else
            {
                throw ApiException.BadRequest("'stop' must be a string or an array of up to 4 strings.", "stop");
            }

            ValidStop(stop);
        }

        bool stream = Bool(body, "stream") ?? false;
        bool includeUsage = body.TryGetProperty("stream_options", out var so) && so.ValueKind == JsonValueKind.Object && (Bool(so, "include_usage") ?? false);

        string? method = null;
        int? width = null;
        if (body.TryGetProperty("speculation", out var spec) && spec.ValueKind != JsonValueKind.Null)
        {
            if (spec.ValueKind != JsonValueKind.Object)
            {
                throw ApiException.BadRequest("'speculation' must be an object such as {\"method\": \"sam+ours\", \"width\": 8}.", "speculation");
            }

            method = String(spec, "method", "speculation.method");
            width = Int(spec, "width", "speculation.width");
            if (method is not null and not ("ar" or "pld" or "sam" or "sam+history" or "pld+ours" or "sam+ours"))
            {
                throw ApiException.BadRequest($"'speculation.method' must be one of ar, pld, sam, sam+history, pld+ours, sam+ours (got '{method}').", "speculation.method");
            }

            if (width is < 2 or > 256)
            {
                throw ApiException.BadRequest($"'speculation.width' must be between 2 and 256 (got {width}).", "speculation.width");
            }
        }

        string? store = String(body, "context_store", "context_store");
        var sampling = ValidSampling(temperature, topP, topK, seed) with { Logprobs = Logprobs(body, chat) };
        return new ParsedRequest(String(body, "model", "model"), prompt, maxTokens, sampling, stop, stream, includeUsage, method, width, store);
    }

    /// <summary>Sampling settings checked as every edge checks them (HTTP and the IChatClient), with errors naming the parameter.</summary>
    public static Sampling ValidSampling(double temperature, double topP, int topK, long seed)
    {
        if (!double.IsFinite(temperature) || temperature is < 0 or > 2)
        {
            throw ApiException.BadRequest($"'temperature' must be between 0 and 2 (got {temperature}); 0 is greedy.", "temperature");
        }

        if (!double.IsFinite(topP) || topP is <= 0 or > 1)
        {
            throw ApiException.BadRequest($"'top_p' must be in (0, 1] (got {topP}).", "top_p");
        }

        if (topK < 0)
        {
            throw ApiException.BadRequest($"'top_k' must be 0 (off) or positive (got {topK}).", "top_k");
        }

        return new Sampling((float)temperature, topK, (float)topP, (int)(seed & 0x7fffffff));
    }

    /// <summary>Stop sequences checked as every edge checks them: at most 4, none empty.</summary>
    public static IReadOnlyList<string> ValidStop(IReadOnlyList<string> stop)
    {
        if (stop.Count > 4)
        {
            throw ApiException.BadRequest($"'stop' takes at most 4 sequences (got {stop.Count}).", "stop");
        }

        if (stop.Any(x => string.IsNullOrEmpty(x)))
        {
            throw ApiException.BadRequest("'stop' sequences must not be empty strings.", "stop");
        }

        return stop;
    }

    private static void RequireObject(JsonElement body)
    {
        if (body.ValueKind != JsonValueKind.Object)
        {
            throw ApiException.BadRequest($"the request body must be a JSON object (got {body.ValueKind.ToString().ToLowerInvariant()}).");
        }
    }

    private static string Content(JsonElement m, string param)
    {
        if (!m.TryGetProperty("content", out var c) || c.ValueKind == JsonValueKind.Null)
        {
            throw ApiException.BadRequest($"'{param}' is required: the message text.", param);
        }

        if (c.ValueKind == JsonValueKind.String)
        {
            return c.GetString()!;
        }

        if (c.ValueKind == JsonValueKind.Array)
        {
            var sb = new StringBuilder();
            foreach (var part in c.EnumerateArray())
            {
                if (part.ValueKind != JsonValueKind.Object || String(part, "type", param) != "text" || String(part, "text", param) is not { } t)
                {
                    throw ApiException.BadRequest($"'{param}' parts must be {{\"type\": \"text\", \"text\": \"...\"}}: CoordGen's models read text only.", param);
                }

                sb.Append(t);
            }

            return sb.ToString();
        }

        throw ApiException.BadRequest($"'{param}' must be a string or an array of text parts.", param);
    }

    public static string? String(JsonElement o, string name, string param)
    {
        if (!o.TryGetProperty(name, out var v) || v.ValueKind == JsonValueKind.Null)
        {
            return null;
        }

        return v.ValueKind == JsonValueKind.String ? v.GetString() : throw ApiException.BadRequest($"'{param}' must be a string (got {v.ValueKind.ToString().ToLowerInvariant()}).", param);
    }

    private static double? Number(JsonElement o, string name)
    {
        if (!o.TryGetProperty(name, out var v) || v.ValueKind == JsonValueKind.Null)
        {
            return null;
        }

        return v.ValueKind == JsonValueKind.Number ? v.GetDouble() : throw ApiException.BadRequest($"'{name}' must be a number (got {v.ValueKind.ToString().ToLowerInvariant()}).", name);
    }

    private static int? Int(JsonElement o, string name, string? param = null)
    {
        param ??= name;
        if (!o.TryGetProperty(name, out var v) || v.ValueKind == JsonValueKind.Null)
        {
            return null;
        }

        if (v.ValueKind != JsonValueKind.Number || !v.TryGetInt64(out long x))
        {
            throw ApiException.BadRequest($"'{param}' must be an integer (got {(v.ValueKind == JsonValueKind.Number ? v.GetRawText() : v.ValueKind.ToString().ToLowerInvariant())}).", param);
        }

        return x > int.MaxValue ? int.MaxValue : x < int.MinValue ? int.MinValue : (int)x;
    }

    public static bool? Bool(JsonElement o, string name)
    {
        if (!o.TryGetProperty(name, out var v) || v.ValueKind == JsonValueKind.Null)
        {
            return null;
        }

        return v.ValueKind switch
        {
            JsonValueKind.True => true,
            JsonValueKind.False => false,
            _ => throw ApiException.BadRequest($"'{name}' must be true or false.", name),
        };
    }
}
