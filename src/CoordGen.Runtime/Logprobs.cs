using System.Collections.Immutable;
using System.Text;
using CoordGen.Engine.Tokenization;
using static CoordGen.Messages.GenerationProtocol;

namespace CoordGen;

/// <summary>One of the likeliest tokens at a position: its id, text, bytes (exact where the text cuts a UTF-8 character) and log-probability.</summary>
public sealed record LogprobAlternative(int Id, string Token, byte[] Bytes, float Logprob);

/// <summary>
/// A generated token's log-probability as the API reports it (OpenAI's <c>logprobs.content[]</c>): the model's
/// own distribution (log-softmax of the raw logits, before temperature, top-k or top-p), with the
/// likeliest alternatives at the position, best first.
/// </summary>
/// <param name="Id">The token's id.</param>
/// <param name="Token">Its text (U+FFFD where it holds part of a UTF-8 character).</param>
/// <param name="Bytes">The bytes it stands for.</param>
/// <param name="Logprob">Its log-probability (natural log).</param>
/// <param name="Top">The likeliest tokens at its position, best first.</param>
/// <param name="TextOffset">Where the token's text starts in the generated text, in UTF-16 characters (a token
/// that completes a character started by the one before it points at that character).</param>
public sealed record LogprobEntry(int Id, string Token, byte[] Bytes, float Logprob, IReadOnlyList<LogprobAlternative> Top, int TextOffset)
{
    internal static LogprobEntry From(HfTokenizer tokenizer, int id, TokenLogprob lp, int textOffset)
    {
        var top = lp.Top.IsDefault ? ImmutableArray<TokenAlternative>.Empty : lp.Top;
        return new LogprobEntry(id, Text(tokenizer, id, out byte[] bytes), bytes, lp.Logprob,
            [.. top.Select(a => new LogprobAlternative(a.Id, Text(tokenizer, a.Id, out byte[] b), b, a.Logprob))], textOffset);
    }

    private static string Text(HfTokenizer tokenizer, int id, out byte[] bytes)
    {
        bytes = tokenizer.TokenBytes(id);
        return Encoding.UTF8.GetString(bytes);
    }
}

/// <summary>
/// A piece of generated text as it streams, with the log-probabilities of the tokens read since the last
/// piece (when the request asked for them; empty otherwise). A token whose text is held back (part of a
/// UTF-8 character, or possibly the start of a stop sequence) reports with the next piece, so
/// <see cref="Text"/> may be empty when only log-probabilities are left at the end.
/// </summary>
public sealed record TextDelta(string Text, IReadOnlyList<LogprobEntry> Logprobs);
