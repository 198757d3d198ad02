using System.Diagnostics;
using System.Threading.Channels;
using Akka.Actor;
using CoordGen.Engine;
using CoordGen.Engine.Model;
using CoordGen.Engine.Workloads;
using CoordGen.Messages;
using static CoordGen.Messages.GenerationProtocol;

namespace CoordGen.Host.Commands;

/// <summary>What the benchmarks that drive the actor runtime share: workload prompts and one greedy stream.</summary>
internal static class BenchStreams
{
    /// <summary>
    /// The first <paramref name="perTask"/> prompts of each held-out task family, rendered and tokenized,
    /// interleaved (summary 0, rag 0, ui 0, reply 0, summary 1, ...), so any first N prompts mix the
    /// families evenly and points of a sweep that use fewer prompts see the same mix.
    /// </summary>
    public static List<(int[] Tokens, int MaxTokens)> Prompts(ModelBundle bundle, int perTask, IEnumerable<string>? files = null)
    {
        string root = ModelLocator.RepoRoot();
        files ??= new[] { "summary", "rag", "ui", "reply" }.Select(t => Path.Combine(root, "workloads", t + ".jsonl"));
        var perFile = files.Select(f => WorkloadItem.Load(f).Take(perTask).ToList()).ToList();
        var items = Enumerable.Range(0, perTask).SelectMany(k => perFile.Where(l => k < l.Count).Select(l => l[k]));
        return [.. items.Select(i => (bundle.Tokenizer.Encode(PromptTemplate.Render(i.Context, i.Prompt, bundle.HasRoleTokens)), i.MaxTokens))];
    }

    /// <summary>One greedy request through the supervisor: its tokens and their arrival times (Stopwatch timestamps).</summary>
    public static async Task<(int[] Tokens, long[] Arrivals)> RunAsync(IActorRef supervisor, int[] prompt, int maxTokens, string method, int width, CancellationToken ct, bool adaptive = false)
    {
        var channel = Channel.CreateBounded<GeneratedToken>(64);
        var reply = SendAsync(supervisor, prompt, maxTokens, method, width, channel.Writer, ct, adaptive);
        var tokens = new List<int>();
        var arrivals = new List<long>();
        await foreach (var (t, _) in channel.Reader.ReadAllAsync(ct))
        {
            arrivals.Add(Stopwatch.GetTimestamp());
            tokens.Add(t);
        }

        await reply;
        return ([.. tokens], [.. arrivals]);
    }

    /// <summary>One greedy request through the supervisor, its tokens written to <paramref name="output"/>; throws if it fails. <paramref name="session"/> names it in the runtime's spans.</summary>
    public static async Task SendAsync(IActorRef supervisor, int[] prompt, int maxTokens, string method, int width, ChannelWriter<GeneratedToken> output, CancellationToken ct, bool adaptive = false, string session = "bench")
    {
        var reply = await supervisor.Ask<object>(new Generate(new SessionId(session), TokenSequence.From(prompt), maxTokens, new Sampling(), method, width, null, output, ct) { AdaptiveWidth = adaptive }, Timeout.InfiniteTimeSpan);
        if (reply is GenerationFailed f)
        {
            throw new InvalidOperationException($"a benchmark stream failed: {f.Detail}");
        }
    }

    /// <summary>
    /// Inter-token gaps of one stream, each with the arrival it ends at. Tokens arrive in bursts (a
    /// verified tree commits several at once): a burst of k tokens after a gap g counts as k gaps of
    /// g / k each; tokens less than <paramref name="burstMs"/> apart are one burst.
    /// </summary>
    public static List<(long At, double Ms)> Gaps(long[] arrivals, double burstMs = 0.05)
    {
        var gaps = new List<(long, double)>();
        for (int i = 1; i < arrivals.Length;)
        {
            double g = Stopwatch.GetElapsedTime(arrivals[i - 1], arrivals[i]).TotalMilliseconds;
            int k = 1;
            while (i + k < arrivals.Length && Stopwatch.GetElapsedTime(arrivals[i + k - 1], arrivals[i + k]).TotalMilliseconds < burstMs)
            {
                k++;
            }

            for (int j = 0; j < k; j++)
            {
                gaps.Add((arrivals[i + j], g / k));
            }

            i += k;
        }

        return gaps;
    }

    /// <summary>Gaps between deliveries: a burst (tokens less than <paramref name="burstMs"/> apart, one step's commit) is one delivery; each gap ends at a burst's first token.</summary>
    public static List<(long At, double Ms)> DeliveryGaps(long[] arrivals, double burstMs = 0.05)
    {
        var gaps = new List<(long, double)>();
        for (int i = 1; i < arrivals.Length; i++)
        {
            double g = Stopwatch.GetElapsedTime(arrivals[i - 1], arrivals[i]).TotalMilliseconds;
            if (g >= burstMs)
            {
                gaps.Add((arrivals[i], g));
            }
        }

        return gaps;
    }
}
