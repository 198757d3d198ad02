using System.Diagnostics;
using System.Text.RegularExpressions;

namespace CoordGen.Host.Tests;

/// <summary>A real <c>coordgen serve</c> process on a free loopback port, stopped when disposed.</summary>
public partial class ServerProcess : IAsyncLifetime
{
    private readonly string[] _extraArgs;
    private Process? _process;

    public ServerProcess()
        : this([])
    {
    }

    protected ServerProcess(string[] extraArgs) => _extraArgs = extraArgs;

    public Uri BaseUrl { get; private set; } = null!;

    public HttpClient Http { get; } = new() { Timeout = TimeSpan.FromMinutes(2) };

    public static string RepoRoot
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

    public async Task InitializeAsync()
    {
        var psi = new ProcessStartInfo("dotnet", [Path.Combine(AppContext.BaseDirectory, "coordgen.dll"), "serve", "--port", "0", .. _extraArgs])
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            WorkingDirectory = RepoRoot,
        };
        psi.Environment["NO_COLOR"] = "1";
        _process = Process.Start(psi)!;
        _process.ErrorDataReceived += (_, _) => { };
        _process.BeginErrorReadLine();
        using var timeout = new CancellationTokenSource(TimeSpan.FromMinutes(2));
        while (await _process.StandardOutput.ReadLineAsync(timeout.Token) is { } line)
        {
            var m = UrlPattern().Match(line);
            if (m.Success)
            {
                BaseUrl = new Uri(m.Value);
                _ = _process.StandardOutput.ReadToEndAsync();
                return;
            }
        }

        throw new InvalidOperationException("coordgen serve exited before printing its address");
    }

    public Task DisposeAsync()
    {
        Http.Dispose();
        if (_process is { HasExited: false })
        {
            _process.Kill(entireProcessTree: true);
            _process.WaitForExit(10_000);
        }

        _process?.Dispose();
        return Task.CompletedTask;
    }

    [GeneratedRegex(@"http://127\.0\.0\.1:\d+")]
    private static partial Regex UrlPattern();
}

/// <summary>A server that admits one request at a time and wants an API key: for refusals.</summary>
public sealed class StrictServerProcess() : ServerProcess(["--max-pending", "1", "--api-key", StrictServerProcess.Key])
{
    public const string Key = "test-key-0123";
}

/// <summary>A server injecting faults (every device-side kind and session kills) for black-box fault tests, with a CORS allow-list.</summary>
public sealed class FaultyServerProcess() : ServerProcess(["--faults", FaultyServerProcess.Spec, "--allow-faults", "--cors-origin", FaultyServerProcess.Origin])
{
    public const string Spec = "kinds=DeviceException,DeviceHang,NonFiniteLogits,DrafterCrash,CalibratorCrash,SessionKill;gap=3;seed=5";

    public const string Origin = "http://app.example:3000";
}

/// <summary>A server limited to 3 requests per minute per client address.</summary>
public sealed class RateLimitedServerProcess() : ServerProcess(["--requests-per-minute", "3"]);
