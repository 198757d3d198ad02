using CoordGen;
using Xunit;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;

namespace FaultTests;

/// <summary>
/// How an app tests its own resilience with CoordGen: host it with a seeded fault schedule (device exceptions,
/// hangs, NaN logits, drafter and calibrator crashes, killed sessions), run the chats the app runs, and check
/// that every stream completes exactly as it does without faults.
/// </summary>
public class StreamsUnderFaultsTests
{
    private static readonly (string Document, string Question)[] Chats =
    [
        ("The old lighthouse on the northern cape was kept by a single keeper for forty years.", "Summarize the document."),
        ("The harbour master kept a ledger of every ship: its name, its cargo and the hour it came in.", "What did the harbour master keep?"),
        ("The village school had one room and one stove.", "Summarize the document."),
        ("A baker on the corner rose at three each morning.", "When did the baker rise?"),
    ];

    private static IHost Host(Action<CoordGenOptions> configure)
    {
        var builder = Microsoft.Extensions.Hosting.Host.CreateApplicationBuilder();
        builder.Services.AddCoordGen(o =>
        {
            o.Capacity = 512;
            o.KvBudgetMb = 128;
            configure(o);
        });
        return builder.Build();
    }

    private static async Task<string[]> RunChats(IChatClient chat, int copies)
    {
        var streams = Enumerable.Range(0, copies * Chats.Length).Select(async i =>
        {
            var (document, question) = Chats[i % Chats.Length];
            var text = new System.Text.StringBuilder();
            await foreach (var update in chat.GetStreamingResponseAsync([new(ChatRole.System, document), new(ChatRole.User, question)], new ChatOptions { MaxOutputTokens = 40, Temperature = 0 }))
            {
                text.Append(update.Text);
            }

            return text.ToString();
        });
        return await Task.WhenAll(streams);
    }

    [Fact]
    public async Task Every_stream_should_complete_unchanged_while_faults_strike()
    {
        string[] expected;
        using (var clean = Host(_ => { }))
        {
            await clean.StartAsync();
            expected = await RunChats(clean.Services.GetRequiredService<IChatClient>(), copies: 2);
            await clean.StopAsync();
        }

        using var faulty = Host(o =>
        {
            o.Faults = "kinds=DeviceException,DeviceHang,NonFiniteLogits,DrafterCrash,CalibratorCrash,SessionKill;gap=2;seed=11";
            o.AllowFaults = true;
        });
        await faulty.StartAsync();
        var chat = faulty.Services.GetRequiredService<IChatClient>();
        var runtime = faulty.Services.GetRequiredService<InferenceService>();
        for (int round = 0; round < 3; round++)
        {
            Assert.Equal(expected, await RunChats(chat, copies: 2));
        }

        Assert.True(runtime.Faults!.Injected >= 10, $"only {runtime.Faults.Injected} faults struck");
        await faulty.StopAsync();
    }

    [Fact]
    public void Faults_should_be_refused_unless_explicitly_allowed()
    {
        using var host = Host(o => o.Faults = "kinds=DeviceException");
        var ex = Assert.Throws<Microsoft.Extensions.Options.OptionsValidationException>(() => host.Services.GetRequiredService<IChatClient>());
        Assert.Contains("AllowFaults", ex.Message);
    }
}
