using System.Diagnostics.Metrics;
using CoordGen.Messages;

namespace CoordGen;

/// <summary>The server's OpenTelemetry instruments (meter "CoordGen"), exported in Prometheus format at /metrics.</summary>
public static class RequestMetrics
{
    public const string MeterName = "CoordGen";
    private static readonly Meter Meter = new(MeterName, "1.0");

    public static readonly Counter<long> Requests = Meter.CreateCounter<long>("coordgen.requests", description: "Generation requests by endpoint and outcome.");
    public static readonly Counter<long> PromptTokens = Meter.CreateCounter<long>("coordgen.prompt_tokens", description: "Prompt tokens of completed requests, those whose keys and values came from the prefix cache included (coordgen.prefix_cache.tokens splits them).");
    public static readonly Counter<long> GeneratedTokens = Meter.CreateCounter<long>("coordgen.generated_tokens", description: "Tokens generated.");
    public static readonly Counter<long> VerifySteps = Meter.CreateCounter<long>("coordgen.verify_steps", description: "Speculative verification steps (device passes).");
    public static readonly Counter<long> DraftTokens = Meter.CreateCounter<long>("coordgen.draft_tokens", description: "Draft tokens proposed and accepted, by source.");
    public static readonly Histogram<double> TokensPerStep = Meter.CreateHistogram<double>("coordgen.tokens_per_step", description: "Mean tokens committed per verification step, per request.");
    // OpenTelemetry's GenAI semantic conventions where one exists (seconds, token counts by gen_ai.token.type).
    public static readonly Histogram<double> TimeToFirstToken = Meter.CreateHistogram<double>("gen_ai.server.time_to_first_token", "s", "Time from the request reaching the runtime to its first generated token.",
        advice: Buckets(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0));
    public static readonly Histogram<double> TimePerOutputToken = Meter.CreateHistogram<double>("gen_ai.server.time_per_output_token", "s", "Time per generated token after the first.",
        advice: Buckets(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5));
    public static readonly Histogram<double> RequestDuration = Meter.CreateHistogram<double>("gen_ai.server.request.duration", "s", "Time from the request reaching the runtime to its end, by outcome (error.type on failures).",
        advice: Buckets(0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92));
    public static readonly Histogram<long> TokenUsage = Meter.CreateHistogram<long>("gen_ai.client.token.usage", "{token}", "Input and output tokens per request (gen_ai.token.type), as the in-process client and the server see them.",
        advice: new InstrumentAdvice<long> { HistogramBucketBoundaries = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536] });
    public static readonly Histogram<double> QueueWait = Meter.CreateHistogram<double>("coordgen.request.queue_wait", "s", "Time a completed request spent neither prefilling nor decoding: waiting for admission, the KV budget or the device.",
        advice: Buckets(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30));

    // The running services whose KV budget and use the gauges report (added at start, removed at disposal).
    private static readonly List<InferenceService> Services = [];

    /// <summary>Histogram buckets in seconds, as the GenAI conventions advise (the SDK's defaults suit milliseconds).</summary>
    private static InstrumentAdvice<double> Buckets(params double[] seconds) => new() { HistogramBucketBoundaries = seconds };

    static RequestMetrics()
    {
        Meter.CreateObservableGauge("coordgen.kv.in_use", () => Live().Select(s => new Measurement<long>(s.KvBytesInUse)), "By", "KV cache bytes held by requests being generated.");
        Meter.CreateObservableGauge("coordgen.kv.budget", () => Live().Select(s => new Measurement<long>(s.KvBudgetBytes)), "By", "KV cache budget (--kv-budget-mb).");
    }

    /// <summary>Reports the service's KV budget and use in the gauges until <see cref="Forget"/>.</summary>
    internal static void Observe(InferenceService service)
    {
        lock (Services)
        {
            Services.Add(service);
        }
    }

    internal static void Forget(InferenceService service)
    {
        lock (Services)
        {
            Services.Remove(service);
        }
    }

    private static List<InferenceService> Live()
    {
        lock (Services)
        {
            return [.. Services];
        }
    }

    /// <summary>The GenAI-convention metrics of one ended request.</summary>
    public static void Record(RequestRecord r, string model)
    {
        var op = new KeyValuePair<string, object?>("gen_ai.operation.name", "text_completion");
        var m = new KeyValuePair<string, object?>("gen_ai.request.model", model);
        if (r.Outcome == "ok")
        {
            RequestDuration.Record(r.DurationMs / 1000, op, m);
        }
        else
        {
            RequestDuration.Record(r.DurationMs / 1000, op, m, new("error.type", r.Outcome));
        }

        if (r.TimeToFirstTokenMs is { } ttft)
        {
            TimeToFirstToken.Record(ttft / 1000, op, m);
            if (r.CompletionTokens > 1)
            {
                TimePerOutputToken.Record((r.DurationMs - ttft) / 1000 / (r.CompletionTokens - 1), op, m);
            }
        }

        TokenUsage.Record(r.PromptTokens, op, m, new("gen_ai.token.type", "input"));
        TokenUsage.Record(r.CompletionTokens, op, m, new("gen_ai.token.type", "output"));
        if (r.QueueWaitMs is { } q)
        {
            QueueWait.Record(q / 1000);
        }
    }

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
