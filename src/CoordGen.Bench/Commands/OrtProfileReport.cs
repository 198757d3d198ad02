using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Json.Serialization;
using Spectre.Console;

namespace CoordGen.Host.Commands;

/// <summary>One operator type's share of a graph's runs in an ONNX Runtime profiler trace.</summary>
internal sealed record OrtOpTime(
    [property: JsonPropertyName("weights")] string Weights,
    [property: JsonPropertyName("graph")] string Graph,
    [property: JsonPropertyName("op")] string Op,
    [property: JsonPropertyName("us_per_run")] double UsPerRun,
    [property: JsonPropertyName("nodes_per_run")] double NodesPerRun,
    [property: JsonPropertyName("runs")] int Runs);

/// <summary>
/// Where a step's time goes, by operator type, from ONNX Runtime's profiler traces (<c>coordgen model profile
/// --ort-profile</c>): per graph, each operator type's kernel time and node count per run.
/// </summary>
internal static class OrtProfileReport
{
    /// <summary>Reads one trace: its <c>model_run</c> events count the runs, its node <c>*_kernel_time</c> events give each operator's time.</summary>
    public static List<OrtOpTime> Read(string traceFile, string weights)
    {
        using var doc = JsonDocument.Parse(File.ReadAllBytes(traceFile));
        int runs = 0;
        var time = new Dictionary<string, double>();
        var count = new Dictionary<string, int>();
        foreach (var e in doc.RootElement.EnumerateArray())
        {
            string cat = e.TryGetProperty("cat", out var c) ? c.GetString() ?? "" : "";
            string name = e.TryGetProperty("name", out var n) ? n.GetString() ?? "" : "";
            if (cat == "Session" && name == "model_run")
            {
                runs++;
            }
            else if (cat == "Node" && name.EndsWith("_kernel_time", StringComparison.Ordinal) && e.TryGetProperty("args", out var args) && args.TryGetProperty("op_name", out var op))
            {
                string key = op.GetString() ?? "?";
                time[key] = time.GetValueOrDefault(key) + e.GetProperty("dur").GetDouble();
                count[key] = count.GetValueOrDefault(key) + 1;
            }
        }

        // The file is <prefix><graph>_<date>.json: the graph's name is what precedes the date.
        string file = Path.GetFileNameWithoutExtension(traceFile);
        int date = file.IndexOf("_20", StringComparison.Ordinal);
        string graph = date > 0 ? file[..date] : file;
        return runs == 0 ? [] : [.. time.OrderByDescending(kv => kv.Value).Select(kv => new OrtOpTime(weights, graph, kv.Key, kv.Value / runs, (double)count[kv.Key] / runs, runs))];
    }

    public static void Write(string dir, string model, BenchStamp stamp, string command, IReadOnlyList<OrtOpTime> rows)
    {
        Directory.CreateDirectory(dir);
        string stem = ReportStem.For("ort-profile", model);
        var md = new StringBuilder();
        md.AppendLine(CultureInfo.InvariantCulture, $"# Where a step's time goes, by operator: {model}");
        md.AppendLine();
        md.AppendLine(stamp.ToMarkdown());
        md.AppendLine(CultureInfo.InvariantCulture, $"Command: `{command}`. ONNX Runtime's profiler, one trace per graph; each operator type's kernel time and node count per run. The profiler adds a few microseconds to every node, so the times are inflated (most for graphs of many small nodes) and are not step times: `model profile`'s own table, timed without it, is.");
        foreach (var g in rows.GroupBy(r => (r.Weights, r.Graph)))
        {
            double total = g.Sum(r => r.UsPerRun);
            md.AppendLine();
            md.AppendLine(CultureInfo.InvariantCulture, $"## {g.Key.Weights}, graph {g.Key.Graph} ({g.First().Runs} runs; {g.Sum(r => r.NodesPerRun):F0} nodes and {total / 1000:F2} ms of kernel time per run)");
            md.AppendLine();
            md.AppendLine("| operator | µs per run | share | nodes per run |");
            md.AppendLine("|---|---|---|---|");
            foreach (var r in g)
            {
                md.AppendLine(CultureInfo.InvariantCulture, $"| {r.Op} | {r.UsPerRun:F0} | {r.UsPerRun / total:P1} | {r.NodesPerRun:F0} |");
            }
        }

        File.WriteAllText(Path.Combine(dir, stem + ".md"), md.ToString());
        File.WriteAllText(Path.Combine(dir, stem + ".json"), JsonSerializer.Serialize(new { stamp, command, ops = rows }, new JsonSerializerOptions { WriteIndented = true }));
        ConsoleUi.Err.MarkupLineInterpolated($"[grey]wrote {Path.Combine(dir, stem)}.md and .json[/]");
    }
}
