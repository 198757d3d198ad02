using System.Threading.Channels;
using Akka.TestKit.Xunit2;
using CoordGen.Actors.Device;
using CoordGen.Engine;
using CoordGen.Engine.Generation;
using CoordGen.Engine.Model;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Speculative;
using CoordGen.Engine.Workloads;
using CoordGen.Messages;
using static CoordGen.Messages.GenerationProtocol;

namespace CoordGen.Actors.Tests;

/// <summary>End to end on the shipped demo model: eight concurrent sessions through the device actor.</summary>
public class DemoModelSessionSpecs : TestKit
{
    private static string RepoRoot()
    {
        for (var d = new DirectoryInfo(AppContext.BaseDirectory); d is not null; d = d.Parent)
        {
            if (File.Exists(Path.Combine(d.FullName, "CoordGen.sln")))
            {
                return d.FullName;
            }
        }

        throw new DirectoryNotFoundException("CoordGen.sln not found above the test binaries.");
    }

    [Fact]
    public async Task Eight_concurrent_sessions_on_the_demo_model_should_each_stream_what_they_produce_alone()
    {
        string root = RepoRoot();
        var demo = ModelBundle.Load(Path.Combine(root, "models", "coordgen-demo"));
        var items = new[] { "summary", "rag", "ui", "reply" }
            .SelectMany(t => WorkloadItem.Load(Path.Combine(root, "workloads", t + ".jsonl")).Take(2)).ToList();
        int[][] prompts = [.. items.Select(i => demo.Tokenizer.Encode(PromptTemplate.Render(i.Context, i.Prompt)))];
        // Every method, one session with adaptive width, greedy throughout.
        (string Method, bool Adaptive)[] runs = [("ar", false), ("sam+ours", false), ("pld", false), ("sam", false), ("pld+ours", false), ("sam+ours", true), ("sam+history", false), ("ar", false)];
        OrtModelRuntime NewRuntime() => new(demo.Weights, 2048, [1, 4, 8, 64]);

        var alone = new List<IReadOnlyList<int>>();
        using (var rt = NewRuntime())
        {
            var plain = new Generator(rt);
            foreach (var p in prompts)
            {
                alone.Add(plain.Generate(p, 32, new SamplingOptions(), demo.StopTokens).Tokens);
            }
        }

        var device = Sys.ActorOf(DeviceStandIn.Props(DeviceActor.Props(NewRuntime, demo.StopTokens)));
        var channels = runs.Select(_ => Channel.CreateBounded<GeneratedToken>(4)).ToArray();
        for (int i = 0; i < runs.Length; i++)
        {
            device.Tell(new Generate(new SessionId($"s{i}"), TokenSequence.From(prompts[i]), 32, new Sampling(), runs[i].Method, 8, null, channels[i].Writer, CancellationToken.None) { AdaptiveWidth = runs[i].Adaptive }, TestActor);
        }

        var streams = await Task.WhenAll(channels.Select(async c =>
        {
            var got = new List<int>();
            await foreach (var (t, _) in c.Reader.ReadAllAsync())
            {
                got.Add(t);
            }

            return got;
        }));
        for (int i = 0; i < runs.Length; i++)
        {
            Assert.True(alone[i].SequenceEqual(streams[i]), $"session {i} ({items[i].Id}, {runs[i].Method}{(runs[i].Adaptive ? ", adaptive" : "")}) differs from the prompt's greedy output alone");
        }
    }
}
