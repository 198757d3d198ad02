using System.Diagnostics;

namespace CoordGen.Host.Tests;

/// <summary>The coordgen command as a user runs it: a separate process, exit codes, and what it prints.</summary>
public class CliTests
{
    private static string RepoRoot
    {
        get
        {
            for (var d = new DirectoryInfo(AppContext.BaseDirectory); d is not null; d = d.Parent)
            {
                if (File.Exists(Path.Combine(d.FullName, "CoordGen.sln")))
                {
                    return d.FullName;
                }
            }

            throw new InvalidOperationException("CoordGen.sln not found");
        }
    }

    private static (int Code, string Out, string Err) Run(params string[] args)
    {
        var psi = new ProcessStartInfo("dotnet", [Path.Combine(AppContext.BaseDirectory, "coordgen.dll"), .. args])
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            WorkingDirectory = RepoRoot,
        };
        psi.Environment["NO_COLOR"] = "1";
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        Assert.True(p.WaitForExit(120_000), "coordgen did not finish in 2 minutes");
        return (p.ExitCode, stdout.Result, stderr.Result);
    }

    [Fact]
    public void Generate_should_stream_text_and_report_speed_when_run_on_the_default_model()
    {
        var (code, stdout, stderr) = Run("generate", "--max-tokens", "12");
        Assert.Equal(0, code);
        Assert.False(string.IsNullOrWhiteSpace(stdout));
        Assert.Contains("tok/s", stderr);
    }

    [Fact]
    public void Generate_should_be_reproducible_when_sampling_with_a_seed()
    {
        var a = Run("generate", "-n", "16", "--temperature", "0.9", "--seed", "7");
        var b = Run("generate", "-n", "16", "--temperature", "0.9", "--seed", "7");
        Assert.Equal(0, a.Code);
        Assert.Equal(a.Out, b.Out);
    }

    [Theory]
    [InlineData(new[] { "generate", "--model", "/nonexistent/model" }, "does not exist")]
    [InlineData(new[] { "generate", "--max-tokens", "0" }, "--max-tokens must be between")]
    [InlineData(new[] { "generate", "--temperature", "-1" }, "temperature must be between")]
    [InlineData(new[] { "generate", "--top-p", "0" }, "top-p must be in")]
    [InlineData(new[] { "generate", "--context", "/nonexistent.txt" }, "does not exist")]
    [InlineData(new[] { "generate", "--capacity", "64", "-n", "8" }, "Shorten the prompt")]
    [InlineData(new[] { "model", "synth", "--shape", "gpt-5", "--out", "/tmp/x" }, "unknown shape 'gpt-5'")]
    [InlineData(new[] { "generate", "--provider", "qnn", "-n", "4" }, "QNN execution provider is not available in this build")]
    [InlineData(new[] { "generate", "--provider", "qnn", "--qnn-perf-mode", "turbo" }, "unknown QNN performance mode")]
    [InlineData(new[] { "serve", "--port", "99999" }, "Port must be between 0 and 65535")]
    [InlineData(new[] { "serve", "--method", "magic" }, "unknown method")]
    [InlineData(new[] { "serve", "--host", "not-an-ip" }, "Host must be an IP address")]
    [InlineData(new[] { "serve", "--config", "/nonexistent.json" }, "does not exist")]
    [InlineData(new[] { "serve", "--kv-budget-mb", "1", "--capacity", "65536" }, "raise --kv-budget-mb or lower --capacity")]
    [InlineData(new[] { "serve", "--kv-budget-mb", "0" }, "KvBudgetMb must be between")]
    [InlineData(new[] { "serve", "--faults", "kinds=DeviceException" }, "set AllowFaults=true (--allow-faults)")]
    [InlineData(new[] { "serve", "--faults", "kinds=Meteor", "--allow-faults" }, "unknown fault kind 'Meteor'")]
    [InlineData(new[] { "serve", "--faults", "gap=0", "--allow-faults" }, "'gap' must be an integer of at least 1")]
    [InlineData(new[] { "serve", "--cors-origin", "app.example.com" }, "is not an origin")]
    [InlineData(new[] { "bench", "accept", "--rounds", "0" }, "--rounds must be between 1 and 20")]
    public void Commands_should_fail_with_a_clear_message_when_input_is_bad(string[] args, string message)
    {
        var (code, _, stderr) = Run(args);
        Assert.Equal(1, code);
        Assert.Contains(message, stderr.ReplaceLineEndings(" "));
        Assert.DoesNotContain("   at ", stderr);
    }

    [Fact]
    public void Help_should_explain_every_generate_option()
    {
        var (code, stdout, _) = Run("generate", "--help");
        Assert.Equal(0, code);
        foreach (var opt in new[] { "--model", "--prompt", "--context", "--max-tokens", "--temperature", "--top-k", "--top-p", "--seed", "--capacity" })
        {
            Assert.Contains(opt, stdout);
        }
    }

    [Fact]
    public void Bench_faults_should_report_zero_divergent_streams_when_faults_strike()
    {
        string dir = Directory.CreateTempSubdirectory("coordgen-faults-").FullName;
        var (code, _, stderr) = Run("bench", "faults", "--faults", "40", "--streams", "4", "-n", "16", "--out", dir);
        Assert.True(code == 0, stderr);
        var report = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "faults.json")))!;
        Assert.True(report["faults_injected"]!.GetValue<int>() >= 35);
        Assert.Equal(0, report["divergent_streams"]!.GetValue<int>());
        Assert.Equal(0, report["lost_tokens"]!.GetValue<long>());
        Assert.Equal(0, report["duplicated_tokens"]!.GetValue<long>());
        Assert.True(File.Exists(Path.Combine(dir, "faults.png")));
    }

    [Fact]
    public void Bench_graphs_should_measure_all_four_strategies_with_the_reported_keys()
    {
        string dir = Directory.CreateTempSubdirectory("coordgen-graphs-").FullName;
        var (code, _, stderr) = Run("bench", "graphs", "--prompt-tokens", "96", "--wide", "32", "--narrow", "8", "--blocks", "3", "--capacity", "128", "--repeat", "1", "--out", dir);
        Assert.True(code == 0, stderr);
        var rows = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "graphs.json")))!.AsArray();
        Assert.Equal(["single", "sync", "progressive", "resident"], rows.Select(r => r!["strategy"]!.GetValue<string>()));
        Assert.All(rows, r =>
        {
            Assert.True(r!["ttft_ms"]!.GetValue<double>() > 0);
            Assert.True(r["first_step_ms"]!.GetValue<double>() > 0);
            Assert.True(r["peak_mb"]!.GetValue<double>() > 0);
            Assert.True(r["second_ttft_ms"]!.GetValue<double>() > 0); // the next request, after switching back
            Assert.True(r["second_first_step_ms"]!.GetValue<double>() > 0);
            Assert.False(r["simulated"]!.GetValue<bool>());
        });
        Assert.True(File.Exists(Path.Combine(dir, "graphs.png")));
    }

    [Fact]
    public void Bench_graphs_on_a_device_profile_should_simulate_and_say_it_is_a_what_if()
    {
        string dir = Directory.CreateTempSubdirectory("coordgen-graphs-profile-").FullName;
        var (code, _, stderr) = Run("bench", "graphs", "--device-profile", "paper-qwen2.5-1.5b-htp", "--out", dir);
        Assert.True(code == 0, stderr);
        Assert.Contains("what-if", stderr);
        var rows = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "graphs-paper-qwen2.5-1.5b-htp.json")))!.AsArray();
        Assert.Equal(["single", "sync", "progressive", "progressive-1", "resident"], rows.Select(r => r!["strategy"]!.GetValue<string>()));
        Assert.All(rows, r => Assert.True(r!["simulated"]!.GetValue<bool>()));
        Assert.Equal(182.4, rows.First(r => r!["strategy"]!.GetValue<string>() == "resident")!["first_step_ms"]!.GetValue<double>(), 1);
        Assert.Contains("not measured", File.ReadAllText(Path.Combine(dir, "graphs-paper-qwen2.5-1.5b-htp.md")));

        var (bad, _, err) = Run("bench", "graphs", "--device-profile", "no-such-npu", "--out", dir);
        Assert.NotEqual(0, bad);
        Assert.Contains("paper-qwen2.5-1.5b-htp", err);
    }

    [Fact]
    public void Bench_paper_should_write_both_tables_with_outputs_identical_to_plain_decoding()
    {
        string dir = Directory.CreateTempSubdirectory("coordgen-paper-").FullName;
        var (code, _, stderr) = Run("bench", "paper", "--limit", "1", "--out", dir);
        Assert.True(code == 0, stderr);
        var rows = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "paper.json")))!.AsArray();
        Assert.Equal(5 * 4, rows.Count(r => r!["table"]!.GetValue<int>() == 3));
        Assert.Equal(4 * 4, rows.Count(r => r!["table"]!.GetValue<int>() == 4));
        Assert.All(rows, r => Assert.True(r!["identical_to_plain"]!.GetValue<bool>()));
        Assert.True(File.Exists(Path.Combine(dir, "paper-table3.png")));
        Assert.True(File.Exists(Path.Combine(dir, "paper-table4.png")));
    }

    [Fact]
    public void Bench_sessions_should_report_every_mode_with_streams_identical_to_solo_runs()
    {
        string dir = Directory.CreateTempSubdirectory("coordgen-sessions-").FullName;
        var (code, _, stderr) = Run("bench", "sessions", "--sessions", "1,2", "--requests", "1", "--out", dir);
        Assert.True(code == 0, stderr);
        var rows = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "sessions.json")))!.AsArray();
        Assert.Equal(6, rows.Count);
        Assert.All(rows, r =>
        {
            Assert.Contains(r!["mode"]!.GetValue<string>(), new[] { "ar", "spec", "spec-adaptive" });
            Assert.True(r["aggregate_tokens_per_s"]!.GetValue<double>() > 0);
            Assert.True(r["p99_intertoken_ms"]!.GetValue<double>() >= r["p50_intertoken_ms"]!.GetValue<double>());
            Assert.True(r["identical_to_alone"]!.GetValue<bool>());
        });
    }

    [Fact]
    public void Model_profile_should_explain_widths_that_do_not_fit_the_capacity()
    {
        var (code, _, stderr) = Run("model", "profile", "--capacity", "16", "--out", Directory.CreateTempSubdirectory("coordgen-profile-").FullName);
        Assert.NotEqual(0, code);
        Assert.Contains("lower --widths or raise --capacity", stderr);
    }

    [Fact]
    public void Model_profile_should_time_widths_without_1_and_still_compare_decoding()
    {
        string dir = Directory.CreateTempSubdirectory("coordgen-profile-").FullName;
        var (code, _, stderr) = Run("model", "profile", "--capacity", "64", "--widths", "4", "--fills", "0.5", "--repeats", "3", "--out", dir);
        Assert.True(code == 0, stderr);
        var report = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "profile-coordgen-demo.json")))!;
        Assert.All(report["cells"]!.AsArray(), c => Assert.Equal(4, c!["width"]!.GetValue<int>()));
    }

    [Fact]
    public void Bench_rebalance_should_report_each_streams_gaps_around_the_newcomers_prefill_and_its_ttft()
    {
        string dir = Directory.CreateTempSubdirectory("coordgen-rebalance-").FullName;
        var (code, _, stderr) = Run("bench", "rebalance", "--sessions", "2", "--prompt-tokens", "400", "--out", dir);
        Assert.True(code == 0, stderr);
        var report = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "rebalance.json")))!;
        Assert.Equal(400, report["newcomer_prompt_tokens"]!.GetValue<int>());
        Assert.True(report["newcomer_ttft_ms"]!.GetValue<double>() > 0);
        var sessions = report["sessions"]!.AsArray();
        Assert.Equal(2, sessions.Count);
        Assert.All(sessions, s => Assert.True(s!["tokens"]!.GetValue<int>() >= 8));

        // What filled the worst gap: the runtime's spans that overlapped it (at least the verification that delivered its token).
        // Only when some stream had a token during the prefill (the demo model's prefill is short).
        if (sessions.Any(s => s!["tokens_during_prefill"]!.GetValue<int>() > 0))
        {
            Assert.True(report["worst_gap_ms"]!.GetValue<double>() > 0);
            Assert.InRange(report["worst_gap_stream"]!.GetValue<int>(), 0, 1);
            var spans = report["worst_gap_spans"]!.AsArray();
            Assert.NotEmpty(spans);
            Assert.All(spans, x => Assert.False(string.IsNullOrEmpty(x!["name"]!.GetValue<string>())));
            Assert.Contains("What ran during that run's worst gap", File.ReadAllText(Path.Combine(dir, "rebalance.md")));
        }
        Assert.True(File.Exists(Path.Combine(dir, "rebalance.png")));
    }

    [Fact]
    public void Bench_overlap_should_report_drafts_prepared_by_the_drafter_and_a_timeline()
    {
        string dir = Directory.CreateTempSubdirectory("coordgen-overlap-").FullName;
        var (code, _, stderr) = Run("bench", "overlap", "--sessions", "3", "--requests", "1", "--out", dir);
        Assert.True(code == 0, stderr);
        var report = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "overlap.json")))!;
        Assert.True(report["drafts_prepared"]!.GetValue<int>() > 0);
        Assert.InRange(report["hidden_share"]!.GetValue<double>(), 0, 1);
        Assert.True(File.Exists(Path.Combine(dir, "overlap.png")));
    }

    [Fact]
    public void Model_inflate_should_write_a_twin_that_reproduces_the_demo_models_greedy_output()
    {
        string twin = Directory.CreateTempSubdirectory("coordgen-twin-").FullName;
        string report = Directory.CreateTempSubdirectory("coordgen-fidelity-").FullName;
        var (code, _, stderr) = Run("model", "inflate", "--hidden", "256", "--layers", "8", "--heads", "8", "--kv-heads", "2", "--head-dim", "64", "--out", twin);
        Assert.True(code == 0, stderr);
        Assert.Contains("vocabulary is the source's", stderr);
        Assert.True(File.Exists(Path.Combine(twin, "README.md")));

        (code, _, stderr) = Run("model", "compare", "--model", twin, "--workload", Path.Combine(RepoRoot, "workloads", "ui.jsonl"), "--limit", "2", "--out", report);
        Assert.True(code == 0, stderr);
        var json = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(report, $"fidelity-{Path.GetFileName(twin)}.json")))!;
        var all = json["summary"]!.AsArray().Single(s => s!["task"]!.GetValue<string>() == "all")!;
        Assert.Equal(2, all["identical_prompts"]!.GetValue<int>());
        Assert.True(all["max_relative_logit_diff"]!.GetValue<double>() < 1e-4);
    }

    [Theory]
    [InlineData("--hidden", "96", "hidden size 96 is smaller than the source's 192")]
    [InlineData("--head-dim", "48", "head dim 48 is not a multiple of the source's 32")]
    [InlineData("--kv-heads", "1", "kv heads are fewer than the source's 2")]
    public void Model_inflate_should_refuse_an_impossible_target_with_the_reason(string option, string value, string reason)
    {
        string dir = Path.Combine(Path.GetTempPath(), "coordgen-twin-refused-" + Guid.NewGuid().ToString("N"));
        var (code, _, stderr) = Run("model", "inflate", option, value, "--out", dir);
        Assert.Equal(1, code);
        Assert.Contains(reason, stderr);
        Assert.False(Directory.Exists(dir), "a refused target must not leave a folder behind");
    }

    [Fact]
    public void Bench_accept_should_run_weight_formats_side_by_side_with_outputs_identical_to_their_own_plain_decoding()
    {
        string dir = Directory.CreateTempSubdirectory("coordgen-accept-").FullName;
        var (code, _, stderr) = Run("bench", "accept", "--workload", Path.Combine(RepoRoot, "workloads", "reply.jsonl"), "--limit", "2", "--methods", "sam+ours", "--width", "8",
            "--weights", "f32,int4", "--out", dir);
        Assert.True(code == 0, stderr);
        var rows = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "accept-f32-int4.json")))!.AsArray();
        Assert.Equal(["f32", "int4"], rows.Select(r => r!["weights"]!.GetValue<string>()).Distinct().Order());
        Assert.All(rows, r => Assert.True(r!["identical_to_ar"]!.GetValue<bool>()));
        Assert.Contains("Formats side by side", File.ReadAllText(Path.Combine(dir, "accept-f32-int4.md")));
        Assert.Contains("Adaptive width (the default", File.ReadAllText(Path.Combine(dir, "accept-f32-int4.md")));
    }

    [Fact]
    public void Bench_accept_should_count_steps_by_width_and_price_them_at_a_device_profile()
    {
        string dir = Directory.CreateTempSubdirectory("coordgen-accept-profile-").FullName;
        var (code, _, stderr) = Run("bench", "accept", "--workload", Path.Combine(RepoRoot, "workloads", "reply.jsonl"), "--limit", "2", "--methods", "ar,sam+ours", "--width", "8",
            "--device-profile", "paper-qwen2.5-1.5b-htp", "--out", dir);
        Assert.True(code == 0, stderr);
        var rows = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "accept.json")))!.AsArray();
        var profile = CoordGen.Engine.Scheduling.DeviceProfile.Load("paper-qwen2.5-1.5b-htp");
        Assert.All(rows, r =>
        {
            var byWidth = r!["steps_by_width"]!.AsObject().ToDictionary(kv => int.Parse(kv.Key, System.Globalization.CultureInfo.InvariantCulture), kv => kv.Value!.GetValue<long>());
            Assert.Equal(r["steps"]!.GetValue<long>(), byWidth.Values.Sum());
            Assert.All(byWidth.Keys, w => Assert.Contains(w, new[] { 1, 4, 8 })); // adaptive width's choices among the compiled widths
            // The what-if speedup prices each step at the profile's time for the width it ran at.
            double ms = byWidth.Sum(kv => kv.Value * profile.StepMs(kv.Key)) + (r["steps"]!.GetValue<long>() * r["draft_ms_per_step"]!.GetValue<double>());
            double expected = r["method"]!.GetValue<string>() == "ar" ? 1 : r["tokens"]!.GetValue<long>() * profile.StepMs(1) / ms;
            Assert.Equal(expected, r["profile_speedup"]!.GetValue<double>(), 6);
        });
        Assert.Contains(rows, r => r!["method"]!.GetValue<string>() == "sam+ours" && r["steps_by_width"]!.AsObject().Any(kv => kv.Key != "1"));
    }

    [Fact]
    public void Bench_accept_should_give_the_median_and_spread_of_its_rounds_when_run_several_times()
    {
        string dir = Directory.CreateTempSubdirectory("coordgen-accept-rounds-").FullName;
        var (code, _, stderr) = Run("bench", "accept", "--workload", Path.Combine(RepoRoot, "workloads", "reply.jsonl"), "--limit", "2", "--methods", "sam+ours", "--width", "8",
            "--rounds", "2", "--out", dir);
        Assert.True(code == 0, stderr);
        var rows = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "accept.json")))!.AsArray();
        Assert.Equal(2, rows.Count); // ar and sam+ours, each pooled over the rounds
        Assert.All(rows, r =>
        {
            Assert.Equal(2, r!["rounds"]!.GetValue<int>());
            Assert.Equal(4, r["prompts"]!.GetValue<int>());
            double speedup = r["speedup"]!.GetValue<double>();
            Assert.InRange(speedup, r["speedup_min"]!.GetValue<double>(), r["speedup_max"]!.GetValue<double>());
        });
        Assert.Contains("--rounds 2", File.ReadAllText(Path.Combine(dir, "accept.md")));
        Assert.Contains("2 rounds", File.ReadAllText(Path.Combine(dir, "accept.md")));
    }

    [Fact]
    public void Model_profile_should_say_where_a_step_goes_by_operator_when_asked_for_the_ort_profile()
    {
        string dir = Directory.CreateTempSubdirectory("coordgen-ort-profile-").FullName;
        var (code, _, stderr) = Run("model", "profile", "--capacity", "64", "--widths", "1,4", "--fills", "0.5", "--repeats", "3", "--weights", "f32,int8", "--ort-profile", "--out", dir);
        Assert.True(code == 0, stderr);
        var ops = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "ort-profile.json")))!["ops"]!.AsArray();
        Assert.Contains(ops, o => o!["weights"]!.GetValue<string>() == "f32" && o["op"]!.GetValue<string>() == "Gemm" && o["nodes_per_run"]!.GetValue<double>() > 0);
        Assert.Contains(ops, o => o!["weights"]!.GetValue<string>() == "int8" && o["op"]!.GetValue<string>() == "MatMulNBits");
        Assert.Equal(["w1_c64", "w4_c64"], ops.Select(o => o!["graph"]!.GetValue<string>()).Distinct().Order());
    }
}
