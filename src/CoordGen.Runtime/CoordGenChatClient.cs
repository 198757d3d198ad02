using System.Runtime.CompilerServices;
using System.Threading.Channels;
using CoordGen.Engine;
using Microsoft.Extensions.AI;
using static CoordGen.Messages.GenerationProtocol;

namespace CoordGen;

/// <summary>
/// <see cref="IChatClient"/> (Microsoft.Extensions.AI) over an in-process <see cref="InferenceService"/>:
/// apps that already speak IChatClient get CoordGen's speculative decoding without HTTP. Options map
/// like the HTTP API and are checked like it (temperature 0-2, top_p in (0, 1], up to 4 stop sequences):
/// MaxOutputTokens, Temperature, TopP, TopK, Seed, StopSequences; the additional property "context_store"
/// names a store to draft from (a store created in-prompt also opens the prompt's context section). Tools, response formats, penalties, tool messages and non-text contents
/// are refused with an <see cref="ApiException"/> naming them, never dropped.
/// </summary>
public sealed class CoordGenChatClient(InferenceService service, bool ownsService = false) : IChatClient, IAsyncDisposable
{
    /// <summary>Starts a runtime with <paramref name="options"/> and a client that owns it: disposing the client stops the runtime.</summary>
    public static CoordGenChatClient Start(CoordGenOptions options) => new(InferenceService.Start(options), ownsService: true);

    /// <summary>The runtime this client runs on.</summary>
    public InferenceService Service => service;

    private static string NewId() => "chatcmpl-" + Guid.NewGuid().ToString("N")[..24];

    public async Task<ChatResponse> GetResponseAsync(IEnumerable<ChatMessage> messages, ChatOptions? options = null, CancellationToken cancellationToken = default)
    {
        var outcome = await service.RunAsync(await RequestAsync(messages, options), _ => Task.CompletedTask, cancellationToken);
        string id = NewId();
        return new ChatResponse(new ChatMessage(ChatRole.Assistant, outcome.Text) { MessageId = id })
        {
            ResponseId = id,
            CreatedAt = DateTimeOffset.UtcNow,
            ModelId = service.ModelName,
            FinishReason = outcome.FinishReason == "stop" ? ChatFinishReason.Stop : ChatFinishReason.Length,
            Usage = new UsageDetails { InputTokenCount = outcome.PromptTokens, OutputTokenCount = outcome.CompletionTokens, TotalTokenCount = outcome.PromptTokens + outcome.CompletionTokens },
        };
    }

    public async IAsyncEnumerable<ChatResponseUpdate> GetStreamingResponseAsync(IEnumerable<ChatMessage> messages, ChatOptions? options = null,
        [EnumeratorCancellation] CancellationToken cancellationToken = default)
    {
        var request = await RequestAsync(messages, options);
        string id = NewId();
        var created = DateTimeOffset.UtcNow;

        // The run stops when the caller stops reading (breaks out, disposes the enumerator) as well as on its
        // token; pieces wait in a small bounded channel, so an idle reader holds generation back.
        using var stop = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        var pieces = Channel.CreateBounded<string>(new BoundedChannelOptions(16) { SingleReader = true, SingleWriter = true });
        var run = Task.Run(async () =>
        {
            try
            {
                var outcome = await service.RunAsync(request, p => pieces.Writer.WriteAsync(p, stop.Token).AsTask(), stop.Token);
                pieces.Writer.TryComplete();
                return outcome;
            }
            catch (Exception ex)
            {
                pieces.Writer.TryComplete(ex);
                throw;
            }
        }, CancellationToken.None);

        InferenceOutcome? done = null;
        try
        {
            await foreach (string piece in pieces.Reader.ReadAllAsync(cancellationToken))
            {
                yield return new ChatResponseUpdate(ChatRole.Assistant, piece) { ModelId = service.ModelName, ResponseId = id, MessageId = id, CreatedAt = created };
            }

            done = await run;
        }
        finally
        {
            if (done is null)
            {
                await stop.CancelAsync();
                try
                {
                    await run;
                }
                catch (Exception) when (stop.IsCancellationRequested)
                {
                    // The caller stopped reading; the run ended because of it.
                }
            }
        }

        yield return new ChatResponseUpdate
        {
            Role = ChatRole.Assistant,
            ModelId = service.ModelName,
            ResponseId = id,
            MessageId = id,
            CreatedAt = created,
            FinishReason = done.FinishReason == "stop" ? ChatFinishReason.Stop : ChatFinishReason.Length,
            Contents = [new UsageContent(new UsageDetails { InputTokenCount = done.PromptTokens, OutputTokenCount = done.CompletionTokens, TotalTokenCount = done.PromptTokens + done.CompletionTokens })],
        };
    }

    public object? GetService(Type serviceType, object? serviceKey = null) =>
        serviceKey is null && serviceType.IsInstanceOfType(this) ? this
        : serviceType == typeof(ChatClientMetadata) ? new ChatClientMetadata("coordgen", null, service.ModelName)
        : null;

    /// <summary>Stops the runtime if this client started it (<see cref="Start"/>); a service handed in stays with its owner (the DI container, for <c>AddCoordGen</c>).</summary>
    public void Dispose()
    {
        if (ownsService)
        {
            service.Dispose();
        }
    }

    public ValueTask DisposeAsync() => ownsService ? service.DisposeAsync() : ValueTask.CompletedTask;

    private async Task<InferenceRequest> RequestAsync(IEnumerable<ChatMessage> messages, ChatOptions? options)
    {
        ArgumentNullException.ThrowIfNull(messages);
        var turns = new List<(string Role, string Text)>();
        int i = 0;
        foreach (var m in messages)
        {
            string param = $"messages[{i++}]";
            string role = m.Role == ChatRole.System ? "system" : m.Role == ChatRole.Assistant ? "assistant" : m.Role == ChatRole.User ? "user"
                : throw ApiException.BadRequest($"'{param}' has role '{m.Role}': CoordGen takes system, user and assistant messages (the models here do not call tools).", param);
            foreach (var content in m.Contents)
            {
                if (content is not (TextContent or TextReasoningContent or UsageContent))
                {
                    throw ApiException.BadRequest($"'{param}' holds {content.GetType().Name}: CoordGen's models read text only; send TextContent.", param);
                }
            }

            turns.Add((role, m.Text));
        }

        if (options is not null)
        {
            if (options.Tools is { Count: > 0 })
            {
                throw new ApiException(400, "'tools' is not supported by CoordGen (the models here do not call tools); remove them from ChatOptions.", "tools", "unsupported_parameter");
            }

            if (options.ResponseFormat is not null and not ChatResponseFormatText)
            {
                throw new ApiException(400, "'response_format' is not supported by CoordGen (only text is served: no JSON mode or schemas); leave ChatOptions.ResponseFormat unset.", "response_format", "unsupported_parameter");
            }

            if (options.FrequencyPenalty is { } fp && fp != 0)
            {
                throw new ApiException(400, "'frequency_penalty' is not supported by CoordGen (penalties would change the model's distribution, which speculation keeps exactly); leave it unset.", "frequency_penalty", "unsupported_parameter");
            }

            if (options.PresencePenalty is { } pp && pp != 0)
            {
                throw new ApiException(400, "'presence_penalty' is not supported by CoordGen (penalties would change the model's distribution, which speculation keeps exactly); leave it unset.", "presence_penalty", "unsupported_parameter");
            }
        }

        var sampling = RequestParser.ValidSampling(options?.Temperature ?? 0, options?.TopP ?? 1, options?.TopK ?? 0, options?.Seed ?? 0);
        var stop = RequestParser.ValidStop(options?.StopSequences?.ToList() ?? []);
        string? store = options?.AdditionalProperties?.TryGetValue("context_store", out var s) == true ? s?.ToString() : null;

        // An in-prompt store's documents open the context section (as the HTTP server renders them).
        var documents = await service.StoreContextAsync(store);
        bool roles = service.Bundle.HasRoleTokens;
        string text = RequestParser.RenderChat(documents is null ? turns : [("system", documents.Text), .. turns], roles);
        int[] prompt = service.Encode(text);
        return new InferenceRequest(prompt, service.ResolveMaxTokens(prompt.Length, options?.MaxOutputTokens), sampling, stop, ContextStore: store)
        {
            KeepPrefix = documents is null ? null : service.PinFor(documents, PromptTemplate.ContextPrefix(documents.Text, roles), prompt),
        };
    }
}
