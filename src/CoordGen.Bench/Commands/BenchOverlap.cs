using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Json.Serialization;
using System.Threading.Channels;
using Akka.Actor;
using CoordGen.Actors.Device;
using CoordGen.Engine;
using CoordGen.Engine.Workloads;
using CoordGen.Messages;
using Spectre.Console;
using static CoordGen.Messages.GenerationProtocol;

namespace CoordGen.Host.Commands;

internal sealed record OverlapReport
{
    [JsonPropertyName("sessions")] public int Sessions { get; init; }
    [JsonPropertyName("draft_ms_total")] public double DraftMsTotal { get; init; }
    [JsonPropertyName("draft_ms_hidden")] public double DraftMsHidden { get; init; }
    [JsonPropertyName("draft_ms_inline")] public double DraftMsInline { get; init; }
    [JsonPropertyName("hidden_share")] public double HiddenShare { get; init; }
    [JsonPropertyName("device_ms")] public double DeviceMs { get; init; }
    [JsonPropertyName("device_steps")] public int DeviceSteps { get; init; }
    [JsonPropertyName("drafts_prepared")] public int DraftsPrepared { get; init; }

    /// <summary>Trees drafted ahead, for the likely outcome of the step in flight, that were used.</summary>
    [JsonPropertyName("drafts_ahead_used")] public int DraftsAhead { get; init; }

    [JsonPropertyName("verify_steps")] public int VerifySteps { get; init; }

    [JsonPropertyName("verify_ms")] public double VerifyMs { get; init; }

    /// <summary>Share of the verifier's time during which the device ran a step (another session's).</summary>
    [JsonPropertyName("verify_overlap_share")] public double VerifyHiddenShare { get; init; }
    [JsonPropertyName("device_profile")] public string? DeviceProfile { get; init; }
    [JsonPropertyName("steps_over_profile")] public int? StepsOverProfile { get; init; }
}

/// <summary>
/// <c>coordgen bench overlap</c>: how much drafting the drafter actor hides behind device steps when
/// several speculative sessions share the device; a per-actor timeline PNG.
/// </summary>
internal static class BenchOverlap
{
    public static Command Create()
    {
        var model = CommonOptions.Model();
        var sessions = new Option<int>("--sessions") { Description = "Concurrent speculative sessions.", DefaultValueFactory = _ => 4 };
        var requests = new Option<int>("--requests") { Description = "Requests per session.", DefaultValueFactory = _ => 2 };
        var method = new Option<string>("--method") { Description = "Speculative method.", DefaultValueFactory = _ => "sam+ours" };
        var width = new Option<int>("--width") { Description = "Verification width.", DefaultValueFactory = _ => 8 };
        var packedTrees = new Option<bool?>("--packed-trees") { Description = "Speculative sessions' trees share packed runs (CoordGenOptions.PackedTrees; default: the server's default). Packing all ready trees into one run leaves the device idle while their next trees are drafted (decision 0024).", HelpName = "true|false" };
        var json = new Option<FileInfo?>("--json") { Description = "Write the report as JSON here too.", HelpName = "OUT.json" };
        var outDir = new Option<DirectoryInfo?>("--out") { Description = "Report folder (default docs/bench/ of the checkout).", HelpName = "DIR" };
        var deviceProfile = CommonOptions.DeviceProfile("What-if: pace every device step to this accelerator profile (the real step runs, the device waits out the rest), so drafting overlaps an NPU's step times; the report is then overlap-PROFILE.md and says so.");
        var cmd = new Command("overlap", "Share of drafting time hidden behind device time: the drafter actor prepares one session's tree while the device verifies another's. Writes a report and a per-actor timeline (PNG).")
        {
            model, sessions, requests, method, width, packedTrees, json, outDir, deviceProfile,
        };
        cmd.SetAction(async (parse, ct) =>
        {
            int n = parse.GetValue(sessions), per = parse.GetValue(requests), w = parse.GetValue(width);
            string m = parse.GetValue(method)!;
            if (n < 1 || per < 1)
            {
                throw new ArgumentException("--sessions and --requests must be at least 1.");
            }

            var stamp = BenchStamp.Capture();
            var bundle = ConsoleUi.LoadModel(ModelLocator.Resolve(parse.GetValue(model)));
            string root = ModelLocator.RepoRoot();
            var prompts = BenchStreams.Prompts(bundle, 4);
            var profile = parse.GetValue(deviceProfile) is { } pn ? Engine.Scheduling.DeviceProfile.Load(pn) : null;
            await using var service = InferenceService.Start(bundle, new CoordGenOptions { MaxPending = n * 2, Width = w, Method = m, DeviceProfile = parse.GetValue(deviceProfile), PrecompileAll = true, PackedTrees = parse.GetValue(packedTrees) ?? new CoordGenOptions().PackedTrees });

            // Warm-up: one request compiles the graphs; the timeline starts after it.
            await Run(service.Supervisor, prompts[0].Tokens, 8, m, w, ct);
            var device = await service.SelectDevice();
            var before = await device.Ask<DiagnosticsProtocol.Overlap>(DiagnosticsProtocol.GetOverlap.Instance);
            long t0 = Stopwatch.GetTimestamp();
            await ConsoleUi.Err.Status().StartAsync($"{n} sessions x {per} requests", async _ =>
                await Task.WhenAll(Enumerable.Range(0, n).Select(async s =>
                {
                    for (int k = 0; k < per; k++)
                    {
                        var p = prompts[((s * per) + k) % prompts.Count];
                        await Run(service.Supervisor, p.Tokens, p.MaxTokens, m, w, ct);
                    }
                })));
            var after = await device.Ask<DiagnosticsProtocol.Overlap>(DiagnosticsProtocol.GetOverlap.Instance);
            var dev = after.Device.Skip(before.Device.Length).ToList();
            var drafts = after.Drafts.Skip(before.Drafts.Length).ToList();
            var verifies = after.Verifies.Skip(before.Verifies.Length).ToList();
            double verifyMs = verifies.Sum(v => Ms(v.Start, v.End));
            double verifyHidden = verifies.Sum(v => dev.Sum(x => Math.Max(0, Ms(Math.Max(v.Start, x.Start), Math.Min(v.End, x.End)))));
            double prepared = drafts.Sum(d => Ms(d.Start, d.End));
            double hidden = drafts.Sum(d => dev.Sum(x => Math.Max(0, Ms(Math.Max(d.Start, x.Start), Math.Min(d.End, x.End)))));
            double inline = prepared - hidden; // drafting while the device was idle: not hidden
            var report = new OverlapReport
            {
                Sessions = n,
                DraftMsTotal = Math.Round(prepared, 3),
                DraftMsHidden = Math.Round(hidden, 3),
                DraftMsInline = Math.Round(inline, 3),
                HiddenShare = Math.Round(hidden / Math.Max(1e-9, prepared), 4),
                DeviceMs = Math.Round(dev.Sum(x => Ms(x.Start, x.End)), 1),
                DeviceSteps = dev.Count,
                DraftsPrepared = drafts.Count,
                DraftsAhead = after.DraftsAhead - before.DraftsAhead,
                VerifySteps = verifies.Count,
                VerifyMs = Math.Round(verifyMs, 3),
                VerifyHiddenShare = Math.Round(verifyHidden / Math.Max(1e-9, verifyMs), 4),
                DeviceProfile = profile?.Name,
                StepsOverProfile = profile is null ? null : after.Overran - before.Overran,
            };
            string stem = ReportStem.For(profile is null ? "overlap" : $"overlap-{profile.Name}", bundle.Name);
            string dir = parse.GetValue(outDir)?.FullName ?? Path.Combine(root, "docs", "bench");
            Directory.CreateDirectory(dir);
            string text = JsonSerializer.Serialize(report, new JsonSerializerOptions { WriteIndented = true });
            File.WriteAllText(Path.Combine(dir, stem + ".json"), text);
            if (parse.GetValue(json) is { } j)
            {
                File.WriteAllText(j.FullName, text);
            }

            Plots.Timeline(dev.Select(x => (Ms(t0, x.Start), Ms(t0, x.End))).ToList(), drafts.Select(x => (Ms(t0, x.Start), Ms(t0, x.End))).ToList(), verifies.Select(x => (Ms(t0, x.Start), Ms(t0, x.End))).ToList(), Path.Combine(dir, stem + ".png"));
            var md = new StringBuilder();
            md.AppendLine(profile is null ? "# Drafting overlapped with verification (`coordgen bench overlap`)" : $"# Drafting overlapped with verification, what-if on `{profile.Name}` (`coordgen bench overlap --device-profile {profile.Name}`)").AppendLine();
            if (profile is not null)
            {
                md.AppendLine(CultureInfo.InvariantCulture, $"**{profile.Label}.** Every device step ran for real on the CPU and was then held until the profile's time for its graph width had passed (verification W = {w}: {profile.StepMs(w):F1} ms; prefill chunk: {profile.StepMs(service.Settings.PrefillWidth):F1} ms); {report.StepsOverProfile} of {report.DeviceSteps} steps took longer on the CPU than the profile allows and ran at CPU speed. Drafting times are real.").AppendLine();
            }

            md.AppendLine(stamp.ToMarkdown()).AppendLine();
            md.AppendLine(CultureInfo.InvariantCulture, $"{n} concurrent `{m}` sessions at W = {w}, {per} requests each (prompts alternate task families), through the actor runtime. The drafter actor owns every session's drafting state: each applied step is sent to it, and it answers with that session's next tree while the device runs other sessions' steps, then drafts the step after it for its likely outcome. Drafter work while the device is idle is not hidden.").AppendLine();
            md.AppendLine("| metric | value |").AppendLine("|---|---|");
            md.AppendLine(CultureInfo.InvariantCulture, $"| drafting in all (ms) | {report.DraftMsTotal} |");
            md.AppendLine(CultureInfo.InvariantCulture, $"| hidden behind device steps (ms) | {report.DraftMsHidden} |");
            md.AppendLine(CultureInfo.InvariantCulture, $"| drafted while the device was idle, not hidden (ms) | {report.DraftMsInline} |");
            md.AppendLine(CultureInfo.InvariantCulture, $"| **hidden share** | **{report.HiddenShare:P1}** (goal: at least 90%) |");
            md.AppendLine(CultureInfo.InvariantCulture, $"| device steps / time (ms) | {report.DeviceSteps} / {report.DeviceMs} |");
            md.AppendLine(CultureInfo.InvariantCulture, $"| drafter work items (trees, trees ahead, indexes) | {report.DraftsPrepared} |");
            md.AppendLine(CultureInfo.InvariantCulture, $"| trees drafted ahead and used | {report.DraftsAhead} |");
            md.AppendLine(CultureInfo.InvariantCulture, $"| verifier actor: steps / time (ms) | {report.VerifySteps} / {report.VerifyMs} |");
            md.AppendLine(CultureInfo.InvariantCulture, $"| acceptance overlapping device steps | {report.VerifyHiddenShare:P1} |");
            md.AppendLine().AppendLine("The drafter's work: indexing a prompt when its run is admitted (during the prefill), a session's next tree when its step is applied (while the device runs another session's step), and, once the device begins that step (`DrafterProtocol.StepStarted`), that session's tree after it for the step's likely outcome (the main chain fully accepted and the model's next token being the chain's continuation; `SessionDrafter.PrepareAhead`), answered at once when exactly that happens. Work not hidden: a lone session's tree after a guess that missed, while the device waits for it.").AppendLine();
            md.AppendLine(CultureInfo.InvariantCulture, $"![timeline]({stem}.png)");
            File.WriteAllText(Path.Combine(dir, stem + ".md"), md.ToString());
            ConsoleUi.Err.MarkupLineInterpolated($"[green]hidden share {report.HiddenShare:P1} of {report.DraftMsTotal} ms drafting[/] -> {dir}/{stem}.md");
            return 0;
        });
        return cmd;
    }

    private static double Ms(long a, long b) => (b - a) * 1000.0 / Stopwatch.Frequency;

    private static Task Run(IActorRef supervisor, int[] prompt, int maxTokens, string method, int width, CancellationToken ct) =>
        BenchStreams.RunAsync(supervisor, prompt, maxTokens, method, width, ct);
}
