using System.Diagnostics;
using System.IO.Compression;
using CoordGen.Engine.Model;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Options;

namespace CoordGen.Host.Tests;

/// <summary>CoordGen as an app uses it: the library (AddCoordGen, IChatClient), its package and the sample app.</summary>
public class LibraryTests
{
    private static IConfiguration Config(params (string Key, string Value)[] pairs) =>
        new ConfigurationBuilder().AddInMemoryCollection(pairs.Select(p => new KeyValuePair<string, string?>("CoordGen:" + p.Key, p.Value))).Build();

    [Fact]
    public async Task AddCoordGen_should_bind_options_serve_an_IChatClient_and_stop_everything_when_the_container_is_disposed()
    {
        var services = new ServiceCollection()
            .AddCoordGen(Config(("Capacity", "512"), ("Method", "ar")).GetSection(CoordGenOptions.DefaultSection), o => o.KvBudgetMb = 64)
            .BuildServiceProvider();
        var chat = services.GetRequiredService<IChatClient>();
        var runtime = services.GetRequiredService<InferenceService>();
        Assert.Equal(512, runtime.Settings.Capacity);
        Assert.Equal("ar", runtime.Settings.Method);
        Assert.Equal(64, runtime.Settings.KvBudgetMb);

        var reply = await chat.GetResponseAsync([new(ChatRole.User, "Summarize the document.")], new ChatOptions { MaxOutputTokens = 6 });
        Assert.Equal(6, reply.Usage!.OutputTokenCount);
        Assert.StartsWith("chatcmpl-", reply.ResponseId);

        await services.DisposeAsync();
        Assert.True(runtime.IsDisposed);
        await runtime.Terminated.WaitAsync(TimeSpan.FromSeconds(10));
        await Assert.ThrowsAsync<ObjectDisposedException>(() => chat.GetResponseAsync([new(ChatRole.User, "hi")], new ChatOptions { MaxOutputTokens = 2 }).WaitAsync(TimeSpan.FromSeconds(30)));
    }

    [Fact]
    public void AddCoordGen_should_refuse_invalid_options_with_the_servers_messages()
    {
        using var services = new ServiceCollection().AddCoordGen(o => { o.Capacity = 5; o.Method = "magic"; }).BuildServiceProvider();
        var ex = Assert.Throws<OptionsValidationException>(() => services.GetRequiredService<IChatClient>());
        Assert.Contains("Capacity must be between 16 and 65536 (got 5)", ex.Message);
        Assert.Contains("Method", ex.Message);
    }

    [Fact]
    public async Task Chat_client_should_check_requests_like_the_http_api()
    {
        var bundle = ModelBundle.Load(Path.Combine(ServerProcess.RepoRoot, "models", "coordgen-demo"));
        await using var client = new CoordGenChatClient(InferenceService.Start(bundle, new CoordGenOptions { Capacity = 256, KvBudgetMb = 32 }), ownsService: true);
        ChatMessage[] hi = [new(ChatRole.User, "hi")];

        async Task Refused(IEnumerable<ChatMessage> messages, ChatOptions options, string param)
        {
            var ex = await Assert.ThrowsAsync<ApiException>(() => client.GetResponseAsync(messages, options));
            Assert.Equal(400, ex.Status);
            Assert.Equal(param, ex.Param);
        }

        await Refused(hi, new ChatOptions { Temperature = 5 }, "temperature");
        await Refused(hi, new ChatOptions { TopP = 0 }, "top_p");
        await Refused(hi, new ChatOptions { StopSequences = ["a", "b", "c", "d", "e"] }, "stop");
        await Refused(hi, new ChatOptions { FrequencyPenalty = 0.5f }, "frequency_penalty");
        await Refused(hi, new ChatOptions { ResponseFormat = ChatResponseFormat.Json }, "response_format");
        await Refused(hi, new ChatOptions { Tools = [AIFunctionFactory.Create(() => 1, "one")] }, "tools");
        await Refused([new ChatMessage(ChatRole.User, [new TextContent("look"), new DataContent(new byte[] { 1, 2, 3 }, "image/png")])], new ChatOptions(), "messages[0]");
        await Refused([new ChatMessage(ChatRole.Tool, "42"), new ChatMessage(ChatRole.User, "and?")], new ChatOptions(), "messages[0]");

        var ok = await client.GetResponseAsync(hi, new ChatOptions { MaxOutputTokens = 3, Temperature = 0.7f, Seed = 3 });
        Assert.Equal(3, ok.Usage!.OutputTokenCount);
        Assert.Equal(ok.ResponseId, ok.Messages[0].MessageId);
    }

    [Fact]
    public async Task Runs_ended_by_the_step_watchdog_should_resume_and_give_the_same_text()
    {
        // Real graph runs, ended mid-way by ONNX Runtime's terminate flag (not an injected fault): a 1 ms watchdog
        // ends the 256-wide prefill runs until each graph's limit has doubled past its run time.
        var bundle = ModelBundle.Load(Path.Combine(ServerProcess.RepoRoot, "models", "coordgen-demo"));
        string document = string.Concat(Enumerable.Repeat("The keeper climbed the narrow stairs, trimmed the wick and lit the great lamp. ", 20));
        int[] prompt = bundle.Tokenizer.Encode(Engine.PromptTemplate.Render(document, "Summarize the document.", bundle.HasRoleTokens));
        var request = new InferenceRequest(prompt, 32, new(0, 0, 1, 0), [], Method: "sam+ours");

        InferenceOutcome clean;
        await using (var plain = InferenceService.Start(bundle, new CoordGenOptions { PrefillWidth = 256, StepWatchdogMs = 0, Capacity = 1024, KvBudgetMb = 64, WarmUp = false }))
        {
            clean = await plain.RunAsync(request, _ => Task.CompletedTask, CancellationToken.None);
        }

        await using var watched = InferenceService.Start(bundle, new CoordGenOptions { PrefillWidth = 256, StepWatchdogMs = 1, Capacity = 1024, KvBudgetMb = 64, WarmUp = false }, maxAttempts: 500);
        var outcome = await watched.RunAsync(request, _ => Task.CompletedTask, CancellationToken.None);
        Assert.Equal(clean.Text, outcome.Text);
        Assert.True(outcome.Attempts > 1, "the watchdog never ended a run");
    }

    [Fact]
    public async Task Library_should_pack_into_a_package_without_the_server()
    {
        string outDir = Path.Combine(Path.GetTempPath(), "coordgen-pack-" + Guid.NewGuid().ToString("N")[..8]);
        try
        {
            // As the README says: the solution packs the library and the projects it depends on, nothing else.
            var (code, output) = await Run("dotnet", ["pack", "CoordGen.sln", "-c", "Release", "--no-build", "-o", outDir], ServerProcess.RepoRoot);
            Assert.True(code == 0, output);
            Assert.Equal(["CoordGen.Actors.0.9.0.nupkg", "CoordGen.Engine.0.9.0.nupkg", "CoordGen.Messages.0.9.0.nupkg", "CoordGen.Runtime.0.9.0.nupkg"],
                Directory.GetFiles(outDir, "*.nupkg").Select(Path.GetFileName).Order(StringComparer.Ordinal));
            string package = Path.Combine(outDir, "CoordGen.Runtime.0.9.0.nupkg");
            using var zip = ZipFile.OpenRead(package);
            Assert.Contains(zip.Entries, e => e.FullName == "README.md");
            Assert.Contains(zip.Entries, e => e.FullName == "lib/net10.0/CoordGen.Runtime.dll");
            using var nuspec = new StreamReader(zip.Entries.Single(e => e.FullName.EndsWith(".nuspec", StringComparison.Ordinal)).Open());
            string spec = await nuspec.ReadToEndAsync();
            Assert.Contains("Microsoft.Extensions.AI.Abstractions", spec);
            Assert.Contains("id=\"CoordGen.Engine\" version=\"0.9.0\"", spec);
            foreach (string server in new[] { "AspNetCore", "Spectre", "ScottPlot", "System.CommandLine" })
            {
                Assert.DoesNotContain(server, spec);
            }
        }
        finally
        {
            if (Directory.Exists(outDir))
            {
                Directory.Delete(outDir, recursive: true);
            }
        }
    }

    [Fact]
    public async Task Sample_app_should_hold_8_chats_at_once()
    {
        string dll = Path.Combine(ServerProcess.RepoRoot, "samples", "ChatApp", "bin", "Release", "net10.0", "ChatApp.dll");
        Assert.True(File.Exists(dll), $"{dll} is not built: the solution builds the samples");
        var (code, output) = await Run("dotnet", [dll], ServerProcess.RepoRoot);
        Assert.True(code == 0, output);
        Assert.Equal(8, output.Split('\n').Count(l => l.StartsWith("chat ", StringComparison.Ordinal) && l.Contains(" 48 tokens: ", StringComparison.Ordinal)));
        Assert.Contains("8 chats, 384 tokens", output);
    }

    internal static async Task<(int Code, string Output)> Run(string file, string[] args, string workDir)
    {
        var psi = new ProcessStartInfo(file, args) { RedirectStandardOutput = true, RedirectStandardError = true, WorkingDirectory = workDir };
        psi.Environment["NO_COLOR"] = "1";
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        using var timeout = new CancellationTokenSource(TimeSpan.FromMinutes(3));
        await p.WaitForExitAsync(timeout.Token);
        return (p.ExitCode, await stdout + await stderr);
    }
}
