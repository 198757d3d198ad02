// A console app that hosts CoordGen and holds 8 chats at once through IChatClient (Microsoft.Extensions.AI).
// Options come from appsettings.json's "CoordGen" section (and COORDGEN__* environment variables, --CoordGen:Key=value
// arguments), are checked when the runtime starts, and disposing the host stops the runtime.
using System.Diagnostics;
using CoordGen;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;

var builder = Host.CreateApplicationBuilder(args);
builder.Services.AddCoordGen(builder.Configuration.GetSection(CoordGenOptions.DefaultSection));
using var host = builder.Build();
var chat = host.Services.GetRequiredService<IChatClient>();

string[] documents =
[
    "The old lighthouse on the northern cape was kept by a single keeper for forty years. Every evening the keeper climbed the narrow stairs, trimmed the wick and lit the great lamp.",
    "The harbour master kept a ledger of every ship: its name, its cargo and the hour it came in. In the winter storms the ledger filled slowly.",
    "The village school had one room and one stove. The teacher arrived before dawn to light the stove so the children would find the room warm.",
    "A baker on the corner rose at three each morning. By six the bread was on the shelves and the first customers were at the door.",
];
string[] questions = ["Summarize the document.", "What happens every day in the document?"];

var sw = Stopwatch.StartNew();
var chats = Enumerable.Range(0, 8).Select(async i =>
{
    List<ChatMessage> messages = [new(ChatRole.System, documents[i % documents.Length]), new(ChatRole.User, questions[i % questions.Length])];
    var text = new System.Text.StringBuilder();
    int tokens = 0;
    await foreach (var update in chat.GetStreamingResponseAsync(messages, new ChatOptions { MaxOutputTokens = 48, Temperature = 0 }))
    {
        text.Append(update.Text);
        tokens += update.Contents.OfType<UsageContent>().Sum(u => (int)(u.Details.OutputTokenCount ?? 0));
    }

    return (Chat: i, Text: text.ToString().Trim(), Tokens: tokens);
}).ToArray();

var results = await Task.WhenAll(chats);
foreach (var (i, text, tokens) in results)
{
    Console.WriteLine($"chat {i}: {tokens} tokens: {text}");
}

int total = results.Sum(r => r.Tokens);
Console.WriteLine($"8 chats, {total} tokens in {sw.Elapsed.TotalSeconds:F2} s ({total / sw.Elapsed.TotalSeconds:F0} tokens/s together)");
return results.All(r => r.Tokens > 0 && r.Text.Length > 0) ? 0 : 1;
