using System.Runtime.CompilerServices;
using System.Threading.Channels;
using Microsoft.Extensions.AI;
using static CoordGen.Messages.GenerationProtocol;

namespace CoordGen.Host.Serving;

/// <summary>
/// <see cref="IChatClient"/> (Microsoft.Extensions.AI) over an in-process <see cref="InferenceService"/>:
/// apps that already speak IChatClient get CoordGen's speculative decoding without HTTP. Options map
/// like the HTTP API: MaxOutputTokens, Temperature, TopP, TopK, Seed, StopSequences; the
/// additional property "context_store" names a store to draft from.
/// </summary>
public sealed class CoordGenChatClient(InferenceService service) : IChatClient
{
    public async Task<ChatResponse> GetResponseAsync(IEnumerable<ChatMessage> messages, ChatOptions? options = null, CancellationToken cancellationToken = default)
    {
        var outcome = await service.RunAsync(Request(messages, options), _ => Task.CompletedTask, cancellationToken);
        return new ChatResponse(new ChatMessage(ChatRole.Assistant, outcome.Text))
        {
            ModelId = service.ModelName,
            FinishReason = outcome.FinishReason == "stop" ? ChatFinishReason.Stop : ChatFinishReason.Length,
            Usage = new UsageDetails { InputTokenCount = outcome.PromptTokens, OutputTokenCount = outcome.CompletionTokens, TotalTokenCount = outcome.PromptTokens + outcome.CompletionTokens },
        };
    }

    public async IAsyncEnumerable<ChatResponseUpdate> GetStreamingResponseAsync(IEnumerable<ChatMessage> messages, ChatOptions? options = null,
        [EnumeratorCancellation] CancellationToken cancellationToken = default)
    {
        var request = Request(messages, options);

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
                yield return new ChatResponseUpdate(ChatRole.Assistant, piece) { ModelId = service.ModelName };
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
            FinishReason = done.FinishReason == "stop" ? ChatFinishReason.Stop : ChatFinishReason.Length,
            Contents = [new UsageContent(new UsageDetails { InputTokenCount = done.PromptTokens, OutputTokenCount = done.CompletionTokens, TotalTokenCount = done.PromptTokens + done.CompletionTokens })],
        };
    }

    public object? GetService(Type serviceType, object? serviceKey = null) =>
        serviceKey is null && serviceType.IsInstanceOfType(this) ? this
        : serviceType == typeof(ChatClientMetadata) ? new ChatClientMetadata("coordgen", null, service.ModelName)
        : null;

    public void Dispose()
    {
        // The service is owned by whoever created it.
    }

    private InferenceRequest Request(IEnumerable<ChatMessage> messages, ChatOptions? options)
    {
        var turns = messages.Select(m => (m.Role == ChatRole.System ? "system" : m.Role == ChatRole.Assistant ? "assistant" : "user", m.Text)).ToList();
        string text = RequestParser.RenderChat(turns, service.Bundle.HasRoleTokens);
        int[] prompt = service.Encode(text);
        var sampling = new Sampling(options?.Temperature ?? 0f, options?.TopK ?? 0, options?.TopP ?? 1f, (int)((options?.Seed ?? 0) & 0x7fffffff));
        string? store = options?.AdditionalProperties?.TryGetValue("context_store", out var s) == true ? s?.ToString() : null;
        return new InferenceRequest(prompt, service.ResolveMaxTokens(prompt.Length, options?.MaxOutputTokens), sampling, options?.StopSequences?.ToList() ?? [], ContextStore: store);
    }
}
