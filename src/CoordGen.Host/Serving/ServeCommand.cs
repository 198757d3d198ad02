using System.CommandLine;
using System.Globalization;
using System.Net;
using System.Threading.RateLimiting;
using CoordGen.Host.Commands;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.RateLimiting;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using OpenTelemetry;
using OpenTelemetry.Metrics;
using OpenTelemetry.Trace;

namespace CoordGen.Host.Serving;

/// <summary><c>coordgen serve</c>: an OpenAI-compatible HTTP server over the actor runtime.</summary>
internal static class ServeCommand
{
    public static Command Create()
    {
        var config = new Option<FileInfo?>("--config") { Description = "A JSON settings file (like appsettings.json: { \"Server\": { \"Port\": 8080, ... } }).", HelpName = "FILE" };
        var model = CommonOptions.Model();
        var host = new Option<string?>("--host") { Description = "Address to bind. Default 127.0.0.1 (this machine only); 0.0.0.0 serves every interface (set --api-key too).", HelpName = "ADDR" };
        var port = new Option<int?>("--port") { Description = "TCP port. Default 8080; 0 picks a free port (the address is printed).", HelpName = "PORT" };
        var capacity = new Option<int?>("--capacity") { Description = "KV cache slots per request (prompt plus output). Default 2048.", HelpName = "N" };
        var prefillWidth = new Option<int?>("--prefill-width") { Description = "Width of the prefill graph. Default 64.", HelpName = "N" };
        var chunkWidth = new Option<int?>("--interleaved-chunk-width") { Description = "Tokens per prefill chunk while other requests are decoding (narrower chunks keep their streams smooth; a prompt with no one else decoding goes --prefill-width at a time). Default 32; at --prefill-width or above = off.", HelpName = "N" };
        var weights = new Option<Engine.Model.WeightFormat?>("--weights") { Description = "Linear layers' weights: F32 (default), Int8 or Int4, quantized at load time (docs/decisions/0012-quantized-weights.md)." };
        var kv = new Option<Engine.Runtime.KvFormat?>("--kv") { Description = "KV cache format: F32 (default) or F16, half the bytes per session, so the KV budget holds twice the sessions (docs/decisions/0020-float16-kv-cache.md)." };
        var watchdog = new Option<int?>("--step-watchdog-ms") { Description = "End a device run still going after this long (ONNX Runtime's RunOptions.Terminate); its request resumes from its committed tokens, and that graph's limit doubles. 0 = off. Default 30000.", HelpName = "MS" };
        var threads = new Option<int?>("--threads") { Description = "ONNX Runtime intra-op threads of the device; 0 (default) = one per core.", HelpName = "N" };
        var method = new Option<string?>("--method") { Description = "Default decoding method: ar, pld, sam, sam+history, pld+ours, sam+ours (default). Requests may choose their own with \"speculation\": {\"method\": ...}.", HelpName = "METHOD" };
        var width = new Option<int?>("--width") { Description = "Default verification width for speculative methods. Default 8.", HelpName = "N" };
        var maxPending = new Option<int?>("--max-pending") { Description = "Requests running or queued at once; more get 429 with Retry-After. Default 16.", HelpName = "N" };
        var kvBudget = new Option<int?>("--kv-budget-mb") { Description = "KV cache memory for all sessions together (MiB). Each running session holds one cache sized for --capacity; requests beyond what fits wait in line (within --max-pending). Default 1024.", HelpName = "MIB" };
        var maxBody = new Option<long?>("--max-body-bytes") { Description = "Largest request body accepted; larger gets 413. Default 1048576.", HelpName = "BYTES" };
        var apiKey = new Option<string?>("--api-key") { Description = "Require 'Authorization: Bearer KEY' on /v1 endpoints. Default: none (fine on loopback). Also COORDGEN_Server__ApiKey.", HelpName = "KEY" };
        var otlp = new Option<string?>("--otlp-endpoint") { Description = "Also export traces and metrics over OTLP to this collector (e.g. http://localhost:4317). Default: off; /metrics always serves Prometheus.", HelpName = "URL" };
        var deviceProfile = new Option<string?>("--device-profile") { Description = $"What-if: pace every device step to an accelerator latency profile ({string.Join(", ", CoordGen.Engine.Scheduling.DeviceProfile.Shipped)}, or a JSON file), so clients see an NPU's step times. Default: off (real timings).", HelpName = "NAME|FILE" };
        var prefixCache = new Option<bool?>("--prefix-cache") { Description = "true (default): keep prefilled prompts' keys and values (in 32-token blocks, inside --kv-budget-mb beside the sessions' caches) so a prompt that starts the same way (chat history, a shared document) prefills only the rest; usage reports prompt_tokens_details.cached_tokens. false: prefill every prompt whole. Output is the same either way (docs/decisions/0019-prefix-cache.md).", HelpName = "true|false" };
        var packedTrees = new Option<bool?>("--packed-trees") { Description = "true (default): speculative sessions' verification trees share packed runs too, when it pays; false: one tree per run. Output is the same either way (docs/decisions/0024-packed-trees.md).", HelpName = "true|false" };
        var mixedSteps = new Option<bool?>("--mixed-steps") { Description = "true (default): while a prompt is prefilled between other streams' steps, plain (ar) streams ride in the chunk's run when it pays (speculative streams' trees too with --mixed-trees); false: a chunk runs alone. Output is the same either way (docs/decisions/0026-decode-rows-ride-in-prefill-chunks.md).", HelpName = "true|false" };
        var mixedTrees = new Option<bool?>("--mixed-trees") { Description = "With --mixed-steps and --packed-trees: speculative streams' trees ride in a prefill chunk's run too when no plain stream is ready, the chunk waiting a moment for them (decision 0029). Default false: it brings a newcomer's first token sooner, but the device waits for drafting it otherwise hides. Output is the same either way.", HelpName = "true|false" };
        var kvPool = new Option<bool?>("--kv-pool") { Description = "true (default): keep ended sessions' KV cache memory for the next sessions (inside --kv-budget-mb, yielding to the prefix cache), so a new session's prefill does not wait for the operating system to map fresh pages; false: free it. Output is the same either way (docs/decisions/0030-kept-kv-caches.md).", HelpName = "true|false" };
        var packedGqa = new Option<bool?>("--packed-group-query") { Description = "true (default): packed runs attend with GroupQueryAttention over each session's cache in place (CPU, float32 weights and caches); false: the caches are joined per layer. Output is the same either way (docs/decisions/0023-kv-slot-pool-measured.md).", HelpName = "true|false" };
        var packed = new Option<bool?>("--packed-steps") { Description = "true (default): plain (ar) sessions decoding at the same time share one device run (each in its own slot, against its own cache) when recent step times say it pays; false: one session per run. Output is the same either way (docs/decisions/0016-packed-steps.md).", HelpName = "true|false" };
        var adaptive = new Option<bool?>("--adaptive-width") { Description = "true (default): each speculative step verifies on the compiled width (1, 4 or --width) that gives the most tokens per millisecond for that session; false: always --width.", HelpName = "true|false" };
        var warmUp = new Option<bool?>("--warm-up") { Description = "true (default): before listening, run two short requests (plain and --method) so the first client's request does not pay for compiling .NET code (docs/decisions/0021-warm-up-at-start.md); they count in /metrics. false: start listening at once.", HelpName = "true|false" };
        var rpm = new Option<int?>("--requests-per-minute") { Description = "Rate limit per client address on /v1 (/health and /metrics are not limited); 0 (default) = unlimited.", HelpName = "N" };
        var faults = new Option<string?>("--faults") { Description = "Inject faults for black-box fault tests: a seeded schedule such as 'kinds=DeviceException,NonFiniteLogits,SessionKill;gap=8;seed=7' (kinds: DeviceException, DeviceHang, NonFiniteLogits, DrafterCrash, CalibratorCrash, SessionKill, DeviceActorCrash, or all; gap = mean device steps between faults; budget = faults in all). Requests resume after each fault, so their output must not change. Off by default; refused without --allow-faults; shown in /health and the request log while on.", HelpName = "SPEC" };
        var allowFaults = new Option<bool?>("--allow-faults") { Description = "Let --faults run (never in production).", HelpName = "true|false", Arity = ArgumentArity.ZeroOrOne };
        var cors = new Option<string[]>("--cors-origin") { Description = "Allow browser pages from this origin to call the API (CORS); repeat for more, * for any. Default: none.", HelpName = "ORIGIN", AllowMultipleArgumentsPerToken = false };

        var cmd = new Command("serve", "Serve the model over an OpenAI-compatible HTTP API: POST /v1/chat/completions and /v1/completions (streaming or not), GET /v1/models, /health, /metrics (Prometheus), and context stores (POST /v1/context_stores, POST /v1/context_stores/{name}/documents) that requests draft from with \"context_store\". Settings come from appsettings.json, --config, COORDGEN_Server__* environment variables and these options, in that order.")
        {
            config, model, host, port, capacity, prefillWidth, chunkWidth, threads, method, width, maxPending, kvBudget, maxBody, apiKey, rpm, cors, otlp, deviceProfile, adaptive, packed, packedTrees, mixedSteps, mixedTrees, packedGqa, prefixCache, kvPool, warmUp, weights, kv, faults, allowFaults, watchdog,
        };
        cmd.SetAction(async (parse, ct) =>
        {
            var overrides = new Dictionary<string, string?>();
            void Put<T>(Option<T> o, string key)
            {
                if (parse.GetResult(o) is { Implicit: false } && parse.GetValue(o) is { } v)
                {
                    overrides[$"{ServerSettings.Section}:{key}"] = Convert.ToString(v, System.Globalization.CultureInfo.InvariantCulture);
                }
            }

            Put(model, "Model");
            Put(host, "Host");
            Put(port, "Port");
            Put(capacity, "Capacity");
            Put(prefillWidth, "PrefillWidth");
            Put(chunkWidth, "InterleavedChunkWidth");
            Put(threads, "Threads");
            Put(weights, "Weights");
            Put(kv, "Kv");
            Put(method, "Method");
            Put(width, "Width");
            Put(maxPending, "MaxPending");
            Put(kvBudget, "KvBudgetMb");
            Put(maxBody, "MaxBodyBytes");
            Put(apiKey, "ApiKey");
            Put(rpm, "RequestsPerMinute");
            Put(faults, "Faults");
            Put(watchdog, "StepWatchdogMs");
            if (parse.GetResult(allowFaults) is { Implicit: false })
            {
                overrides[$"{ServerSettings.Section}:AllowFaults"] = (parse.GetValue(allowFaults) ?? true) ? "true" : "false";
            }

            if (parse.GetValue(cors) is { Length: > 0 } origins)
            {
                for (int i = 0; i < origins.Length; i++)
                {
                    overrides[$"{ServerSettings.Section}:CorsOrigins:{i}"] = origins[i];
                }
            }

            Put(otlp, "OtlpEndpoint");
            Put(deviceProfile, "DeviceProfile");
            Put(adaptive, "AdaptiveWidth");
            Put(packed, "PackedSteps");
            Put(packedGqa, "PackedGroupQuery");
            Put(packedTrees, "PackedTrees");
            Put(mixedSteps, "MixedSteps");
            Put(mixedTrees, "MixedTrees");
            Put(prefixCache, "PrefixCache");
            Put(kvPool, "KvPool");
            Put(warmUp, "WarmUp");
            var settings = LoadSettings(parse.GetValue(config), overrides);
            await RunAsync(settings, ct);
            return 0;
        });
        return cmd;
    }

    public static ServerSettings LoadSettings(FileInfo? file, IDictionary<string, string?> overrides)
    {
        var builder = new ConfigurationBuilder()
            .AddJsonFile(Path.Combine(Directory.GetCurrentDirectory(), "appsettings.json"), optional: true);
        if (file is not null)
        {
            if (!file.Exists)
            {
                throw new FileNotFoundException($"--config file '{file.FullName}' does not exist.");
            }

            builder.AddJsonFile(file.FullName, optional: false);
        }

        builder.AddEnvironmentVariables("COORDGEN_").AddInMemoryCollection(overrides);
        ServerSettings settings;
        try
        {
            var root = builder.Build();
            settings = root.GetSection(ServerSettings.Section).Get<ServerSettings>() ?? new ServerSettings();
        }
        catch (InvalidOperationException ex)
        {
            throw new ArgumentException($"a setting has the wrong type: {ex.Message} Fix it in the settings file, environment or options.");
        }
        catch (InvalidDataException ex)
        {
            throw new ArgumentException($"the settings file is not valid JSON: {ex.Message}");
        }

        var problems = settings.Problems();
        if (problems.Count > 0)
        {
            throw new ArgumentException("invalid server settings: " + string.Join(" ", problems));
        }

        return settings;
    }

    private static async Task RunAsync(ServerSettings settings, CancellationToken ct)
    {
        var bundle = ConsoleUi.LoadModel(ModelLocator.Resolve(settings.Model));
        await using var service = ConsoleUi.Status(settings.WarmUp ? "compiling graphs, warming up" : "compiling graphs", () => InferenceService.Start(bundle, settings));

        var builder = WebApplication.CreateSlimBuilder(new WebApplicationOptions { Args = [], ContentRootPath = Directory.GetCurrentDirectory() });
        builder.Logging.ClearProviders();
        builder.Logging.AddSimpleConsole(o => o.SingleLine = true).SetMinimumLevel(LogLevel.Warning);
        // The request log: one line per completion request (Logging:LogLevel:CoordGen.Requests=Warning silences it).
        builder.Logging.AddFilter(OpenAiApi.RequestLogCategory, LogLevel.Information);
        if (settings.CorsOrigins.Length > 0)
        {
            builder.Services.AddCors(o => o.AddDefaultPolicy(p =>
            {
                if (settings.CorsOrigins.Contains("*"))
                {
                    p.AllowAnyOrigin();
                }
                else
                {
                    p.WithOrigins(settings.CorsOrigins);
                }

                p.AllowAnyHeader().WithMethods("GET", "POST").WithExposedHeaders("Retry-After");
            }));
        }

        builder.WebHost.ConfigureKestrel(k =>
        {
            k.Limits.MaxRequestBodySize = settings.MaxBodyBytes;
            k.AddServerHeader = false;
            var ip = settings.Host == "localhost" ? IPAddress.Loopback : IPAddress.Parse(settings.Host);
            k.Listen(ip, settings.Port);
        });
        builder.Services.AddSingleton(service);   // an instance: the app's container reads it, never disposes it
        var otel = builder.Services.AddOpenTelemetry().WithMetrics(m =>
        {
            m.AddMeter(RequestMetrics.MeterName, Actors.Telemetry.Name).AddAspNetCoreInstrumentation().AddPrometheusExporter();
            if (settings.OtlpEndpoint is { Length: > 0 } url)
            {
                m.AddOtlpExporter(o => o.Endpoint = new Uri(url));
            }
        });
        if (settings.OtlpEndpoint is { Length: > 0 } traceUrl)
        {
            otel.WithTracing(t => t.AddSource(Actors.Telemetry.Name).AddAspNetCoreInstrumentation().AddOtlpExporter(o => o.Endpoint = new Uri(traceUrl)));
        }
        if (settings.RequestsPerMinute > 0)
        {
            builder.Services.AddRateLimiter(o =>
            {
                // Only the API is limited: a health probe or a Prometheus scraper must not use up a client's quota.
                o.GlobalLimiter = PartitionedRateLimiter.Create<HttpContext, string>(ctx => !ctx.Request.Path.StartsWithSegments("/v1")
                    ? RateLimitPartition.GetNoLimiter("unlimited")
                    : RateLimitPartition.GetFixedWindowLimiter(
                        ctx.Connection.RemoteIpAddress?.ToString() ?? "unknown",
                        _ => new FixedWindowRateLimiterOptions { PermitLimit = settings.RequestsPerMinute, Window = TimeSpan.FromMinutes(1), QueueLimit = 0 }));
                o.OnRejected = (r, _) =>
                {
                    OpenAiApi.CountRefusal(r.HttpContext, 429);
                    return new ValueTask(OpenAiApi.WriteError(r.HttpContext,
                        new ApiException(429, $"rate limit: at most {settings.RequestsPerMinute} requests per minute per client; retry later.", code: "rate_limit_exceeded", retryAfterSeconds: 60)));
                };
            });
        }

        var app = builder.Build();

        // 404 and 405 from the router carry no body: give them an OpenAI-shaped one that lists the routes.
        app.UseStatusCodePages(new StatusCodePagesOptions { HandleAsync = c => OpenAiApi.WriteRoutingError(c.HttpContext) });
        if (settings.CorsOrigins.Length > 0)
        {
            app.UseCors();
        }

        if (settings.RequestsPerMinute > 0)
        {
            app.UseRateLimiter();
        }

        if (settings.ApiKey is { Length: > 0 } key)
        {
            app.Use(async (ctx, next) =>
            {
                if (ctx.Request.Path.StartsWithSegments("/v1") && !HttpMethods.IsOptions(ctx.Request.Method) && ctx.Request.Headers.Authorization.ToString() != "Bearer " + key)
                {
                    OpenAiApi.CountRefusal(ctx, 401);
                    await OpenAiApi.WriteError(ctx, new ApiException(401, "missing or wrong API key: send 'Authorization: Bearer KEY' with the key the server was started with.", code: "invalid_api_key"));
                    return;
                }

                await next(ctx);
            });
        }

        app.UseOpenTelemetryPrometheusScrapingEndpoint();
        OpenAiApi.Map(app, service);
        await app.StartAsync(ct);
        string address = app.Services.GetRequiredService<Microsoft.AspNetCore.Hosting.Server.IServer>().Features.Get<IServerAddressesFeature>()?.Addresses.FirstOrDefault() ?? "?";
        Console.Out.WriteLine($"coordgen serving {service.ModelName} on {address} (OpenAI API at {address}/v1; Ctrl+C stops)");
        if (service.Faults is not null)
        {
            Console.Out.WriteLine($"FAULT INJECTION ON: {FaultSpec.Parse(settings.Faults!)} (requests fail and resume on purpose; /health counts the faults)");
        }

        if (!string.IsNullOrEmpty(settings.DeviceProfile))
        {
            Console.Out.WriteLine($"device steps paced: {CoordGen.Engine.Scheduling.DeviceProfile.Load(settings.DeviceProfile).Label}");
        }

        var c = bundle.Config;
        double cacheMb = CoordGen.Engine.Runtime.KvCache.BytesFor(c.NumLayers, c.NumKvHeads, c.HeadDim, settings.Capacity, settings.Kv) / (1024.0 * 1024.0);
        int atOnce = InferenceService.MaxActiveSessions(bundle, settings);
        Console.Out.WriteLine(string.Create(CultureInfo.InvariantCulture, $"KV budget {settings.KvBudgetMb} MiB: {Math.Min(atOnce, settings.MaxPending)} requests at once ({cacheMb:F1} MiB of cache each at capacity {settings.Capacity}); up to {settings.MaxPending} running or waiting, more get 429"));
        Console.Out.Flush();
        try
        {
            await app.WaitForShutdownAsync(ct);
        }
        catch (OperationCanceledException)
        {
        }

        await app.StopAsync(CancellationToken.None);
    }
}
