using CoordGen.Engine;
using CoordGen.Engine.Model;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Workloads;
using static CoordGen.Messages.GenerationProtocol;

namespace CoordGen.Host.Tests;

/// <summary>Float16 KV caches through the whole runtime (decision 0020): twice the sessions in a budget, speculation still lossless, the prefix cache on.</summary>
public class KvFormatServiceTests
{
    private static readonly Lazy<ModelBundle> Demo = new(() => ModelBundle.Load(Path.Combine(ServerProcess.RepoRoot, "models", "coordgen-demo")));

    [Fact]
    public async Task F16_service_should_hold_twice_the_sessions_and_give_speculation_the_plain_greedy_text()
    {
        var bundle = Demo.Value;
        var f32 = new CoordGenOptions { Capacity = 2048, KvBudgetMb = 60, MaxPending = 16 };
        var f16 = new CoordGenOptions { Capacity = 2048, KvBudgetMb = 60, MaxPending = 16, Kv = KvFormat.F16 };
        Assert.Equal(2 * InferenceService.MaxActiveSessions(bundle, f32), InferenceService.MaxActiveSessions(bundle, f16));

        await using var service = InferenceService.Start(bundle, f16);
        Assert.Equal(KvCache.BytesFor(6, 2, 32, 2048) / 2, service.SessionCacheBytes);
        var prompts = WorkloadItem.Load(Path.Combine(ServerProcess.RepoRoot, "workloads", "rag-shared.jsonl")).Take(4)
            .Select(w => bundle.Tokenizer.Encode(PromptTemplate.Render(w.Context, w.Prompt, bundle.HasRoleTokens))).ToList();
        Task<InferenceOutcome> Run(int[] p, string method) => service.RunAsync(new InferenceRequest(p, 40, new Sampling(), [], Method: method), _ => Task.CompletedTask, CancellationToken.None);

        // One at a time plain, then all at once speculative (sharing the document's cached blocks): the same text.
        var plain = new List<string>();
        foreach (var p in prompts)
        {
            plain.Add((await Run(p, "ar")).Text);
        }

        var spec = await Task.WhenAll(prompts.Select(p => Run(p, "sam+ours")));
        Assert.Equal(plain, spec.Select(o => o.Text));
        Assert.Contains(spec, o => o.CachedTokens > 0);
    }
}
