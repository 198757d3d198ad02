using System.Collections.Immutable;
using Akka.Actor;
using CoordGen.Engine.Speculative;
using CoordGen.Messages;

namespace CoordGen.Actors.Contexts;

/// <summary>
/// Owns the named context stores (documents, past responses) that requests draft from. Each change
/// publishes a new immutable snapshot (a suffix automaton over the store's documents), so running
/// requests keep reading the snapshot they started with. Bounded: a store holds at most
/// <see cref="MaxTokensPerStore"/> tokens and the oldest documents are dropped first.
/// </summary>
public sealed class ContextStoreActor : ReceiveActor
{
    public const int MaxTokensPerStore = 200_000;
    private readonly int _maxStores;
    private readonly Dictionary<string, Store> _stores = new(StringComparer.Ordinal);

    public ContextStoreActor(int maxStores)
    {
        _maxStores = maxStores;
        Receive<ContextStoreProtocol.CreateStore>(Create);
        Receive<ContextStoreProtocol.AddDocument>(Add);
        Receive<ContextStoreProtocol.GetSnapshot>(m => Sender.Tell(_stores.TryGetValue(m.Name, out var s)
            ? new ContextStoreProtocol.Snapshot(m.Name, s.Snapshot)
            : new ContextStoreProtocol.StoreMissing(m.Name)));
        Receive<ContextStoreProtocol.ListStores>(_ => Sender.Tell(new ContextStoreProtocol.StoreList(
            [.. _stores.OrderBy(p => p.Key, StringComparer.Ordinal).Select(p => Info(p.Key, p.Value))])));
    }

    public static Props Props(int maxStores = 64) => Akka.Actor.Props.Create(() => new ContextStoreActor(maxStores));

    private static ContextStoreProtocol.StoreInfo Info(string name, Store s) => new(name, s.Documents.Count, s.Documents.Sum(d => d.Length));

    private void Create(ContextStoreProtocol.CreateStore m)
    {
        if (_stores.TryGetValue(m.Name, out var existing))
        {
            Sender.Tell(Info(m.Name, existing));
            return;
        }

        if (_stores.Count >= _maxStores)
        {
            Sender.Tell(new ContextStoreProtocol.StoreRefused(m.Name, $"the server already holds {_maxStores} context stores; reuse one or restart with a higher limit."));
            return;
        }

        var store = new Store([], new HistoryStore(MaxTokensPerStore));
        _stores[m.Name] = store;
        Sender.Tell(Info(m.Name, store));
    }

    private void Add(ContextStoreProtocol.AddDocument m)
    {
        if (!_stores.TryGetValue(m.Name, out var old))
        {
            Sender.Tell(new ContextStoreProtocol.StoreMissing(m.Name));
            return;
        }

        var docs = old.Documents.Add([.. m.Tokens.Tokens]);
        while (docs.Count > 1 && docs.Sum(d => d.Length + 1) > MaxTokensPerStore)
        {
            docs = docs.RemoveAt(0);
        }

        var snapshot = new HistoryStore(MaxTokensPerStore);
        foreach (var d in docs)
        {
            snapshot.Add(d);
        }

        var store = new Store(docs, snapshot);
        _stores[m.Name] = store;
        Sender.Tell(Info(m.Name, store));
    }

    private sealed record Store(ImmutableList<int[]> Documents, HistoryStore Snapshot);
}
