using System.Diagnostics.Metrics;
using CoordGen.Messages;

namespace CoordGen.Host.Serving;

/// <summary>The server's OpenTelemetry instruments (meter "CoordGen"), exported in Prometheus format at /metrics.</summary>
public static class ServerMetrics
{
    public const string MeterName = "CoordGen";
    private static readonly Meter Meter = new(MeterName, "1.0");

    public static readonly Counter<long> Requests = Meter.CreateCounter<long>("coordgen.requests", description: "Generation requests by endpoint and outcome.");
    public static readonly Counter<long> PromptTokens = Meter.CreateCounter<long>("coordgen.prompt_tokens", description: "Prompt tokens prefilled.");
    public static readonly Counter<long> GeneratedTokens = Meter.CreateCounter<long>("coordgen.generated_tokens", description: "Tokens generated.");
    public static readonly Counter<long> VerifySteps = Meter.CreateCounter<long>("coordgen.verify_steps", description: "Speculative verification steps (device passes).");
    public static readonly Counter<long> DraftTokens = Meter.CreateCounter<long>("coordgen.draft_tokens", description: "Draft tokens proposed and accepted, by source.");
    public static readonly Histogram<double> TokensPerStep = Meter.CreateHistogram<double>("coordgen.tokens_per_step", description: "Mean tokens committed per verification step, per request.");
    public static readonly Histogram<double> RequestDuration = Meter.CreateHistogram<double>("coordgen.request_duration", "s", "Time from admission to the last token.");

    public static void Record(GenerationProtocol.GenerationCompleted done, int promptTokens)
    {
        PromptTokens.Add(promptTokens);
        GeneratedTokens.Add(done.Tokens.Count);
        if (done.Speculation is { } s)
        {
            VerifySteps.Add(s.Steps);
            TokensPerStep.Record(s.TokensPerStep);
            foreach (var (source, n) in s.ProposedBySource)
            {
                DraftTokens.Add(n, new("source", source), new("outcome", "proposed"));
            }

            foreach (var (source, n) in s.AcceptedBySource)
            {
                DraftTokens.Add(n, new("source", source), new("outcome", "accepted"));
            }
        }
    }
}
