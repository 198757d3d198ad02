namespace CoordGen.Messages;

/// <summary>A conversation's identity, as the caller named it (or the runtime generated it).</summary>
public readonly record struct SessionId(string Value)
{
    public override string ToString() => Value;
}

/// <summary>
/// One run of a session on a device: a resumed session (after a fault) runs again under a new
/// <paramref name="Run"/> number, so a late message for the run it replaced is recognised as stale and
/// dropped. The device numbers its runs; the drafter, the verifier and the calibrator key their state by it.
/// </summary>
public readonly record struct SessionRun(SessionId Session, long Run)
{
    public override string ToString() => $"{Session}#{Run}";
}

/// <summary>
/// An immutable snapshot of a named context store (its documents and past responses), passed by
/// reference between the actors of one node: the drafter drafts from it while the store actor builds
/// the next one. Across nodes a drafter would rebuild it from the store's documents.
/// </summary>
public interface IContextSnapshot
{
    /// <summary>Tokens the snapshot holds.</summary>
    int Tokens { get; }
}
