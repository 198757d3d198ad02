namespace CoordGen.Engine.Tokenization;

/// <summary>
/// Turns a growing token sequence into text pieces as they become complete. A token may end in the
/// middle of a UTF-8 character; such text is held back until the next token completes it.
/// </summary>
public sealed class StreamingDecoder(HfTokenizer tokenizer)
{
    private readonly List<int> _ids = [];
    private int _emitted;

    /// <summary>Characters of text decoded so far (a character still incomplete not counted): where the next token's text starts.</summary>
    public int Length => _emitted;

    public string Push(int id)
    {
        _ids.Add(id);
        string text = tokenizer.Decode(_ids);
        if (text.EndsWith('\uFFFD'))
        {
            return "";
        }

        string piece = text.Length > _emitted ? text[_emitted..] : "";
        _emitted = text.Length;
        return piece;
    }

    public string Flush()
    {
        string text = tokenizer.Decode(_ids);
        string piece = text.Length > _emitted ? text[_emitted..] : "";
        _emitted = text.Length;
        return piece;
    }
}
