using System.Collections.Immutable;

namespace CoordGen.Messages;

/// <summary>An immutable token sequence with element-wise equality, safe to pass between actors.</summary>
public readonly struct TokenSequence : IEquatable<TokenSequence>
{
    private readonly ImmutableArray<int> _tokens;

    public TokenSequence(ImmutableArray<int> tokens) => _tokens = tokens.IsDefault ? [] : tokens;

    public static TokenSequence Empty => new([]);

    public ImmutableArray<int> Tokens => _tokens.IsDefault ? [] : _tokens;

    public int Count => Tokens.Length;

    public static TokenSequence From(IEnumerable<int> tokens) => new([.. tokens]);

    public bool Equals(TokenSequence other) => Tokens.AsSpan().SequenceEqual(other.Tokens.AsSpan());

    public override bool Equals(object? obj) => obj is TokenSequence t && Equals(t);

    public override int GetHashCode()
    {
        var h = new HashCode();
        foreach (int t in Tokens)
        {
            h.Add(t);
        }

        return h.ToHashCode();
    }

    public static bool operator ==(TokenSequence a, TokenSequence b) => a.Equals(b);

    public static bool operator !=(TokenSequence a, TokenSequence b) => !a.Equals(b);

    public override string ToString() => $"[{string.Join(",", Tokens)}]";
}
