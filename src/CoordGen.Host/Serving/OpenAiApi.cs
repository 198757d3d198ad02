using System.Text.Json;
using System.Text.RegularExpressions;
using CoordGen.Actors.Supervision;
using CoordGen.Messages;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Routing;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;

namespace CoordGen.Host.Serving;

/// <summary>
/// The HTTP surface: OpenAI's chat and text completion endpoints (streaming as server-sent events),
/// model listing, health, and named context stores. Every refusal is an OpenAI-style error body
/// (<c>{"error": {"message", "type", "param", "code"}}</c>) whose message says what to do.
/// </summary>
public static partial class OpenAiApi
{
    private static readonly JsonSerializerOptions Json = new() { Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping, PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower, DefaultIgnoreCondition = System.Text.Json.Serialization.JsonIgnoreCondition.WhenWritingNull };

    public static void Map(IEndpointRouteBuilder app, InferenceService service)
    {
        app.MapPost("/v1/chat/completions", ctx => Handle(ctx, "chat", () => Complete(ctx, service, chat: true)));
        app.MapPost("/v1/completions", ctx => Handle(ctx, "completions", () => Complete(ctx, service, chat: false)));
        app.MapGet("/v1/models", ctx => Handle(ctx, "models", () => Write(ctx, 200, new { @object = "list", data = new[] { ModelCard(service) } })));
        app.MapGet("/v1/models/{id}", ctx => Handle(ctx, "models", () =>
        {
            string id = ctx.Request.RouteValues["id"] as string ?? "";
            return id == service.ModelName ? Write(ctx, 200, ModelCard(service))
                : throw new ApiException(404, $"model '{id}' is not served here; this server runs '{service.ModelName}' (GET /v1/models lists it).", "model", "model_not_found");
        }));
        app.MapGet("/health", ctx => Handle(ctx, "health", async () =>
        {
            var load = (SupervisionProtocol.Load)await service.AskAsync(SupervisionProtocol.GetLoad.Instance);
            await Write(ctx, 200, new
            {
                status = "ok",
                model = service.ModelName,
                pending = load.Pending,
                max_pending = load.MaxPending,
                faults = service.Faults is { } f ? new { spec = FaultSpec.Parse(service.Settings.Faults!).ToString(), injected = f.Injected, by_kind = f.ByKind.Where(k => k.Value > 0).ToDictionary(k => k.Key.ToString(), k => k.Value) } : null,
            });
        }));
        app.MapPost("/v1/context_stores", ctx => Handle(ctx, "context_stores", async () =>
        {
            using var doc = await ReadJson(ctx);
            string name = StoreName(RequestParser.String(doc.RootElement, "name", "name"));
            bool inPrompt = RequestParser.Bool(doc.RootElement, "in_prompt") ?? false;
            await WriteStoreReply(ctx, await service.AskAsync(new ContextStoreProtocol.CreateStore(name, inPrompt)), 201);
        }));
        app.MapGet("/v1/context_stores", ctx => Handle(ctx, "context_stores", async () =>
        {
            var list = (ContextStoreProtocol.StoreList)await service.AskAsync(new ContextStoreProtocol.ListStores());
            await Write(ctx, 200, new { @object = "list", data = list.Stores.Select(StoreCard) });
        }));
        app.MapDelete("/v1/context_stores/{name}", ctx => Handle(ctx, "context_stores", async () =>
        {
            string name = StoreName(ctx.Request.RouteValues["name"] as string);
            await WriteStoreReply(ctx, await service.AskAsync(new ContextStoreProtocol.DeleteStore(name)), 200);
        }));
        app.MapPost("/v1/context_stores/{name}/prefill", ctx => Handle(ctx, "context_stores", async () =>
        {
            string name = StoreName(ctx.Request.RouteValues["name"] as string);
            var done = await service.PrefillStoreAsync(name, ctx.RequestAborted);
            await Write(ctx, 200, new
            {
                name = done.Name,
                documents = done.Documents,
                prompt_tokens = done.PromptTokens,
                cached_tokens = done.CachedTokens,
                prefill_ms = Math.Round(done.PrefillMs, 2),
                prefix_cache = done.PrefixCache,
            });
        }));
        app.MapPost("/v1/context_stores/{name}/documents", ctx => Handle(ctx, "context_stores", async () =>
        {
            string name = StoreName(ctx.Request.RouteValues["name"] as string);
            using var doc = await ReadJson(ctx);
            string text = RequestParser.String(doc.RootElement, "text", "text") ?? throw ApiException.BadRequest("'text' is required: the document to add.", "text");
            if (text.Length == 0)
            {
                throw ApiException.BadRequest("'text' is empty: add a document with some text.", "text");
            }

            await WriteStoreReply(ctx, await service.AskAsync(new ContextStoreProtocol.AddDocument(name, TokenSequence.From(service.Encode(text)))), 200);
        }));
    }

    private static readonly long Created = DateTimeOffset.UtcNow.ToUnixTimeSeconds();

    /// <summary>The model object: OpenAI's fields, plus the context length under the names llama.cpp's server and vLLM use.</summary>
    private static object ModelCard(InferenceService service) => new
    {
        id = service.ModelName,
        @object = "model",
        created = Created,
        owned_by = "coordgen",
        context_length = service.Settings.Capacity,
        max_model_len = service.Settings.Capacity,
    };

    /// <summary>Routes and their methods, for the errors of unknown routes and wrong methods.</summary>
    public const string RouteList = "POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /v1/models/{id}, GET and POST /v1/context_stores, DELETE /v1/context_stores/{name}, POST /v1/context_stores/{name}/documents, POST /v1/context_stores/{name}/prefill, GET /health, GET /metrics";

    /// <summary>The endpoint label of a path in <c>coordgen.requests</c>.</summary>
    public static string EndpointOf(PathString path) =>
        path.StartsWithSegments("/v1/chat/completions") ? "chat"
        : path.StartsWithSegments("/v1/completions") ? "completions"
        : path.StartsWithSegments("/v1/models") ? "models"
        : path.StartsWithSegments("/v1/context_stores") ? "context_stores"
        : path.StartsWithSegments("/health") ? "health"
        : path.StartsWithSegments("/metrics") ? "metrics"
        : "other";

    /// <summary>Counts a request refused before it reached an endpoint (API key, rate limit, unknown route).</summary>
    public static void CountRefusal(HttpContext ctx, int status) =>
        RequestMetrics.Requests.Add(1, new("endpoint", EndpointOf(ctx.Request.Path)), new("outcome", status.ToString(System.Globalization.CultureInfo.InvariantCulture)));

    /// <summary>An OpenAI-shaped body for a 404 or 405 the router produced with none.</summary>
    public static Task WriteRoutingError(HttpContext ctx)
    {
        int status = ctx.Response.StatusCode;
        var ex = status == 405
            ? new ApiException(405, $"{ctx.Request.Method} is not allowed on {ctx.Request.Path}; use {(ctx.Response.Headers.Allow.Count > 0 ? ctx.Response.Headers.Allow.ToString() : "another method")}. Routes: {RouteList}.", code: "method_not_allowed")
            : new ApiException(status, status == 404 ? $"no route {ctx.Request.Method} {ctx.Request.Path}; CoordGen serves {RouteList}." : $"HTTP {status} on {ctx.Request.Path}.", code: status == 404 ? "not_found" : null);
        CountRefusal(ctx, status);
        ctx.Response.StatusCode = status;
        return ctx.Response.WriteAsJsonAsync(new { error = new { message = ex.Message, type = ex.Type, param = ex.Param, code = ex.Code } }, Json, ctx.RequestAborted);
    }

    private static async Task Complete(HttpContext ctx, InferenceService service, bool chat)
    {
        using var doc = await ReadJson(ctx);
        var req = chat ? RequestParser.ParseChat(doc.RootElement, service.Bundle.HasRoleTokens) : RequestParser.ParseCompletion(doc.RootElement);
        if (req.Model is { } m && m != service.ModelName && m != "default")
        {
            throw new ApiException(404, $"model '{m}' is not served here; this server runs '{service.ModelName}' (GET /v1/models lists it).", "model", "model_not_found");
        }

        // An in-prompt context store's documents open the prompt; the device keeps them prefilled.
        var store = await service.StoreContextAsync(req.ContextStore);
        var (text, prefix) = store is null ? (req.PromptText, "") : req.PromptWith(store.Text, service.Bundle.HasRoleTokens);
        int[] prompt = service.Encode(text);
        int maxTokens = service.ResolveMaxTokens(prompt.Length, req.MaxTokens);
        var request = new InferenceRequest(prompt, maxTokens, req.Sampling, req.Stop, req.Method, req.Width, req.ContextStore)
        {
            KeepPrefix = service.PinFor(store, prefix, prompt),
        };
        string id = (chat ? "chatcmpl-" : "cmpl-") + Guid.NewGuid().ToString("N")[..24];
        long created = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
        string kind = chat ? "chat.completion" : "text_completion";
        var ct = ctx.RequestAborted;

        LogOf(ctx).Set(id, 0, null);
        if (!req.Stream)
        {
            var outcome = await service.RunAsync(request, _ => Task.CompletedTask, ct);
            LogOf(ctx).Set(id, 200, outcome);
            object choice = chat
                ? new { index = 0, message = new { role = "assistant", content = outcome.Text }, finish_reason = outcome.FinishReason, logprobs = Logprobs(outcome.Logprobs, chat) }
                : new { index = 0, text = outcome.Text, finish_reason = outcome.FinishReason, logprobs = Logprobs(outcome.Logprobs, chat) };
            await Write(ctx, 200, new { id, @object = kind, created, model = service.ModelName, choices = new[] { choice }, usage = Usage(outcome), coordgen = Extra(outcome) });
            return;
        }

        string chunkKind = chat ? "chat.completion.chunk" : "text_completion";

        // The stream starts with the first piece of text, not before: a request refused by admission (or any
        // error before its first token) still gets its HTTP status (429 with Retry-After, 400, ...), which
        // clients and their retry policies act on.
        bool started = false;
        async Task Start()
        {
            if (started)
            {
                return;
            }

            started = true;
            ctx.Response.StatusCode = 200;
            ctx.Response.ContentType = "text/event-stream";
            ctx.Response.Headers.CacheControl = "no-cache";
            if (chat)
            {
                await Event(ctx, new { id, @object = chunkKind, created, model = service.ModelName, choices = new[] { new { index = 0, delta = new { role = "assistant", content = "" }, finish_reason = (string?)null } } });
            }
        }

        InferenceOutcome done;
        try
        {
            bool withLogprobs = req.Sampling.Logprobs is not null;
            done = await service.StreamAsync(request, async piece =>
            {
                await Start();
                object? logprobs = withLogprobs ? Logprobs(piece.Logprobs, chat) : null;
                await Event(ctx, chat
                    ? new { id, @object = chunkKind, created, model = service.ModelName, choices = new[] { new { index = 0, delta = (object)new { content = piece.Text }, logprobs, finish_reason = (string?)null } } }
                    : new { id, @object = chunkKind, created, model = service.ModelName, choices = new[] { new { index = 0, text = piece.Text, logprobs, finish_reason = (string?)null } } });
            }, ct);
        }
        catch (ApiException ex) when (started)
        {
            // Headers are sent: the error travels as an event, then the stream ends.
            LogOf(ctx).Set(id, ex.Status, null);
            await Event(ctx, new { error = new { message = ex.Message, type = ex.Type, param = ex.Param, code = ex.Code } });
            await ctx.Response.WriteAsync("data: [DONE]\n\n", ct);
            return;
        }

        LogOf(ctx).Set(id, 200, done);
        await Start();

        object last = chat
            ? new { id, @object = chunkKind, created, model = service.ModelName, choices = new[] { new { index = 0, delta = (object)new { }, finish_reason = (string?)done.FinishReason } }, coordgen = Extra(done) }
            : new { id, @object = chunkKind, created, model = service.ModelName, choices = new[] { new { index = 0, text = "", finish_reason = (string?)done.FinishReason } }, coordgen = Extra(done) };
        await Event(ctx, last);
        if (req.IncludeUsage)
        {
            await Event(ctx, new { id, @object = chunkKind, created, model = service.ModelName, choices = Array.Empty<object>(), usage = Usage(done) });
        }

        await ctx.Response.WriteAsync("data: [DONE]\n\n", ct);
    }

    /// <summary>
    /// Log-probabilities in OpenAI's shapes: chat's <c>{"content": [{token, logprob, bytes, top_logprobs}]}</c>,
    /// the completions API's <c>{tokens, token_logprobs, top_logprobs, text_offset}</c>; null when not asked for.
    /// </summary>
    private static object? Logprobs(IReadOnlyList<LogprobEntry>? entries, bool chat)
    {
        if (entries is null)
        {
            return null;
        }

        static int[] Bytes(byte[] b) => [.. b.Select(x => (int)x)];
        if (chat)
        {
            return new
            {
                content = entries.Select(e => new
                {
                    token = e.Token,
                    logprob = e.Logprob,
                    bytes = Bytes(e.Bytes),
                    top_logprobs = e.Top.Select(t => new { token = t.Token, logprob = t.Logprob, bytes = Bytes(t.Bytes) }),
                }),
                refusal = (object?)null,
            };
        }

        return new
        {
            tokens = entries.Select(e => e.Token),
            token_logprobs = entries.Select(e => e.Logprob),
            // Two alternatives can share a text (different byte sequences that both decode to U+FFFD): the likelier one is kept.
            top_logprobs = entries.Select(e => e.Top.GroupBy(t => t.Token).ToDictionary(g => g.Key, g => g.First().Logprob)),
            text_offset = entries.Select(e => e.TextOffset),
        };
    }

    private static object Usage(InferenceOutcome o) => new
    {
        prompt_tokens = o.PromptTokens,
        completion_tokens = o.CompletionTokens,
        total_tokens = o.PromptTokens + o.CompletionTokens,
        prompt_tokens_details = new { cached_tokens = o.CachedTokens },
    };

    private static object Extra(InferenceOutcome o) => new
    {
        timings = new
        {
            prefill_ms = Math.Round(o.PrefillMs, 2),
            decode_ms = Math.Round(o.DecodeMs, 2),
            decode_tokens_per_second = o.DecodeMs > 0 ? Math.Round(o.CompletionTokens / (o.DecodeMs / 1000), 2) : 0,
        },
        speculation = o.Speculation is { } s ? new
        {
            method = s.Method,
            width = s.Width,
            steps = s.Steps,
            tokens_per_step = Math.Round(s.TokensPerStep, 3),
            draft_tokens_proposed = s.ProposedBySource,
            draft_tokens_accepted = s.AcceptedBySource,
            draft_ms = Math.Round(s.DraftMs, 3),
        } : null,
    };

    private static async Task Event(HttpContext ctx, object payload)
    {
        await ctx.Response.WriteAsync("data: " + JsonSerializer.Serialize(payload, Json) + "\n\n", ctx.RequestAborted);
        await ctx.Response.Body.FlushAsync(ctx.RequestAborted);
    }

    private static async Task<JsonDocument> ReadJson(HttpContext ctx)
    {
        try
        {
            using var buffer = new MemoryStream();
            await ctx.Request.Body.CopyToAsync(buffer, ctx.RequestAborted);
            return RequestParser.ReadDocument(buffer.ToArray());
        }
        catch (BadHttpRequestException ex) when (ex.StatusCode == 413)
        {
            throw new ApiException(413, $"the request body is larger than this server accepts ({ctx.Features.Get<Microsoft.AspNetCore.Http.Features.IHttpMaxRequestBodySizeFeature>()?.MaxRequestBodySize} bytes); send less context or raise MaxBodyBytes.", code: "request_too_large");
        }
    }

    private static string StoreName(string? name)
    {
        if (name is null || !StoreNamePattern().IsMatch(name))
        {
            throw ApiException.BadRequest($"a context store name must be 1-64 letters, digits, '-' or '_' (got '{name}').", "name");
        }

        return name;
    }

    [GeneratedRegex("^[A-Za-z0-9_-]{1,64}$")]
    private static partial Regex StoreNamePattern();

    private static object StoreCard(ContextStoreProtocol.StoreInfo s) => new { name = s.Name, documents = s.Documents, tokens = s.Tokens, in_prompt = s.InPrompt };

    private static Task WriteStoreReply(HttpContext ctx, object reply, int okStatus) => reply switch
    {
        ContextStoreProtocol.StoreInfo s => Write(ctx, okStatus, StoreCard(s)),
        ContextStoreProtocol.StoreDeleted d => Write(ctx, okStatus, new { name = d.Name, @object = "context_store.deleted", deleted = true, documents = d.Documents, tokens = d.Tokens }),
        ContextStoreProtocol.StoreMissing m => throw InferenceService.StoreMissing(m.Name, "name"),
        ContextStoreProtocol.StoreRefused r => throw new ApiException(409, r.Reason, "name", r.Code),
        _ => throw new ApiException(500, "unexpected reply from the context store actor; please report this."),
    };

    private static Task Write(HttpContext ctx, int status, object payload)
    {
        ctx.Response.StatusCode = status;
        return ctx.Response.WriteAsJsonAsync(payload, Json, ctx.RequestAborted);
    }

    /// <summary>What the request log says of a completion request, filled as it runs.</summary>
    private sealed class LogEntry
    {
        public string? Id { get; private set; }

        public int Status { get; private set; }

        public InferenceOutcome? Outcome { get; private set; }

        public void Set(string id, int status, InferenceOutcome? outcome) => (Id, Status, Outcome) = (id, status, outcome);
    }

    private static LogEntry LogOf(HttpContext ctx)
    {
        if (ctx.Items["coordgen.log"] is not LogEntry e)
        {
            ctx.Items["coordgen.log"] = e = new LogEntry();
        }

        return e;
    }

    /// <summary>Runs an endpoint: refusals become OpenAI-style errors; a vanished client is not an error. Completion requests get one line in the request log.</summary>
    private static async Task Handle(HttpContext ctx, string endpoint, Func<Task> run)
    {
        string outcome = "ok";
        int status = 200;
        long started = System.Diagnostics.Stopwatch.GetTimestamp();
        var log = ctx.RequestServices.GetService<ILoggerFactory>()?.CreateLogger(RequestLogCategory);
        try
        {
            await run();
        }
        catch (ApiException ex)
        {
            status = ex.Status;
            outcome = ex.Status.ToString(System.Globalization.CultureInfo.InvariantCulture);
            await WriteError(ctx, ex);
        }
        catch (OperationCanceledException) when (ctx.RequestAborted.IsCancellationRequested)
        {
            status = 499;
            outcome = "client_closed";
        }
        catch (Exception ex) when (ex is not OperationCanceledException)
        {
            status = 500;
            outcome = "500";
            if (log is not null)
            {
                log.LogError(ex, "internal error on {Method} {Path}", ctx.Request.Method, ctx.Request.Path.Value);
            }

            await WriteError(ctx, new ApiException(500, $"internal error: {ex.Message}. The server keeps running; please report this."));
        }
        finally
        {
            RequestMetrics.Requests.Add(1, new("endpoint", endpoint), new("outcome", outcome));
            if (log is not null && endpoint is "chat" or "completions")
            {
                var e = LogOf(ctx);
                var o = e.Outcome;
                if (e.Status > 0 && status == 200)
                {
                    status = e.Status;
                }

                double? ttft = o?.TimeToFirstTokenMs is { } t ? Math.Round(t, 1) : null;
                double duration = Math.Round(System.Diagnostics.Stopwatch.GetElapsedTime(started).TotalMilliseconds, 1);
                double? perStep = o?.Speculation is { } sp ? Math.Round(sp.TokensPerStep, 3) : null;
                // faults_injected is null unless fault injection is on.
                log.LogInformation(
                    "request {RequestId} {Endpoint} status={Status} prompt_tokens={PromptTokens} cached_tokens={CachedTokens} generated_tokens={GeneratedTokens} ttft_ms={TtftMs} duration_ms={DurationMs} tokens_per_step={TokensPerStep} faults_injected={FaultsInjected}",
                    e.Id ?? ctx.TraceIdentifier, endpoint, status, o?.PromptTokens, o?.CachedTokens, o?.CompletionTokens, ttft, duration, perStep,
                    ctx.RequestServices.GetService<InferenceService>()?.Faults?.Injected);
            }
        }
    }

    /// <summary>Logger category of the request log: one line per completion request.</summary>
    public const string RequestLogCategory = "CoordGen.Requests";

    public static async Task WriteError(HttpContext ctx, ApiException ex)
    {
        if (ctx.Response.HasStarted || ctx.RequestAborted.IsCancellationRequested)
        {
            return;
        }

        ctx.Response.Clear();
        if (ex.RetryAfterSeconds > 0)
        {
            ctx.Response.Headers.RetryAfter = ex.RetryAfterSeconds.ToString(System.Globalization.CultureInfo.InvariantCulture);
        }

        await Write(ctx, ex.Status, new { error = new { message = ex.Message, type = ex.Type, param = ex.Param, code = ex.Code } });
    }
}
