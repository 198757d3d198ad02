using System.Collections.Immutable;

namespace CoordGen.Messages;

/// <summary>Messages to the context store actor, which owns named stores of documents to draft from.</summary>
public static class ContextStoreProtocol
{
    /// <summary>Create a store (no-op if it exists). Reply: <see cref="StoreInfo"/> or <see cref="StoreRefused"/>.</summary>
    public sealed record CreateStore(string Name);

    /// <summary>Append a tokenized document. Reply: <see cref="StoreInfo"/> or <see cref="StoreMissing"/>.</summary>
    public sealed record AddDocument(string Name, TokenSequence Tokens);

    /// <summary>Ask for a store's current snapshot. Reply: <see cref="Snapshot"/>, or <see cref="StoreMissing"/>.</summary>
    public sealed record GetSnapshot(string Name);

    /// <summary>A store's current snapshot, read-only (the store actor publishes a new one on each change).</summary>
    public sealed record Snapshot(string Name, IContextSnapshot Context);

    /// <summary>List the stores. Reply: <see cref="StoreList"/>.</summary>
    public sealed record ListStores;

    public sealed record StoreInfo(string Name, int Documents, int Tokens);

    public sealed record StoreList(ImmutableArray<StoreInfo> Stores);

    public sealed record StoreMissing(string Name);

    public sealed record StoreRefused(string Name, string Reason);
}
