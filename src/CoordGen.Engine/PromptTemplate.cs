namespace CoordGen.Engine;

/// <summary>
/// The chat template coordgen-demo was trained with (docs/templates.md):
/// <c>&lt;|context|&gt;\n{context}\n&lt;|user|&gt;\n{prompt}\n&lt;|assistant|&gt;\n</c>; the model answers and ends with <c>&lt;|end|&gt;</c>.
/// Models without these special tokens get the plain text "{context}\n\n{prompt}".
/// </summary>
public static class PromptTemplate
{
    public const string ContextToken = "<|context|>";
    public const string UserToken = "<|user|>";
    public const string AssistantToken = "<|assistant|>";
    public const string EndToken = "<|end|>";

    public static string Render(string? context, string prompt, bool modelHasRoleTokens = true)
    {
        if (!modelHasRoleTokens)
        {
            return string.IsNullOrEmpty(context) ? prompt : $"{context}\n\n{prompt}";
        }

        return $"{ContextToken}\n{context ?? ""}\n{UserToken}\n{prompt}\n{AssistantToken}\n";
    }

    /// <summary>
    /// The text every prompt whose context section starts with <paramref name="documents"/> starts with
    /// (<see cref="Render"/> with a context of the documents and whatever follows them on later lines).
    /// </summary>
    public static string ContextPrefix(string documents, bool modelHasRoleTokens = true) =>
        modelHasRoleTokens ? $"{ContextToken}\n{documents}\n" : documents + "\n";
}
