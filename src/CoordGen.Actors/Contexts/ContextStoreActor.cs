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
/// <para>
/// A store created in-prompt also goes into the prompt of every request that names it (the edge renders
/// its documents into the context section). The device pins their prefilled keys and values in its prefix
/// cache for the store at the store's generation; when the documents change or the store is deleted, this
/// actor tells the device to release that pin (<see cref="DeviceProtocol.ReleasePrefix"/>).
/// </para>
/// </summary>
public sealed class ContextStoreActor : ReceiveActor, IWithTimers
{
    public const int MaxTokensPerStore = 200_000;
    private readonly int _maxStores;
    private readonly IActorRef? _device;
    private readonly Dictionary<string, Store> _stores = new(StringComparer.Ordinal);

    // Seeded from the clock, so a restarted store actor's generations still exceed those the device has seen.
    private long _generation = DateTime.UtcNow.Ticks;

    // The latest generation released per store name, sent again when a release met a restarting device.
    private readonly Dictionary<string, long> _released = new(StringComparer.Ordinal);
    private const int MaxReleasesKept = 4096;

    /// <param name="device">Where prefix pins are released (null: no device, as in tests of the store alone).</param>
    public ContextStoreActor(int maxStores, IActorRef? device)
    {
        _maxStores = maxStores;
        _device = device;
        Receive<ContextStoreProtocol.CreateStore>(Create);
        Receive<ContextStoreProtocol.AddDocument>(Add);
        Receive<ContextStoreProtocol.DeleteStore>(Delete);
        Receive<ContextStoreProtocol.GetSnapshot>(m => Sender.Tell(_stores.TryGetValue(m.Name, out var s)
            ? new ContextStoreProtocol.Snapshot(m.Name, s.Snapshot)
            : new ContextStoreProtocol.StoreMissing(m.Name)));
        Receive<ContextStoreProtocol.GetPromptDocuments>(m => Sender.Tell(_stores.TryGetValue(m.Name, out var s)
            ? new ContextStoreProtocol.PromptDocuments(m.Name, s.InPrompt, s.Generation, [.. s.Documents.Select(d => TokenSequence.From(d))])
            : new ContextStoreProtocol.StoreMissing(m.Name)));
        Receive<ContextStoreProtocol.ListStores>(_ => Sender.Tell(new ContextStoreProtocol.StoreList(
            [.. _stores.OrderBy(p => p.Key, StringComparer.Ordinal).Select(p => Info(p.Key, p.Value))])));

        // A release sent while the device restarts was lost; a run resumed on the new device could pin the
        // released documents again, so every release kept is sent again once the device is back.
        Receive<SupervisionProtocol.DeviceRestarting>(_ => ScheduleResend());
        Receive<ResendReleases>(_ =>
        {
            foreach (var (name, generation) in _released)
            {
                _device?.Tell(new DeviceProtocol.ReleasePrefix(name, generation));
            }
        });
    }

    public static Props Props(int maxStores = 64, IActorRef? device = null) => Akka.Actor.Props.Create(() => new ContextStoreActor(maxStores, device));

    private static ContextStoreProtocol.StoreInfo Info(string name, Store s) => new(name, s.Documents.Count, s.Documents.Sum(d => d.Length), s.InPrompt);

    private void Create(ContextStoreProtocol.CreateStore m)
    {
        if (_stores.TryGetValue(m.Name, out var existing))
        {
            Sender.Tell(existing.InPrompt == m.InPrompt
                ? Info(m.Name, existing)
                : new ContextStoreProtocol.StoreRefused(m.Name,
                    $"context store '{m.Name}' exists with in_prompt {(existing.InPrompt ? "true" : "false")}; delete it first (DELETE /v1/context_stores/{m.Name}) to create it with in_prompt {(m.InPrompt ? "true" : "false")}, or use another name.",
                    "context_store_conflict"));
            return;
        }

        if (_stores.Count >= _maxStores)
        {
            Sender.Tell(new ContextStoreProtocol.StoreRefused(m.Name, $"the server already holds {_maxStores} context stores; delete one (DELETE /v1/context_stores/{{name}}), reuse one or restart with a higher limit."));
            return;
        }

        var store = new Store([], new HistoryStore(MaxTokensPerStore), m.InPrompt, ++_generation);
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

        var store = new Store(docs, snapshot, old.InPrompt, ++_generation);
        _stores[m.Name] = store;
        Released(m.Name, old);
        Sender.Tell(Info(m.Name, store));
    }

    private void Delete(ContextStoreProtocol.DeleteStore m)
    {
        if (!_stores.Remove(m.Name, out var old))
        {
            Sender.Tell(new ContextStoreProtocol.StoreMissing(m.Name));
            return;
        }

        Released(m.Name, old);
        Sender.Tell(new ContextStoreProtocol.StoreDeleted(m.Name, old.Documents.Count, old.Documents.Sum(d => d.Length)));
    }

    // The documents the device may have pinned for this store are no longer what requests send.
    private void Released(string name, Store old)
    {
        if (old.InPrompt)
        {
            _released[name] = old.Generation;
            if (_released.Count > MaxReleasesKept)
            {
                _released.Remove(_released.MinBy(p => p.Value).Key);
            }

            _device?.Tell(new DeviceProtocol.ReleasePrefix(name, old.Generation));
        }
    }

    public ITimerScheduler Timers { get; set; } = null!;

    // One pending resend at a time: a release met a restarting device, so send them all again shortly.
    private void ScheduleResend()
    {
        if (!Timers.IsTimerActive(nameof(ResendReleases)))
        {
            Timers.StartSingleTimer(nameof(ResendReleases), ResendReleases.Instance, TimeSpan.FromMilliseconds(500));
        }
    }

    private sealed record ResendReleases
    {
        public static readonly ResendReleases Instance = new();
    }

    private sealed record Store(ImmutableList<int[]> Documents, HistoryStore Snapshot, bool InPrompt, long Generation);
}
