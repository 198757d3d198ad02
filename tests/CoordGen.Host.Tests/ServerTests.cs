using System.ClientModel;
using System.Net;
using System.Net.Http.Json;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using OpenAI;
using OpenAI.Chat;

namespace CoordGen.Host.Tests;

/// <summary>A real <c>coordgen serve</c> process called over loopback, by the official OpenAI SDK and by raw HTTP.</summary>
public class ServerTests(ServerProcess server) : IClassFixture<ServerProcess>
{
    private const string Document = "The old lighthouse on the northern cape was kept by a single keeper for forty years. Every evening the keeper climbed the narrow stairs, trimmed the wick and lit the great lamp.";

    private ChatClient Chat() => new("coordgen-demo", new ApiKeyCredential("not-needed"), new OpenAIClientOptions { Endpoint = new Uri(server.BaseUrl, "/v1") });

    [Fact]
    public async Task OpenAI_sdk_should_get_the_same_text_streaming_and_not_when_decoding_greedily()
    {
        var client = Chat();
        ChatMessage[] messages = [new SystemChatMessage(Document), new UserChatMessage("Summarize the document.")];
        var options = new ChatCompletionOptions { MaxOutputTokenCount = 24, Temperature = 0 };

        ChatCompletion whole = await client.CompleteChatAsync(messages, options);
        var streamed = new StringBuilder();
        ChatFinishReason? finish = null;
        await foreach (var update in client.CompleteChatStreamingAsync(messages, options))
        {
            foreach (var part in update.ContentUpdate)
            {
                streamed.Append(part.Text);
            }

            finish ??= update.FinishReason;
        }

        Assert.False(string.IsNullOrWhiteSpace(whole.Content[0].Text));
        Assert.Equal(whole.Content[0].Text, streamed.ToString());
        Assert.Equal(24, whole.Usage.OutputTokenCount);
        Assert.True(whole.Usage.InputTokenCount > 30);
        Assert.Equal(ChatFinishReason.Length, whole.FinishReason);
        Assert.Equal(ChatFinishReason.Length, finish);
    }

    [Fact]
    public async Task OpenAI_sdk_should_list_the_served_model()
    {
        var models = new OpenAIClient(new ApiKeyCredential("not-needed"), new OpenAIClientOptions { Endpoint = new Uri(server.BaseUrl, "/v1") }).GetOpenAIModelClient();
        var list = await models.GetModelsAsync();
        Assert.Contains(list.Value, m => m.Id == "coordgen-demo");
    }

    [Fact]
    public async Task Speculative_output_should_equal_plain_greedy_output_over_http_on_workload_prompts()
    {
        foreach (string task in new[] { "summary", "rag", "ui", "reply" })
        {
            var row = JsonNode.Parse(File.ReadLines(Path.Combine(ServerProcess.RepoRoot, "workloads", task + ".jsonl")).First())!;
            var messages = new JsonArray(
                new JsonObject { ["role"] = "system", ["content"] = row["context"]!.GetValue<string>() },
                new JsonObject { ["role"] = "user", ["content"] = row["prompt"]!.GetValue<string>() });
            string Text(JsonNode r) => r["choices"]![0]!["message"]!["content"]!.GetValue<string>();
            var plain = await Post("/v1/chat/completions", new JsonObject { ["messages"] = messages.DeepClone(), ["max_tokens"] = 48, ["speculation"] = new JsonObject { ["method"] = "ar" } });
            var spec = await Post("/v1/chat/completions", new JsonObject { ["messages"] = messages.DeepClone(), ["max_tokens"] = 48, ["speculation"] = new JsonObject { ["method"] = "sam+ours", ["width"] = 8 } });
            Assert.Equal(Text(plain), Text(spec));
            Assert.True(spec["coordgen"]!["speculation"]!["steps"]!.GetValue<int>() <= 48);
        }
    }

    [Fact]
    public async Task Chat_turns_should_reuse_the_history_from_the_prefix_cache_and_report_it_in_usage()
    {
        // The client sends the whole history every turn, as OpenAI clients do; the server finds the common prefix itself.
        var row = JsonNode.Parse(File.ReadLines(Path.Combine(ServerProcess.RepoRoot, "workloads", "chat.jsonl")).First())!;
        var messages = new JsonArray(
            new JsonObject { ["role"] = "system", ["content"] = row["context"]!.GetValue<string>() },
            new JsonObject { ["role"] = "user", ["content"] = row["prompt"]!.GetValue<string>() });
        var first = await Post("/v1/chat/completions", new JsonObject { ["messages"] = messages.DeepClone(), ["max_tokens"] = 24 });
        messages.Add(new JsonObject { ["role"] = "assistant", ["content"] = first["choices"]![0]!["message"]!["content"]!.GetValue<string>() });
        messages.Add(new JsonObject { ["role"] = "user", ["content"] = "And what about the title?" });
        var second = await Post("/v1/chat/completions", new JsonObject { ["messages"] = messages.DeepClone(), ["max_tokens"] = 24 });

        var usage = second["usage"]!;
        int prompt = usage["prompt_tokens"]!.GetValue<int>(), cached = usage["prompt_tokens_details"]!["cached_tokens"]!.GetValue<int>();
        Assert.True(cached >= first["usage"]!["prompt_tokens"]!.GetValue<int>() - 64, $"{cached} of {prompt} prompt tokens came from the cache");
        Assert.True(cached < prompt);
    }

    [Fact]
    public async Task Context_store_should_feed_drafting_when_a_request_names_it()
    {
        var created = await server.Http.PostAsJsonAsync(new Uri(server.BaseUrl, "/v1/context_stores"), new { name = "lighthouse" });
        Assert.Equal(HttpStatusCode.Created, created.StatusCode);
        var body = new JsonObject { ["messages"] = new JsonArray(new JsonObject { ["role"] = "user", ["content"] = "Summarize the document." }), ["max_tokens"] = 32 };
        string first = (await Post("/v1/chat/completions", body.DeepClone()))["choices"]![0]!["message"]!["content"]!.GetValue<string>();

        // Store the model's own answer as a past response: drafting from it should now be accepted.
        var added = await server.Http.PostAsJsonAsync(new Uri(server.BaseUrl, "/v1/context_stores/lighthouse/documents"), new { text = first });
        Assert.Equal(HttpStatusCode.OK, added.StatusCode);
        var withStore = body.DeepClone();
        withStore["context_store"] = "lighthouse";
        var again = await Post("/v1/chat/completions", withStore);
        Assert.Equal(first, again["choices"]![0]!["message"]!["content"]!.GetValue<string>());
        Assert.True(again["coordgen"]!["speculation"]!["draft_tokens_accepted"]!["history"]!.GetValue<long>() > 0);
    }

    [Fact]
    public async Task In_prompt_context_store_should_be_read_by_the_model_prefilled_once_and_deletable()
    {
        const string doc = "The lighthouse at Brannock Point was built in 1871 by the engineer Ada Kerr. Its lamp burned whale oil until 1902, when the keepers changed to kerosene. The tower is 31 metres tall and painted with red and white bands.";
        var created = await server.Http.PostAsJsonAsync(new Uri(server.BaseUrl, "/v1/context_stores"), new { name = "brannock", in_prompt = true });
        Assert.Equal(HttpStatusCode.Created, created.StatusCode);
        Assert.True((await created.Content.ReadFromJsonAsync<JsonObject>())!["in_prompt"]!.GetValue<bool>());
        Assert.Equal(HttpStatusCode.OK, (await server.Http.PostAsJsonAsync(new Uri(server.BaseUrl, "/v1/context_stores/brannock/documents"), new { text = doc })).StatusCode);

        var prefill = await Post("/v1/context_stores/brannock/prefill", new JsonObject());
        int prefixTokens = prefill["prompt_tokens"]!.GetValue<int>();
        Assert.True(prefixTokens > 32);
        Assert.True((await Post("/v1/context_stores/brannock/prefill", new JsonObject()))["cached_tokens"]!.GetValue<int>() >= prefixTokens - 32);

        // The model reads the store's documents: the answer is the one it gives with them as a system message.
        JsonObject Ask(params JsonObject[] messages) => new() { ["messages"] = new JsonArray(messages), ["max_tokens"] = 24 };
        JsonObject Msg(string role, string content) => new() { ["role"] = role, ["content"] = content };
        var withStore = Ask(Msg("user", "When was the lighthouse built?"));
        withStore["context_store"] = "brannock";
        var got = await Post("/v1/chat/completions", withStore);
        var inline = await Post("/v1/chat/completions", Ask(Msg("system", doc), Msg("user", "When was the lighthouse built?")));
        Assert.Equal(inline["choices"]![0]!["message"]!["content"]!.GetValue<string>(), got["choices"]![0]!["message"]!["content"]!.GetValue<string>());
        Assert.True(got["usage"]!["prompt_tokens_details"]!["cached_tokens"]!.GetValue<int>() >= prefixTokens - 32);

        // Deleted: later requests naming it get a 404 that says what to do, and the name is free again.
        var deleted = await server.Http.DeleteAsync(new Uri(server.BaseUrl, "/v1/context_stores/brannock"));
        Assert.Equal(HttpStatusCode.OK, deleted.StatusCode);
        Assert.True((await deleted.Content.ReadFromJsonAsync<JsonObject>())!["deleted"]!.GetValue<bool>());
        var gone = await server.Http.PostAsJsonAsync(new Uri(server.BaseUrl, "/v1/chat/completions"), withStore);
        Assert.Equal(HttpStatusCode.NotFound, gone.StatusCode);
        Assert.Contains("does not exist", await gone.Content.ReadAsStringAsync());
        Assert.Equal(HttpStatusCode.NotFound, (await server.Http.DeleteAsync(new Uri(server.BaseUrl, "/v1/context_stores/brannock"))).StatusCode);

        // Prefilling a store that only feeds drafting is refused with a reason.
        await server.Http.PostAsJsonAsync(new Uri(server.BaseUrl, "/v1/context_stores"), new { name = "brannock" });
        var refused = await server.Http.PostAsJsonAsync(new Uri(server.BaseUrl, "/v1/context_stores/brannock/prefill"), new JsonObject());
        Assert.Equal(HttpStatusCode.BadRequest, refused.StatusCode);
        Assert.Contains("in_prompt", await refused.Content.ReadAsStringAsync());
        var conflict = await server.Http.PostAsJsonAsync(new Uri(server.BaseUrl, "/v1/context_stores"), new { name = "brannock", in_prompt = true });
        Assert.Equal(HttpStatusCode.Conflict, conflict.StatusCode);
        Assert.Contains("delete it first", await conflict.Content.ReadAsStringAsync());
    }

    [Fact]
    public async Task Stop_sequence_should_end_the_text_before_it()
    {
        var body = new JsonObject { ["prompt"] = "The keeper", ["max_tokens"] = 40 };
        string full = (await Post("/v1/completions", body.DeepClone()))["choices"]![0]!["text"]!.GetValue<string>();
        string stop = full.Split(' ', StringSplitOptions.RemoveEmptyEntries)[3];
        body["stop"] = stop;
        var cut = await Post("/v1/completions", body);
        Assert.Equal(full[..full.IndexOf(stop, StringComparison.Ordinal)], cut["choices"]![0]!["text"]!.GetValue<string>());
        Assert.Equal("stop", cut["choices"]![0]!["finish_reason"]!.GetValue<string>());
    }

    [Theory]
    [InlineData("/v1/chat/completions", "{bad json", 400, "not valid JSON")]
    [InlineData("/v1/chat/completions", "[1, 2]", 400, "must be a JSON object")]
    [InlineData("/v1/chat/completions", "{}", 400, "'messages' is required")]
    [InlineData("/v1/chat/completions", """{"messages": "hi"}""", 400, "'messages' must be a non-empty array")]
    [InlineData("/v1/chat/completions", """{"messages": [{"role": "robot", "content": "hi"}]}""", 400, "must be system, developer, user or assistant")]
    [InlineData("/v1/chat/completions", """{"messages": [{"role": "user", "content": ""}]}""", 400, "last user message is empty")]
    [InlineData("/v1/chat/completions", """{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}""", 400, "'max_tokens' must be an integer")]
    [InlineData("/v1/chat/completions", """{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}""", 400, "max_tokens must be at least 1")]
    [InlineData("/v1/chat/completions", """{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 99999999999}""", 400, "lower max_tokens")]
    [InlineData("/v1/chat/completions", """{"messages": [{"role": "user", "content": "hi"}], "temperature": 7}""", 400, "'temperature' must be between 0 and 2")]
    [InlineData("/v1/chat/completions", """{"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"}""", 404, "not served here")]
    [InlineData("/v1/chat/completions", """{"messages": [{"role": "user", "content": "hi"}], "context_store": "missing"}""", 404, "does not exist")]
    [InlineData("/v1/chat/completions", """{"messages": [{"role": "user", "content": "hi"}], "speculation": {"method": "magic"}}""", 400, "'speculation.method' must be one of")]
    [InlineData("/v1/completions", """{"prompt": ""}""", 400, "'prompt' is empty")]
    [InlineData("/v1/completions", """{"prompt": 42}""", 400, "'prompt' must be a string")]
    [InlineData("/v1/context_stores", """{"name": "../etc"}""", 400, "context store name must be")]
    public async Task Bad_request_should_get_an_openai_style_error_saying_what_to_do(string path, string body, int status, string message)
    {
        var response = await server.Http.PostAsync(new Uri(server.BaseUrl, path), new StringContent(body, Encoding.UTF8, "application/json"));
        await AssertError(response, status, message);
    }

    [Fact]
    public async Task Invalid_utf8_oversized_and_overlong_prompts_should_be_refused_clearly()
    {
        var bytes = new ByteArrayContent([.. "{\"prompt\": \""u8.ToArray(), 0xff, 0xfe, .. "\"}"u8.ToArray()]);
        await AssertError(await server.Http.PostAsync(new Uri(server.BaseUrl, "/v1/completions"), bytes), 400, "not valid UTF-8");

        // As curl does for large bodies: ask before sending, so the refusal arrives instead of a broken pipe
        // (the server answers 413 from Content-Length without reading 2 MiB it would throw away).
        string huge = JsonSerializer.Serialize(new { prompt = new string('a', 2 << 20) });
        using var patient = new HttpClient(new SocketsHttpHandler { Expect100ContinueTimeout = TimeSpan.FromSeconds(30) });
        var upload = new HttpRequestMessage(HttpMethod.Post, new Uri(server.BaseUrl, "/v1/completions")) { Content = new StringContent(huge) };
        upload.Headers.ExpectContinue = true;
        await AssertError(await patient.SendAsync(upload), 413, "larger than this server accepts");

        string longPrompt = JsonSerializer.Serialize(new { prompt = string.Concat(Enumerable.Repeat("word ", 3000)) });
        await AssertError(await server.Http.PostAsync(new Uri(server.BaseUrl, "/v1/completions"), new StringContent(longPrompt)), 400, "shorten the prompt");

        var health = await server.Http.GetFromJsonAsync<JsonObject>(new Uri(server.BaseUrl, "/health"));
        Assert.Equal("ok", health!["status"]!.GetValue<string>());
    }

    [Fact]
    public async Task Client_disconnecting_mid_stream_should_leave_the_server_serving()
    {
        var body = JsonSerializer.Serialize(new { prompt = "The keeper", max_tokens = 1500, stream = true, speculation = new { method = "ar" } });
        using (var cts = new CancellationTokenSource())
        {
            var request = new HttpRequestMessage(HttpMethod.Post, new Uri(server.BaseUrl, "/v1/completions")) { Content = new StringContent(body) };
            var response = await server.Http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead, cts.Token);
            var reader = new StreamReader(await response.Content.ReadAsStreamAsync(cts.Token));
            Assert.StartsWith("data: ", await reader.ReadLineAsync(cts.Token));
            await cts.CancelAsync();
            response.Dispose();
        }

        var after = await Post("/v1/completions", new JsonObject { ["prompt"] = "The keeper", ["max_tokens"] = 8 });
        Assert.Equal(8, after["usage"]!["completion_tokens"]!.GetValue<int>());
    }

    [Theory]
    [InlineData("/v1/chat/completions", """{"messages": [{"role": "user", "content": "hi \ud800 x"}], "max_tokens": 4}""")]
    [InlineData("/v1/completions", """{"prompt": "cut inside an emoji \udc00", "max_tokens": 4}""")]
    [InlineData("/v1/completions", """{"prompt": "hi", "max_tokens": 4, "user": "\ud83d"}""")]
    public async Task Lone_surrogate_escape_should_get_400_naming_the_field_not_500(string path, string body)
    {
        var response = await server.Http.PostAsync(new Uri(server.BaseUrl, path), new StringContent(body, Encoding.UTF8, "application/json"));
        await AssertError(response, 400, "lone UTF-16 surrogate");
    }

    [Theory]
    [InlineData("/v1/chat/completions", "response_format", """{"type": "json_object"}""")]
    [InlineData("/v1/chat/completions", "tools", """[{"type": "function", "function": {"name": "f"}}]""")]
    [InlineData("/v1/chat/completions", "frequency_penalty", "0.5")]
    [InlineData("/v1/chat/completions", "presence_penalty", "-1")]
    [InlineData("/v1/chat/completions", "logit_bias", """{"50256": -100}""")]
    [InlineData("/v1/completions", "echo", "true")]
    [InlineData("/v1/completions", "suffix", "\"end\"")]
    [InlineData("/v1/completions", "best_of", "3")]
    public async Task Parameters_we_do_not_implement_should_get_400_naming_the_parameter(string path, string name, string value)
    {
        string start = path.Contains("chat", StringComparison.Ordinal) ? """{"messages": [{"role": "user", "content": "hi"}]""" : """{"prompt": "hi" """;
        var response = await server.Http.PostAsync(new Uri(server.BaseUrl, path), new StringContent($"{start}, \"max_tokens\": 4, \"{name}\": {value}}}", Encoding.UTF8, "application/json"));
        string text = await response.Content.ReadAsStringAsync();
        await AssertError(response, 400, $"'{name}'");
        Assert.Equal(name, JsonNode.Parse(text)!["error"]!["param"]!.GetValue<string>());
    }

    [Fact]
    public async Task Parameters_at_their_defaults_should_be_accepted()
    {
        var body = JsonNode.Parse("""
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "logprobs": false, "response_format": {"type": "text"},
             "tools": [], "tool_choice": "none", "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "user": "u1"}
            """)!;
        await Post("/v1/chat/completions", body);
    }

    [Fact]
    public async Task Model_endpoint_should_describe_the_model_with_its_context_length()
    {
        var one = JsonNode.Parse(await server.Http.GetStringAsync(new Uri(server.BaseUrl, "/v1/models/coordgen-demo")))!;
        Assert.Equal("coordgen-demo", one["id"]!.GetValue<string>());
        Assert.Equal(2048, one["context_length"]!.GetValue<int>());
        Assert.Equal(2048, one["max_model_len"]!.GetValue<int>());
        var list = JsonNode.Parse(await server.Http.GetStringAsync(new Uri(server.BaseUrl, "/v1/models")))!;
        Assert.Equal(2048, list["data"]![0]!["context_length"]!.GetValue<int>());
        await AssertError(await server.Http.GetAsync(new Uri(server.BaseUrl, "/v1/models/gpt-4o")), 404, "not served here");

        var sdk = new OpenAIClient(new ApiKeyCredential("not-needed"), new OpenAIClientOptions { Endpoint = new Uri(server.BaseUrl, "/v1") }).GetOpenAIModelClient();
        Assert.Equal("coordgen-demo", (await sdk.GetModelAsync("coordgen-demo")).Value.Id);
    }

    [Fact]
    public async Task Unknown_routes_and_wrong_methods_should_get_openai_error_bodies()
    {
        await AssertError(await server.Http.GetAsync(new Uri(server.BaseUrl, "/v1/embeddings")), 404, "/v1/chat/completions");
        await AssertError(await server.Http.GetAsync(new Uri(server.BaseUrl, "/v1/chat/completions")), 405, "POST");
        await AssertError(await server.Http.DeleteAsync(new Uri(server.BaseUrl, "/health")), 405, "GET");
    }

    [Fact]
    public async Task Mutated_requests_should_never_get_a_5xx_or_hang()
    {
        // Random mutations of valid requests (bounded in count and time): every answer is a success or a 4xx.
        var started = System.Diagnostics.Stopwatch.StartNew();
        int sent = 0;
        foreach (var (path, body) in RequestFuzzer.Mutations(seed: 7, count: 250))
        {
            if (started.Elapsed > TimeSpan.FromSeconds(90))
            {
                break;
            }

            using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(30));
            var response = await server.Http.PostAsync(new Uri(server.BaseUrl, path), new ByteArrayContent(body), cts.Token);
            string text = await response.Content.ReadAsStringAsync(cts.Token);
            Assert.True((int)response.StatusCode < 500, $"{(int)response.StatusCode} for {Encoding.UTF8.GetString(body)}: {text}");
            sent++;
        }

        Assert.True(sent >= 50, $"only {sent} mutated requests in 90 s");
        var health = await server.Http.GetFromJsonAsync<JsonObject>(new Uri(server.BaseUrl, "/health"));
        Assert.Equal("ok", health!["status"]!.GetValue<string>());
    }

    [Fact]
    public async Task Metrics_should_expose_every_instrument_listed_in_docs_telemetry()
    {
        await Post("/v1/completions", new JsonObject { ["prompt"] = "The keeper lit the lamp. The keeper", ["max_tokens"] = 16, ["speculation"] = new JsonObject { ["method"] = "sam+ours" } });
        string metrics = await server.Http.GetStringAsync(new Uri(server.BaseUrl, "/metrics"));
        var lines = metrics.Split('\n').Where(l => !l.StartsWith('#')).ToList();

        // Every instrument named in the table's first column, as Prometheus spells it (dots to underscores).
        string doc = File.ReadAllText(Path.Combine(ServerProcess.RepoRoot, "docs", "telemetry.md"));
        string table = doc[doc.IndexOf("## Metrics", StringComparison.Ordinal)..doc.IndexOf("## Request log", StringComparison.Ordinal)];
        var names = table.Split('\n').Where(l => l.StartsWith("| `", StringComparison.Ordinal))
            .SelectMany(l => System.Text.RegularExpressions.Regex.Matches(l.Split('|')[1], "`([a-z_.]+)`").Select(m => m.Groups[1].Value)).ToList();
        Assert.True(names.Count >= 15, $"found only {names.Count} instruments in docs/telemetry.md");
        foreach (string name in names)
        {
            string prom = name.Replace('.', '_');
            Assert.True(lines.Any(l => l.StartsWith(prom, StringComparison.Ordinal)), $"{name} ({prom}) is listed in docs/telemetry.md but not exported at /metrics");
        }

        Assert.Contains(lines, l => l.StartsWith("gen_ai_server_time_to_first_token_seconds_bucket", StringComparison.Ordinal) && l.Contains("le=\"0.1\"", StringComparison.Ordinal));
        Assert.Contains(lines, l => l.StartsWith("coordgen_device_busy_time_seconds_total", StringComparison.Ordinal));
    }

    private async Task<JsonNode> Post(string path, JsonNode body)
    {
        var response = await server.Http.PostAsync(new Uri(server.BaseUrl, path), new StringContent(body.ToJsonString(), Encoding.UTF8, "application/json"));
        string text = await response.Content.ReadAsStringAsync();
        Assert.True(response.IsSuccessStatusCode, $"{(int)response.StatusCode}: {text}");
        return JsonNode.Parse(text)!;
    }

    internal static async Task AssertError(HttpResponseMessage response, int status, string message)
    {
        string text = await response.Content.ReadAsStringAsync();
        Assert.True((int)response.StatusCode == status, $"expected {status}, got {(int)response.StatusCode}: {text}");
        var error = JsonNode.Parse(text)!["error"]!;
        Assert.Contains(message, error["message"]!.GetValue<string>());
        Assert.False(string.IsNullOrEmpty(error["type"]!.GetValue<string>()));
    }
}

/// <summary>Refusals that need their own server: an API key, and a one-request admission limit.</summary>
public class StrictServerTests(StrictServerProcess server) : IClassFixture<StrictServerProcess>
{
    [Fact]
    public async Task Requests_without_the_api_key_should_get_401_and_with_it_succeed()
    {
        var body = JsonSerializer.Serialize(new { prompt = "The keeper", max_tokens = 4 });
        await ServerTests.AssertError(await server.Http.PostAsync(new Uri(server.BaseUrl, "/v1/completions"), new StringContent(body)), 401, "API key");
        var ok = new HttpRequestMessage(HttpMethod.Post, new Uri(server.BaseUrl, "/v1/completions")) { Content = new StringContent(body) };
        ok.Headers.Authorization = new("Bearer", StrictServerProcess.Key);
        Assert.Equal(HttpStatusCode.OK, (await server.Http.SendAsync(ok)).StatusCode);
    }

    [Fact]
    public async Task Requests_beyond_the_admission_limit_should_get_429_with_retry_after()
    {
        HttpRequestMessage Request(int n)
        {
            var r = new HttpRequestMessage(HttpMethod.Post, new Uri(server.BaseUrl, "/v1/completions"))
            {
                Content = new StringContent(JsonSerializer.Serialize(new { prompt = "The keeper", max_tokens = n, speculation = new { method = "ar" } })),
            };
            r.Headers.Authorization = new("Bearer", StrictServerProcess.Key);
            return r;
        }

        // Four at once against a limit of one: some are refused, none is lost or fails otherwise.
        var responses = await Task.WhenAll(Enumerable.Range(0, 4).Select(_ => server.Http.SendAsync(Request(400))));
        Assert.All(responses, r => Assert.True(r.StatusCode is HttpStatusCode.OK or HttpStatusCode.TooManyRequests, r.StatusCode.ToString()));
        var refused = responses.First(r => r.StatusCode == HttpStatusCode.TooManyRequests);
        await ServerTests.AssertError(refused, 429, "retry");
        Assert.NotNull(refused.Headers.RetryAfter);
        Assert.Contains(responses, r => r.StatusCode == HttpStatusCode.OK);
    }
}

/// <summary>Streamed requests refused by admission, and refusals in the request counter.</summary>
public class StrictServerStreamingTests(StrictServerProcess server) : IClassFixture<StrictServerProcess>
{
    [Fact]
    public async Task Streamed_requests_beyond_the_admission_limit_should_get_429_before_any_event()
    {
        HttpRequestMessage Request(int n = 400)
        {
            var r = new HttpRequestMessage(HttpMethod.Post, new Uri(server.BaseUrl, "/v1/completions"))
            {
                Content = new StringContent(JsonSerializer.Serialize(new { prompt = "The keeper", max_tokens = n, stream = true, speculation = new { method = "ar" } })),
            };
            r.Headers.Authorization = new("Bearer", StrictServerProcess.Key);
            return r;
        }

        var responses = await Task.WhenAll(Enumerable.Range(0, 4).Select(_ => server.Http.SendAsync(Request())));
        Assert.All(responses, r => Assert.True(r.StatusCode is HttpStatusCode.OK or HttpStatusCode.TooManyRequests, r.StatusCode.ToString()));
        var refused = responses.FirstOrDefault(r => r.StatusCode == HttpStatusCode.TooManyRequests);
        Assert.NotNull(refused);
        Assert.NotNull(refused!.Headers.RetryAfter);
        Assert.Equal("application/json", refused.Content.Headers.ContentType?.MediaType);
        await ServerTests.AssertError(refused, 429, "retry");
        foreach (var ok in responses.Where(r => r.StatusCode == HttpStatusCode.OK))
        {
            Assert.EndsWith("data: [DONE]\n\n", await ok.Content.ReadAsStringAsync());
        }

        // The OpenAI SDK sees the 429 as such (its retries would fire on it); here retries are off.
        var sdk = new ChatClient("coordgen-demo", new ApiKeyCredential(StrictServerProcess.Key),
            new OpenAIClientOptions { Endpoint = new Uri(server.BaseUrl, "/v1"), RetryPolicy = new System.ClientModel.Primitives.ClientRetryPolicy(0) });
        var busy = server.Http.SendAsync(Request(1500));
        await Task.Delay(300);
        var ex = await Assert.ThrowsAsync<ClientResultException>(async () =>
        {
            await foreach (var _ in sdk.CompleteChatStreamingAsync([new UserChatMessage("hi")], new ChatCompletionOptions { MaxOutputTokenCount = 4 }))
            {
            }
        });
        Assert.Equal(429, ex.Status);
        Assert.Equal(HttpStatusCode.OK, (await busy).StatusCode);
    }

    [Fact]
    public async Task Refusals_should_be_counted_in_the_requests_metric()
    {
        var body = JsonSerializer.Serialize(new { prompt = "The keeper", max_tokens = 4 });
        await ServerTests.AssertError(await server.Http.PostAsync(new Uri(server.BaseUrl, "/v1/completions"), new StringContent(body)), 401, "API key");
        string metrics = await server.Http.GetStringAsync(new Uri(server.BaseUrl, "/metrics"));
        Assert.Contains(metrics.Split('\n'), l => l.StartsWith("coordgen_requests_total{", StringComparison.Ordinal) && l.Contains("outcome=\"401\"", StringComparison.Ordinal));
    }
}

/// <summary>The per-client rate limit.</summary>
public class RateLimitTests(RateLimitedServerProcess server) : IClassFixture<RateLimitedServerProcess>
{
    [Fact]
    public async Task Requests_beyond_the_rate_limit_should_get_429_saying_when_to_retry()
    {
        var statuses = new List<HttpStatusCode>();
        HttpResponseMessage? limited = null;
        for (int i = 0; i < 5; i++)
        {
            var r = await server.Http.GetAsync(new Uri(server.BaseUrl, "/v1/models"));
            statuses.Add(r.StatusCode);
            limited ??= r.StatusCode == HttpStatusCode.TooManyRequests ? r : null;
        }

        Assert.Equal([HttpStatusCode.OK, HttpStatusCode.OK, HttpStatusCode.OK], statuses.Take(3));
        Assert.NotNull(limited);
        Assert.NotNull(limited!.Headers.RetryAfter);
        await ServerTests.AssertError(limited, 429, "rate limit");

        // Probes and scrapes are not limited, and the refusals are counted.
        for (int i = 0; i < 5; i++)
        {
            Assert.Equal(HttpStatusCode.OK, (await server.Http.GetAsync(new Uri(server.BaseUrl, "/health"))).StatusCode);
        }

        string metrics = await server.Http.GetStringAsync(new Uri(server.BaseUrl, "/metrics"));
        Assert.Contains(metrics.Split('\n'), l => l.StartsWith("coordgen_requests_total{", StringComparison.Ordinal) && l.Contains("outcome=\"429\"", StringComparison.Ordinal));
    }

    [Fact]
    public async Task Health_and_metrics_should_not_use_up_the_rate_limit()
    {
        for (int i = 0; i < 8; i++)
        {
            Assert.Equal(HttpStatusCode.OK, (await server.Http.GetAsync(new Uri(server.BaseUrl, "/health"))).StatusCode);
            Assert.Equal(HttpStatusCode.OK, (await server.Http.GetAsync(new Uri(server.BaseUrl, "/metrics"))).StatusCode);
        }
    }
}

/// <summary>`coordgen serve --faults`: streams complete unchanged while faults strike, and the faults are visible. Also CORS.</summary>
public class FaultyServerTests(FaultyServerProcess server) : IClassFixture<FaultyServerProcess>
{
    [Fact]
    public async Task Streams_should_complete_unchanged_while_faults_are_injected_and_health_should_count_them()
    {
        // The reference: the same prompts through a runtime without faults, in process.
        var bundle = CoordGen.Engine.Model.ModelBundle.Load(Path.Combine(ServerProcess.RepoRoot, "models", "coordgen-demo"));
        string[] prompts = ["The keeper", "The harbour master kept a ledger of every ship.", "Summarize the document.", "The lamp"];
        var want = new List<string>();
        await using (var clean = InferenceService.Start(bundle, new CoordGenOptions()))
        {
            foreach (string p in prompts)
            {
                want.Add((await clean.RunAsync(new InferenceRequest(clean.Encode(p), 40, new(0, 0, 1, 0), []), _ => Task.CompletedTask, CancellationToken.None)).Text);
            }
        }

        async Task<string> Complete(string prompt, bool stream)
        {
            var body = JsonSerializer.Serialize(new { prompt, max_tokens = 40, stream });
            var response = await server.Http.PostAsync(new Uri(server.BaseUrl, "/v1/completions"), new StringContent(body));
            string text = await response.Content.ReadAsStringAsync();
            Assert.True(response.IsSuccessStatusCode, text);
            if (!stream)
            {
                return JsonNode.Parse(text)!["choices"]![0]!["text"]!.GetValue<string>();
            }

            return string.Concat(text.Split('\n').Where(l => l.StartsWith("data: {", StringComparison.Ordinal))
                .Select(l => JsonNode.Parse(l[6..])!["choices"]!.AsArray().FirstOrDefault()?["text"]?.GetValue<string>() ?? ""));
        }

        for (int round = 0; round < 3; round++)
        {
            var got = await Task.WhenAll(prompts.Select((p, i) => Complete(p, stream: (i + round) % 2 == 0)));
            Assert.Equal(want, got);
        }

        var health = JsonNode.Parse(await server.Http.GetStringAsync(new Uri(server.BaseUrl, "/health")))!;
        Assert.Contains("DeviceException", health["faults"]!["spec"]!.GetValue<string>());
        Assert.True(health["faults"]!["injected"]!.GetValue<int>() > 0, health.ToJsonString());
    }

    [Fact]
    public async Task Cors_should_allow_the_listed_origin_and_no_other()
    {
        async Task<HttpResponseMessage> Preflight(string origin)
        {
            var request = new HttpRequestMessage(HttpMethod.Options, new Uri(server.BaseUrl, "/v1/chat/completions"));
            request.Headers.Add("Origin", origin);
            request.Headers.Add("Access-Control-Request-Method", "POST");
            request.Headers.Add("Access-Control-Request-Headers", "content-type,authorization");
            return await server.Http.SendAsync(request);
        }

        var allowed = await Preflight(FaultyServerProcess.Origin);
        Assert.True(allowed.IsSuccessStatusCode, allowed.StatusCode.ToString());
        Assert.Equal(FaultyServerProcess.Origin, allowed.Headers.GetValues("Access-Control-Allow-Origin").Single());
        var other = await Preflight("http://evil.example");
        Assert.False(other.Headers.Contains("Access-Control-Allow-Origin"));
    }
}
