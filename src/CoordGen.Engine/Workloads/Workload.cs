using System.Text.Json;
using System.Text.Json.Serialization;

namespace CoordGen.Engine.Workloads;

/// <summary>One line of a workloads/*.jsonl file: {"id","task","context","prompt","max_tokens"}.</summary>
public sealed record WorkloadItem
{
    [JsonPropertyName("id")]
    public required string Id { get; init; }

    [JsonPropertyName("task")]
    public required string Task { get; init; }

    [JsonPropertyName("context")]
    public required string Context { get; init; }

    [JsonPropertyName("prompt")]
    public required string Prompt { get; init; }

    [JsonPropertyName("max_tokens")]
    public int MaxTokens { get; init; } = 128;

    /// <summary>Multi-turn workloads (chat.jsonl): the conversation this turn belongs to; its rows come in turn order, each carrying the history.</summary>
    [JsonPropertyName("conversation")]
    public string? Conversation { get; init; }

    /// <summary>Workloads of several questions per document (rag-shared.jsonl): the document asked about.</summary>
    [JsonPropertyName("document")]
    public string? Document { get; init; }

    public static IReadOnlyList<WorkloadItem> Load(string path)
    {
        if (!File.Exists(path))
        {
            throw new FileNotFoundException($"workload file '{path}' does not exist; see workloads/ for the shipped task sets.");
        }

        var items = new List<WorkloadItem>();
        int line = 0;
        foreach (var text in File.ReadLines(path))
        {
            line++;
            if (string.IsNullOrWhiteSpace(text))
            {
                continue;
            }

            try
            {
                items.Add(JsonSerializer.Deserialize<WorkloadItem>(text) ?? throw new JsonException("null"));
            }
            catch (JsonException ex)
            {
                throw new InvalidDataException($"{path}:{line}: not a workload object ({ex.Message}). Each line needs id, task, context, prompt and max_tokens.", ex);
            }
        }

        return items;
    }
}
