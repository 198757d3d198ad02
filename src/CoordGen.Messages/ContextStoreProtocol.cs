using System.Collections.Immutable;

namespace CoordGen.Messages;

/// <summary>
/// Messages to the context store actor, which owns named stores of documents. Every store feeds drafting;
/// a store created <c>InPrompt</c> also puts its documents in the context section of every request that
/// names it, and the device keeps their keys and values (prefilled once) in its prefix cache.
/// </summary>
public static class ContextStoreProtocol
{
    /// <summary>
    /// Create a store (no-op if it exists as asked). Reply: <see cref="StoreInfo"/>, or <see cref="StoreRefused"/>
    /// (too many stores, or one of that name exists with the other <paramref name="InPrompt"/>).
    /// </summary>
    public sealed record CreateStore(string Name, bool InPrompt = false);

    /// <summary>Append a tokenized document. Reply: <see cref="StoreInfo"/> or <see cref="StoreMissing"/>.</summary>
    public sealed record AddDocument(string Name, TokenSequence Tokens);

    /// <summary>
    /// Delete a store. Requests already running keep the snapshot they started with; later ones that name
    /// it are refused. Reply: <see cref="StoreDeleted"/> or <see cref="StoreMissing"/>.
    /// </summary>
    public sealed record DeleteStore(string Name);

    /// <summary>Ask for a store's current snapshot. Reply: <see cref="Snapshot"/>, or <see cref="StoreMissing"/>.</summary>
    public sealed record GetSnapshot(string Name);

    /// <summary>A store's current snapshot, read-only (the store actor publishes a new one on each change).</summary>
    public sealed record Snapshot(string Name, IContextSnapshot Context);

    /// <summary>Ask for a store's documents as a prompt carries them. Reply: <see cref="PromptDocuments"/> or <see cref="StoreMissing"/>.</summary>
    public sealed record GetPromptDocuments(string Name);

    /// <summary>
    /// A store's documents in order, whether requests carry them in their prompt, and the store's generation
    /// (it grows with every change to any store, so a pin made from this answer is told apart from later ones).
    /// </summary>
    public sealed record PromptDocuments(string Name, bool InPrompt, long Generation, ImmutableArray<TokenSequence> Documents);

    /// <summary>List the stores. Reply: <see cref="StoreList"/>.</summary>
    public sealed record ListStores;

    public sealed record StoreInfo(string Name, int Documents, int Tokens, bool InPrompt = false);

    public sealed record StoreList(ImmutableArray<StoreInfo> Stores);

    public sealed record StoreMissing(string Name);

    public sealed record StoreDeleted(string Name, int Documents, int Tokens);

    /// <summary>A store could not be created: <paramref name="Code"/> says why for the API (too_many_context_stores, context_store_conflict).</summary>
    public sealed record StoreRefused(string Name, string Reason, string Code = "too_many_context_stores");
}
