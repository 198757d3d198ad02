using System.Text.RegularExpressions;

namespace CoordGen.Host.Serving;

/// <summary>
/// <c>coordgen serve</c> settings: the runtime's (<see cref="CoordGenOptions"/>) and the HTTP server's, bound
/// from configuration section <c>Server</c>: appsettings.json in the working directory, a file given with
/// --config, environment variables (<c>COORDGEN_Server__Port=9000</c>), then command-line options, each
/// overriding the one before.
/// </summary>
public sealed class ServerSettings : CoordGenOptions
{
    public const string Section = "Server";

    /// <summary>Address to bind. Loopback by default: set 0.0.0.0 (and an ApiKey) to serve other machines.</summary>
    public string Host { get; set; } = "127.0.0.1";

    /// <summary>TCP port; 0 picks a free one (the chosen address is printed).</summary>
    public int Port { get; set; } = 8080;

    /// <summary>Largest request body accepted, in bytes; larger ones get 413.</summary>
    public long MaxBodyBytes { get; set; } = 1 << 20;

    /// <summary>When set, /v1 endpoints need <c>Authorization: Bearer KEY</c>.</summary>
    public string? ApiKey { get; set; }

    /// <summary>Browser origins allowed to call the API (CORS), such as https://app.example.com; empty (default) = no cross-origin access.</summary>
    public string[] CorsOrigins { get; set; } = [];

    /// <summary>Requests per minute per client address on /v1 (not /health or /metrics); 0 = unlimited.</summary>
    public int RequestsPerMinute { get; set; }

    /// <summary>OTLP collector (for example http://localhost:4317): traces and metrics are also exported there. Empty = off.</summary>
    public string? OtlpEndpoint { get; set; }

    /// <summary>Every problem with these settings (the runtime's and the server's), each saying what to change; empty when valid.</summary>
    public override IReadOnlyList<string> Problems()
    {
        var p = new List<string>(base.Problems());
        if (Port is < 0 or > 65535)
        {
            p.Add($"Port must be between 0 and 65535 (got {Port}).");
        }

        if (!System.Net.IPAddress.TryParse(Host, out _) && Host != "localhost")
        {
            p.Add($"Host must be an IP address or 'localhost' (got '{Host}'); 127.0.0.1 serves this machine only, 0.0.0.0 every interface.");
        }

        if (MaxBodyBytes is < 1024 or > 256L << 20)
        {
            p.Add($"MaxBodyBytes must be between 1024 and 268435456 (got {MaxBodyBytes}).");
        }

        if (ApiKey is { Length: > 0 } key && (key.Length < 8 || Regex.IsMatch(key, @"\s")))
        {
            p.Add("ApiKey must be at least 8 characters without spaces.");
        }

        if (RequestsPerMinute is < 0 or > 1_000_000)
        {
            p.Add($"RequestsPerMinute must be between 0 (unlimited) and 1000000 (got {RequestsPerMinute}).");
        }

        foreach (string origin in CorsOrigins)
        {
            if (origin != "*" && (!Uri.TryCreate(origin, UriKind.Absolute, out var o) || o.Scheme is not ("http" or "https") || o.AbsolutePath != "/"))
            {
                p.Add($"CorsOrigins: '{origin}' is not an origin; give scheme, host and port only, such as https://app.example.com or http://localhost:3000 (or * for any).");
            }
        }

        if (OtlpEndpoint is { Length: > 0 } otlp && !Uri.TryCreate(otlp, UriKind.Absolute, out _))
        {
            p.Add($"OtlpEndpoint must be an absolute URL such as http://localhost:4317 (got '{otlp}').");
        }

        return p;
    }
}
