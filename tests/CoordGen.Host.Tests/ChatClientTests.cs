using CoordGen.Engine.Model;
using CoordGen.Host.Serving;
using Microsoft.Extensions.AI;

namespace CoordGen.Host.Tests;

/// <summary>The in-process <see cref="IChatClient"/> adapter over the actor runtime and the demo model.</summary>
public class ChatClientTests
{
    [Fact]
    public async Task Chat_client_should_stream_the_same_text_it_returns_whole_and_report_usage()
    {
        var bundle = ModelBundle.Load(Path.Combine(ServerProcess.RepoRoot, "models", "coordgen-demo"));
        await using var service = InferenceService.Start(bundle, new ServerSettings());
        IChatClient client = new CoordGenChatClient(service);
        ChatMessage[] messages =
        [
            new(ChatRole.System, "The keeper wrote in the logbook each hour, noting the wind, the sea and every ship that passed."),
            new(ChatRole.User, "Summarize the document."),
        ];
        var options = new ChatOptions { MaxOutputTokens = 20, Temperature = 0 };

        var whole = await client.GetResponseAsync(messages, options);
        var streamed = new List<ChatResponseUpdate>();
        await foreach (var u in client.GetStreamingResponseAsync(messages, options))
        {
            streamed.Add(u);
        }

        Assert.Equal(whole.Text, string.Concat(streamed.Select(u => u.Text)));
        Assert.Equal(20, whole.Usage!.OutputTokenCount);
        Assert.Equal(ChatFinishReason.Length, whole.FinishReason);
        Assert.Equal(ChatFinishReason.Length, streamed[^1].FinishReason);
        Assert.Equal("coordgen-demo", client.GetService<ChatClientMetadata>()!.DefaultModelId);
    }

    [Fact]
    public async Task Breaking_out_of_a_streamed_response_should_stop_generation()
    {
        var bundle = ModelBundle.Load(Path.Combine(ServerProcess.RepoRoot, "models", "coordgen-demo"));
        await using var service = InferenceService.Start(bundle, new ServerSettings { Method = "ar" });
        var finished = new TaskCompletionSource<RequestRecord>(TaskCreationOptions.RunContinuationsAsynchronously);
        service.RequestFinished += r => finished.TrySetResult(r);
        IChatClient client = new CoordGenChatClient(service);
        int updates = 0;
        await foreach (var _ in client.GetStreamingResponseAsync([new(ChatRole.User, "Tell a long story about the keeper.")], new ChatOptions { MaxOutputTokens = 1800, Temperature = 0 }))
        {
            if (++updates == 3)
            {
                break;
            }
        }

        var record = await finished.Task.WaitAsync(TimeSpan.FromSeconds(120));
        Assert.Equal("cancelled", record.Outcome);
        Assert.True(record.CompletionTokens < 600, $"generation went on to {record.CompletionTokens} tokens after the caller stopped reading");
    }

    [Fact]
    public async Task Chat_client_should_refuse_a_conversation_that_does_not_end_with_the_user()
    {
        var bundle = ModelBundle.Load(Path.Combine(ServerProcess.RepoRoot, "models", "coordgen-demo"));
        await using var service = InferenceService.Start(bundle, new ServerSettings());
        IChatClient client = new CoordGenChatClient(service);
        var ex = await Assert.ThrowsAsync<ApiException>(() => client.GetResponseAsync([new(ChatRole.Assistant, "hello")]));
        Assert.Contains("last message must be from the user", ex.Message);
    }
}
