using System.ClientModel;
using System.Text;
using System.Text.Json.Nodes;
using OpenAI;
using OpenAI.Chat;
using Xunit.Abstractions;

namespace CoordGen.Host.Tests;

/// <summary>
/// <c>logprobs</c> over HTTP, through the OpenAI .NET SDK and raw requests: the same numbers under
/// speculation as with plain decoding, streamed and not, on chat and completions.
/// </summary>
public class LogprobsServerTests(ServerProcess server, ITestOutputHelper output) : IClassFixture<ServerProcess>
{
    /// <summary>Speculative and plain runs compute a position's logits on graphs of different widths: float rounding differs (measured up to 2e-5 on the demo model).</summary>
    private const double Tolerance = 1e-4;

    private static JsonArray Messages(string task)
    {
        var row = JsonNode.Parse(File.ReadLines(Path.Combine(ServerProcess.RepoRoot, "workloads", task + ".jsonl")).First())!;
        return new JsonArray(
            new JsonObject { ["role"] = "system", ["content"] = row["context"]!.GetValue<string>() },
            new JsonObject { ["role"] = "user", ["content"] = row["prompt"]!.GetValue<string>() });
    }

    [Theory]
    [InlineData(false, 0.0)]
    [InlineData(true, 0.0)]
    [InlineData(false, 0.8)]
    [InlineData(true, 0.8)]
    public async Task Chat_logprobs_under_speculation_should_equal_plain_decoding_logprobs(bool stream, double temperature)
    {
        double worst = 0;
        foreach (string task in new[] { "summary", "rag", "ui", "reply" })
        {
            JsonObject Body(string method) => new()
            {
                ["messages"] = Messages(task), ["max_tokens"] = 32, ["logprobs"] = true, ["top_logprobs"] = 3, ["stream"] = stream,
                ["temperature"] = temperature, ["seed"] = 11, // seeded sampling: speculation draws the same tokens as plain decoding
                ["stream_options"] = stream ? new JsonObject { ["include_usage"] = true } : null,
                ["speculation"] = method == "ar" ? new JsonObject { ["method"] = "ar" } : new JsonObject { ["method"] = method, ["width"] = 8 },
            };
            var (plainText, plain, tokens) = await Chat(Body("ar"), stream);
            var (specText, spec, _) = await Chat(Body("sam+ours"), stream);
            Assert.Equal(tokens, plain.Count); // one entry per completion token
            Assert.Equal(plainText, Encoding.UTF8.GetString([.. plain.SelectMany(e => e["bytes"]!.AsArray().Select(b => (byte)b!.GetValue<int>()))]));
            int same = plain.Count;
            if (temperature == 0)
            {
                Assert.Equal(plainText, specText);
                Assert.Equal(plain.Count, spec.Count);
            }
            else
            {
                // Seeded sampling draws the same random numbers in both, but a draw that falls within float
                // rounding of the boundary between two tokens may pick either, as the row's logits came from a
                // width-1 or a width-8 graph (seen once on these prompts: the draw 5e-8 past the boundary). The
                // distribution is the same; the numbers are compared up to the first such draw.
                same = plain.Zip(spec).TakeWhile(p => p.First["token"]!.GetValue<string>() == p.Second["token"]!.GetValue<string>()).Count();
                Assert.True(same >= Math.Min(8, plain.Count), $"{task}: sampled tokens differ from the {same}th on");
            }

            for (int i = 0; i < same; i++)
            {
                Assert.Equal(plain[i]["token"]!.GetValue<string>(), spec[i]["token"]!.GetValue<string>());
                double p = plain[i]["logprob"]!.GetValue<double>();
                Assert.True(p <= 0);
                worst = Math.Max(worst, Math.Abs(p - spec[i]["logprob"]!.GetValue<double>()));
                var (pt, st) = (plain[i]["top_logprobs"]!.AsArray(), spec[i]["top_logprobs"]!.AsArray());
                Assert.Equal(3, pt.Count);
                Assert.Equal(3, st.Count);
                Assert.True(temperature > 0 || pt[0]!["logprob"]!.GetValue<double>() <= p + Tolerance, "the chosen greedy token is the likeliest");
                for (int k = 0; k < 3; k++)
                {
                    worst = Math.Max(worst, Math.Abs(pt[k]!["logprob"]!.GetValue<double>() - st[k]!["logprob"]!.GetValue<double>()));
                }
            }
        }

        output.WriteLine($"largest difference {worst:E2}");
        Assert.True(worst < Tolerance, $"speculative logprobs differ from plain ones by up to {worst:E2}");
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Completion_logprobs_should_hold_tokens_offsets_and_alternatives_and_match_plain_decoding(bool stream)
    {
        const string Prompt = "The old lighthouse on the northern cape was kept by a single keeper for forty years. The keeper";
        async Task<(string Text, JsonArray Tokens, JsonArray Logprobs, JsonArray Top, JsonArray Offsets)> Complete(string method)
        {
            var body = new JsonObject
            {
                ["prompt"] = Prompt, ["max_tokens"] = 24, ["logprobs"] = 2, ["stream"] = stream,
                ["speculation"] = method == "ar" ? new JsonObject { ["method"] = "ar" } : new JsonObject { ["method"] = method, ["width"] = 8 },
            };
            var (choices, _) = await Choices("/v1/completions", body, stream);
            var (tokens, logprobs, top, offsets) = (new JsonArray(), new JsonArray(), new JsonArray(), new JsonArray());
            foreach (var c in choices.Where(c => c["logprobs"] is not null))
            {
                var lp = c["logprobs"]!;
                foreach (var (from, to) in new[] { ("tokens", tokens), ("token_logprobs", logprobs), ("top_logprobs", top), ("text_offset", offsets) })
                {
                    foreach (var x in lp[from]!.AsArray())
                    {
                        to.Add(x?.DeepClone());
                    }
                }
            }

            return (string.Concat(choices.Select(c => c["text"]?.GetValue<string>() ?? "")), tokens, logprobs, top, offsets);
        }

        var plain = await Complete("ar");
        var spec = await Complete("pld");
        Assert.Equal(plain.Text, spec.Text);
        Assert.Equal(24, plain.Tokens.Count);
        Assert.Equal(plain.Text, string.Concat(plain.Tokens.Select(t => t!.GetValue<string>())));
        int expectedOffset = 0;
        for (int i = 0; i < 24; i++)
        {
            Assert.Equal(expectedOffset, plain.Offsets[i]!.GetValue<int>());
            expectedOffset += plain.Tokens[i]!.GetValue<string>().Length;
            Assert.Equal(plain.Tokens[i]!.GetValue<string>(), spec.Tokens[i]!.GetValue<string>());
            Assert.True(Math.Abs(plain.Logprobs[i]!.GetValue<double>() - spec.Logprobs[i]!.GetValue<double>()) < Tolerance);
            Assert.Equal(2, plain.Top[i]!.AsObject().Count);
            // Compared by rank: alternatives within float rounding of each other may swap between graph widths.
            Assert.All(plain.Top[i]!.AsObject().Zip(spec.Top[i]!.AsObject()), p => Assert.InRange(Math.Abs(p.First.Value!.GetValue<double>() - p.Second.Value!.GetValue<double>()), 0, Tolerance));
        }
    }

    [Theory]
    [InlineData(0f)]
    [InlineData(0.8f)]
    public async Task OpenAI_sdk_should_read_logprobs_equal_to_plain_decodings_streamed_and_not(float temperature)
    {
        // The SDK's requests use the server's default method (speculative, adaptive width); raw HTTP asks for plain decoding.
        const string Doc = "The keeper climbed the narrow stairs every evening and lit the great lamp.";
        var client = new ChatClient("coordgen-demo", new ApiKeyCredential("not-needed"), new OpenAIClientOptions { Endpoint = new Uri(server.BaseUrl, "/v1") });
        ChatMessage[] messages = [new SystemChatMessage(Doc), new UserChatMessage("Summarize the document.")];
#pragma warning disable OPENAI001 // Seed is marked experimental in the SDK
        var options = new ChatCompletionOptions { MaxOutputTokenCount = 20, Temperature = temperature, Seed = 11, IncludeLogProbabilities = true, TopLogProbabilityCount = 2 };
#pragma warning restore OPENAI001

        ChatCompletion whole = await client.CompleteChatAsync(messages, options);
        var streamed = new List<ChatTokenLogProbabilityDetails>();
        await foreach (var update in client.CompleteChatStreamingAsync(messages, options))
        {
            streamed.AddRange(update.ContentTokenLogProbabilities);
        }

        var plainBody = new JsonObject
        {
            ["messages"] = new JsonArray(new JsonObject { ["role"] = "system", ["content"] = Doc }, new JsonObject { ["role"] = "user", ["content"] = "Summarize the document." }),
            ["max_tokens"] = 20, ["temperature"] = temperature, ["seed"] = 11, ["logprobs"] = true, ["top_logprobs"] = 2,
            ["speculation"] = new JsonObject { ["method"] = "ar" },
        };
        var (_, plain, _) = await Chat(plainBody, stream: false);

        var got = whole.ContentTokenLogProbabilities;
        Assert.Equal(whole.Usage.OutputTokenCount, got.Count);
        Assert.Equal(whole.Content[0].Text, string.Concat(got.Select(t => t.Token)));
        foreach (var other in new[] { streamed.Select(t => (t.Token, t.LogProbability)).ToList(), plain.Select(e => (e["token"]!.GetValue<string>(), (float)e["logprob"]!.GetValue<double>())).ToList() })
        {
            // Greedy: the same tokens throughout. Sampled: up to the first draw that float rounding between graph
            // widths puts on the other side of a token boundary (decision 0015), at least 8 tokens here.
            int same = got.Zip(other).TakeWhile(p => p.First.Token == p.Second.Item1).Count();
            Assert.True(temperature > 0 ? same >= Math.Min(8, got.Count) : same == got.Count && other.Count == got.Count, $"tokens agree for {same} of {got.Count}");
            Assert.All(got.Zip(other).Take(same), p => Assert.InRange(Math.Abs(p.First.LogProbability - p.Second.Item2), 0, Tolerance));
        }

        Assert.All(got, t =>
        {
            Assert.Equal(2, t.TopLogProbabilities.Count);
            Assert.True(temperature > 0 || t.Token == t.TopLogProbabilities[0].Token, "greedy: the token is the likeliest");
            Assert.Equal(t.Token, Encoding.UTF8.GetString(t.Utf8Bytes!.Value.Span));
        });
    }

    [Theory]
    [InlineData("/v1/chat/completions", "\"top_logprobs\": 2", "top_logprobs", "needs")]
    [InlineData("/v1/chat/completions", "\"logprobs\": true, \"top_logprobs\": 21", "top_logprobs", "between 0 and 20")]
    [InlineData("/v1/chat/completions", "\"logprobs\": 3", "logprobs", "true or false")]
    [InlineData("/v1/completions", "\"logprobs\": 21", "logprobs", "between 0 and 20")]
    [InlineData("/v1/completions", "\"top_logprobs\": 2", "top_logprobs", "\"logprobs\": N")]
    public async Task Bad_logprobs_requests_should_get_400_naming_the_parameter(string path, string fields, string param, string message)
    {
        string start = path.Contains("chat", StringComparison.Ordinal) ? """{"messages": [{"role": "user", "content": "hi"}]""" : """{"prompt": "hi" """;
        var response = await server.Http.PostAsync(new Uri(server.BaseUrl, path), new StringContent($"{start}, \"max_tokens\": 4, {fields}}}", Encoding.UTF8, "application/json"));
        string text = await response.Content.ReadAsStringAsync();
        await ServerTests.AssertError(response, 400, message);
        Assert.Equal(param, JsonNode.Parse(text)!["error"]!["param"]!.GetValue<string>());
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task A_stop_sequence_should_cut_the_text_but_not_the_entries_usage_counts(bool stream)
    {
        const string Prompt = "The old lighthouse on the northern cape was kept by a single keeper for forty years. The keeper";
        JsonObject Body(JsonNode? stop) => new()
        {
            ["prompt"] = Prompt, ["max_tokens"] = 24, ["logprobs"] = 0, ["stream"] = stream, ["stop"] = stop,
            ["stream_options"] = stream ? new JsonObject { ["include_usage"] = true } : null,
        };
        var (whole, _) = await Choices("/v1/completions", Body(null), stream);
        string full = string.Concat(whole.Select(c => c["text"]?.GetValue<string>() ?? ""));
        string stop = full.Trim().Split(' ')[1]; // the second word: the stop sequence falls inside the text
        var (choices, usage) = await Choices("/v1/completions", Body(stop), stream);
        string text = string.Concat(choices.Select(c => c["text"]?.GetValue<string>() ?? ""));
        var tokens = choices.Where(c => c["logprobs"] is not null).SelectMany(c => c["logprobs"]!["tokens"]!.AsArray()).ToList();
        Assert.Equal(full[..full.IndexOf(stop, StringComparison.Ordinal)], text);
        Assert.Equal(usage!["completion_tokens"]!.GetValue<int>(), tokens.Count);
        Assert.StartsWith(text, string.Concat(tokens.Select(t => t!.GetValue<string>())));
    }

    [Fact]
    public async Task Without_logprobs_asked_for_responses_should_carry_none()
    {
        var body = new JsonObject { ["messages"] = Messages("ui"), ["max_tokens"] = 4, ["logprobs"] = false };
        var choice = (await Choices("/v1/chat/completions", body, stream: false)).Choices[0];
        Assert.Null(choice["logprobs"]);
    }

    private async Task<(string Text, List<JsonNode> Content, int? CompletionTokens)> Chat(JsonObject body, bool stream)
    {
        var (choices, usage) = await Choices("/v1/chat/completions", body, stream);
        var text = new StringBuilder();
        var content = new List<JsonNode>();
        foreach (var c in choices)
        {
            text.Append((stream ? c["delta"]?["content"] : c["message"]?["content"])?.GetValue<string>());
            content.AddRange(c["logprobs"]?["content"]?.AsArray().Select(e => e!) ?? []);
        }

        return (text.ToString(), content, usage?["completion_tokens"]?.GetValue<int>());
    }

    /// <summary>The choice of a response, or every chunk's choice of a stream, in order; and the usage (when given).</summary>
    private async Task<(List<JsonNode> Choices, JsonNode? Usage)> Choices(string path, JsonObject body, bool stream)
    {
        var response = await server.Http.PostAsync(new Uri(server.BaseUrl, path), new StringContent(body.ToJsonString(), Encoding.UTF8, "application/json"));
        string text = await response.Content.ReadAsStringAsync();
        Assert.True(response.IsSuccessStatusCode, $"{(int)response.StatusCode}: {text}");
        if (!stream)
        {
            var whole = JsonNode.Parse(text)!;
            return ([whole["choices"]![0]!], whole["usage"]);
        }

        var chunks = text.Split('\n').Where(l => l.StartsWith("data: {", StringComparison.Ordinal)).Select(l => JsonNode.Parse(l[6..])!).ToList();
        return ([.. chunks.SelectMany(c => c["choices"]!.AsArray().Select(x => x!))], chunks.LastOrDefault(c => c["usage"] is not null)?["usage"]);
    }
}
