namespace CoordGen;

/// <summary>A request the server refuses, rendered as an OpenAI-style error body with this status.</summary>
public sealed class ApiException(int status, string message, string? param = null, string? code = null, int retryAfterSeconds = 0) : Exception(message)
{
    public int Status { get; } = status;

    public string? Param { get; } = param;

    public string? Code { get; } = code;

    public int RetryAfterSeconds { get; } = retryAfterSeconds;

    /// <summary>OpenAI's error type names for a status.</summary>
    public string Type => Status switch
    {
        401 => "authentication_error",
        404 => "not_found_error",
        413 => "invalid_request_error",
        429 => "rate_limit_error",
        >= 500 => "server_error",
        _ => "invalid_request_error",
    };

    public static ApiException BadRequest(string message, string? param = null) => new(400, message, param, "invalid_request");
}
