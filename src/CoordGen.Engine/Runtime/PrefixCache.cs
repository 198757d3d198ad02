using CoordGen.Messages;

namespace CoordGen.Engine.Runtime;

/// <summary>
/// KV rows of prompts the device has prefilled, so a prompt that starts the same way (a chat's history,
/// a shared document, a system prompt) copies them instead of computing them again. Keyed by a chain of
/// fixed-size token blocks (decision 0019): a block is found by its parent block and its own tokens, so
/// a block stands for the whole prefix that ends with it, and prompts that share a prefix share its
/// blocks. Each block keeps its slots' keys and values (every layer) and, when the prefill was
/// calibrated, the per-position top-k rows calibration reads, so a calibrated draft is the same with the
/// cache as without it.
/// <para>
/// Bytes stay under a room the caller gives (the KV budget less the sessions' caches): blocks are
/// evicted least recently used, leaves first (a block another block extends is needed to reach it).
/// Blocks an owner pinned (a named context store's documents, <see cref="Pin"/>) go only after every
/// unpinned leaf: they still yield to the sessions' caches, never to other prompts.
/// Not thread-safe: the device uses it from its steps, one at a time. Copies in and out are whole, so
/// no session reads a block after the call that copied it returns; evicting one never touches a session.
/// </para>
/// </summary>
public sealed class PrefixCache
{
    private readonly Dictionary<BlockKey, Block> _blocks = new(new BlockKeyComparer());
    private readonly Dictionary<long, Block> _byId = [];
    private readonly SortedSet<(long LastUse, long Id)> _leaves = [];
    private readonly SortedSet<(long LastUse, long Id)> _pinnedLeaves = [];
    private readonly Dictionary<string, (long Generation, HashSet<long> Blocks)> _pins = new(StringComparer.Ordinal);
    private readonly Dictionary<string, long> _released = new(StringComparer.Ordinal);
    private long _clock;
    private long _ids;

    /// <param name="blockTokens">Tokens per block: a prefix is reused in whole blocks.</param>
    public PrefixCache(int blockTokens = DefaultBlockTokens)
    {
        if (blockTokens < 1)
        {
            throw new ArgumentOutOfRangeException(nameof(blockTokens), blockTokens, "a block holds at least one token.");
        }

        BlockTokens = blockTokens;
    }

    public const int DefaultBlockTokens = 32;

    public int BlockTokens { get; }

    /// <summary>Bytes the blocks hold (keys, values and calibration rows).</summary>
    public long Bytes { get; private set; }

    public int BlockCount => _blocks.Count;

    /// <summary>Blocks some owner has pinned.</summary>
    public int PinnedBlocks { get; private set; }

    /// <summary>Blocks evicted so far.</summary>
    public long Evictions { get; private set; }

    /// <summary>Prompts looked up so far, and how many of them found a cached prefix.</summary>
    public (long Lookups, long Hits) Lookups => (_lookups, _hits);

    /// <summary>Prompt tokens looked up so far: found in the cache, and left to prefill.</summary>
    public (long Reused, long Prefilled) Tokens => (_reused, _prefilled);

    private long _lookups, _hits, _reused, _prefilled;

    /// <summary>
    /// The longest cached prefix of <paramref name="prompt"/>, in whole blocks, that leaves at least one
    /// token to prefill (its logits start the generation). With <paramref name="calibrationK"/> &gt; 0
    /// only blocks holding calibration rows of at least that many candidates count. Marks them used.
    /// </summary>
    public PrefixHit Lookup(ReadOnlySpan<int> prompt, int calibrationK = 0)
    {
        var found = new List<Block>();
        long parent = 0;
        int usable = (prompt.Length - 1) / BlockTokens;
        for (int b = 0; b < usable; b++)
        {
            var tokens = prompt.Slice(b * BlockTokens, BlockTokens).ToArray();
            if (!_blocks.TryGetValue(new BlockKey(parent, tokens), out var block) || (calibrationK > 0 && (block.Top?.K ?? 0) < calibrationK))
            {
                break;
            }

            found.Add(block);
            parent = block.Id;
        }

        foreach (var block in found)
        {
            Touch(block);
        }

        var hit = new PrefixHit(this, found, calibrationK);
        _lookups++;
        _hits += found.Count > 0 ? 1 : 0;
        _reused += hit.Tokens;
        _prefilled += prompt.Length - hit.Tokens;
        return hit;
    }

    /// <summary>
    /// Keeps the whole blocks of <paramref name="prompt"/> that <paramref name="cache"/> holds (slot i holds
    /// prompt token i) and this cache lacks, then evicts down to <paramref name="room"/> bytes.
    /// <paramref name="top"/>: calibration rows of the prompt's positions from 0 on (null when the prefill
    /// had none); a cached block without rows takes them. Returns the blocks added.
    /// </summary>
    public int Insert(ReadOnlySpan<int> prompt, KvCache cache, TopRows? top, long room)
    {
        CheckFormat(cache);
        int blocks = Math.Min(prompt.Length, cache.Length) / BlockTokens, added = 0;
        long parent = 0;
        Block? previous = null;
        for (int b = 0; b < blocks; b++)
        {
            int from = b * BlockTokens;
            var tokens = prompt.Slice(from, BlockTokens).ToArray();
            var key = new BlockKey(parent, tokens);
            if (!_blocks.TryGetValue(key, out var block))
            {
                if (cache.SlotBytesFor(BlockTokens) > room)
                {
                    break; // the room cannot hold one more block: nothing is copied just to be evicted
                }

                block = new Block(++_ids, previous, tokens, cache.SlotBytesFor(BlockTokens));
                cache.CopySlotsTo(from, BlockTokens, block.Rows);
                _blocks[key] = block;
                _byId[block.Id] = block;
                Bytes += block.RowBytes;
                if (previous is not null && previous.Children++ == 0)
                {
                    LeavesOf(previous).Remove((previous.LastUse, previous.Id));
                }

                block.LastUse = ++_clock;
                _leaves.Add((block.LastUse, block.Id));
                added++;
            }
            else
            {
                Touch(block);
            }

            if (block.Top is null && top is not null && top.Rows >= from + BlockTokens)
            {
                block.Top = Slice(top, from, BlockTokens);
                Bytes += block.Top.Ids.Length * (sizeof(int) + sizeof(float));
            }

            previous = block;
            parent = block.Id;
        }

        Trim(room);
        return added;
    }

    /// <summary>
    /// Evicts least recently used leaf blocks until the blocks hold at most <paramref name="room"/> bytes:
    /// unpinned leaves first, pinned ones only when no unpinned leaf is left.
    /// </summary>
    public void Trim(long room)
    {
        while (Bytes > Math.Max(0, room) && (_leaves.Count > 0 || _pinnedLeaves.Count > 0))
        {
            var tier = _leaves.Count > 0 ? _leaves : _pinnedLeaves;
            var (_, id) = tier.Min;
            tier.Remove(tier.Min);
            _byId.Remove(id, out var victim);
            _blocks.Remove(new BlockKey(victim!.Parent?.Id ?? 0, victim.Tokens));
            Bytes -= victim.RowBytes + (victim.Top is { } t ? t.Ids.Length * (sizeof(int) + sizeof(float)) : 0);
            victim.Dispose();
            Evictions++;
            PinnedBlocks -= victim.Pins > 0 ? 1 : 0;
            if (victim.Parent is { } p && --p.Children == 0)
            {
                LeavesOf(p).Add((p.LastUse, p.Id));
            }
        }
    }

    /// <summary>
    /// Pins, for <paramref name="owner"/>, the cached whole blocks that hold the first
    /// <paramref name="tokens"/> tokens of <paramref name="prompt"/> (from the start, up to the first block
    /// the cache lacks). <paramref name="generation"/> orders an owner's pins: a newer generation replaces
    /// what the owner pinned before; the same one adds to it (a store's documents open chat prompts and
    /// text completions with different tokens, so one generation may hold a few chains); an older one than
    /// the owner holds, or one at or below a generation <see cref="Unpin"/> released, is ignored (a request
    /// that read a store before it changed may finish its prefill after the change). Returns the blocks
    /// this chain holds pinned.
    /// </summary>
    public int Pin(string owner, long generation, ReadOnlySpan<int> prompt, int tokens)
    {
        if ((_released.TryGetValue(owner, out long released) && generation <= released)
            || (_pins.TryGetValue(owner, out var held) && held.Generation > generation))
        {
            return 0;
        }

        var chain = new List<long>();
        long parent = 0;
        int blocks = Math.Min(tokens, prompt.Length) / BlockTokens;
        for (int b = 0; b < blocks && _blocks.TryGetValue(new BlockKey(parent, prompt.Slice(b * BlockTokens, BlockTokens).ToArray()), out var block); b++)
        {
            chain.Add(block.Id);
            parent = block.Id;
        }

        if (_pins.TryGetValue(owner, out held) && held.Generation < generation)
        {
            Release(owner);
        }

        if (!_pins.TryGetValue(owner, out held))
        {
            _pins[owner] = held = (generation, []);
        }

        foreach (long id in chain.Where(held.Blocks.Add))
        {
            ChangePins(_byId[id], +1);
        }

        return chain.Count;
    }

    /// <summary>
    /// Releases what <paramref name="owner"/> pinned at generations up to <paramref name="throughGeneration"/>
    /// (its blocks become ordinary least-recently-used entries) and ignores later pins of those generations.
    /// </summary>
    public void Unpin(string owner, long throughGeneration)
    {
        _released[owner] = Math.Max(throughGeneration, _released.GetValueOrDefault(owner));
        if (_pins.TryGetValue(owner, out var held) && held.Generation <= throughGeneration)
        {
            Release(owner);
        }
    }

    private void Release(string owner)
    {
        if (_pins.Remove(owner, out var held))
        {
            foreach (long id in held.Blocks)
            {
                if (_byId.TryGetValue(id, out var block))
                {
                    ChangePins(block, -1);
                }
            }
        }
    }

    private void ChangePins(Block block, int delta)
    {
        bool leaf = block.Children == 0;
        if (leaf)
        {
            LeavesOf(block).Remove((block.LastUse, block.Id));
        }

        PinnedBlocks += (block.Pins + delta > 0 ? 1 : 0) - (block.Pins > 0 ? 1 : 0);
        block.Pins += delta;
        if (leaf)
        {
            LeavesOf(block).Add((block.LastUse, block.Id));
        }
    }

    private SortedSet<(long LastUse, long Id)> LeavesOf(Block block) => block.Pins > 0 ? _pinnedLeaves : _leaves;

    /// <summary>Drops every block (the weights changed, or the memory is needed).</summary>
    public void Clear()
    {
        Evictions += _blocks.Count;
        foreach (var b in _byId.Values)
        {
            b.Dispose();
        }

        _blocks.Clear();
        _byId.Clear();
        _leaves.Clear();
        _pinnedLeaves.Clear();
        _pins.Clear();
        PinnedBlocks = 0;
        Bytes = 0;
    }

    private KvFormat? _format;

    /// <summary>Blocks hold rows as bytes in the format of the caches they came from: every cache that uses them must have it.</summary>
    internal void CheckFormat(KvCache cache)
    {
        if (_blocks.Count == 0)
        {
            _format = cache.Format;
        }
        else if (_format != cache.Format)
        {
            throw new InvalidOperationException($"this prefix cache holds {_format?.Name()} rows and cannot serve a {cache.Format.Name()} cache; clear it first.");
        }
    }

    private void Touch(Block block)
    {
        bool leaf = block.Children == 0;
        if (leaf)
        {
            LeavesOf(block).Remove((block.LastUse, block.Id));
        }

        block.LastUse = ++_clock;
        if (leaf)
        {
            LeavesOf(block).Add((block.LastUse, block.Id));
        }
    }

    /// <summary>Consecutive rows of one k joined into one (a prefill's chunks).</summary>
    public static TopRows Join(IReadOnlyList<TopRows> parts)
    {
        int k = parts[0].K;
        if (parts.Any(p => p.K != k))
        {
            throw new ArgumentException("calibration rows of different k cannot be joined.", nameof(parts));
        }

        return new TopRows(k, [.. parts.SelectMany(p => p.Ids)], [.. parts.SelectMany(p => p.Probs)]);
    }

    internal static TopRows Slice(TopRows rows, int from, int count) =>
        new(rows.K, rows.Ids.AsSpan(from * rows.K, count * rows.K).ToArray(), rows.Probs.AsSpan(from * rows.K, count * rows.K).ToArray());

    /// <summary>
    /// One block: its tokens, its slots' keys and values in native memory (hundreds of megabytes of cached
    /// rows on the managed heap made the garbage collector's background work compete with the device's
    /// threads: plain decoding measured 17% slower on the demo model with the rows in float arrays), and
    /// its calibration rows.
    /// </summary>
    internal sealed unsafe class Block : IDisposable
    {
        private byte* _rows;
        private readonly int _bytes;

        public Block(long id, Block? parent, int[] tokens, long bytes)
        {
            Id = id;
            Parent = parent;
            Tokens = tokens;
            _bytes = checked((int)bytes);
            _rows = (byte*)System.Runtime.InteropServices.NativeMemory.Alloc((nuint)bytes);
        }

        ~Block() => Free();

        public long Id { get; }

        public Block? Parent { get; }

        public int[] Tokens { get; }

        public long RowBytes => _bytes;

        /// <summary>The slots' keys and values as <see cref="KvCache.CopySlotsTo"/> writes them, in the cache's format.</summary>
        public Span<byte> Rows => _rows == null ? throw new ObjectDisposedException(nameof(Block), "this prefix block was evicted") : new(_rows, _bytes);

        public void Dispose()
        {
            Free();
            GC.SuppressFinalize(this);
        }

        private void Free()
        {
            if (_rows != null)
            {
                System.Runtime.InteropServices.NativeMemory.Free(_rows);
                _rows = null;
            }
        }

        public TopRows? Top { get; set; }

        public long LastUse { get; set; }

        public int Children { get; set; }

        /// <summary>Owners that pinned this block (0: an ordinary entry).</summary>
        public int Pins { get; set; }
    }

    private readonly record struct BlockKey(long Parent, int[] Tokens);

    private sealed class BlockKeyComparer : IEqualityComparer<BlockKey>
    {
        public bool Equals(BlockKey x, BlockKey y) => x.Parent == y.Parent && x.Tokens.AsSpan().SequenceEqual(y.Tokens);

        public int GetHashCode(BlockKey k)
        {
            var h = new HashCode();
            h.Add(k.Parent);
            h.AddBytes(System.Runtime.InteropServices.MemoryMarshal.AsBytes(k.Tokens.AsSpan()));
            return h.ToHashCode();
        }
    }
}

/// <summary>
/// A prompt's cached prefix: whole blocks from the start, <see cref="Tokens"/> tokens in all (0 = a miss).
/// Copy it (<see cref="CopyInto"/>) before the cache is trimmed or changed again: an evicted block's rows are freed.
/// </summary>
public sealed class PrefixHit
{
    private readonly PrefixCache _owner;
    private readonly IReadOnlyList<PrefixCache.Block> _blocks;

    private readonly int _calibrationK;

    internal PrefixHit(PrefixCache owner, IReadOnlyList<PrefixCache.Block> blocks, int calibrationK)
    {
        _owner = owner;
        _blocks = blocks;
        _calibrationK = calibrationK;
    }

    public int Tokens => _blocks.Count * _owner.BlockTokens;

    /// <summary>Copies the prefix's slots into an empty cache (which then holds <see cref="Tokens"/> committed slots).</summary>
    public void CopyInto(KvCache cache)
    {
        if (cache.Length != 0)
        {
            throw new InvalidOperationException($"a cached prefix goes into an empty cache (this one holds {cache.Length} slots).");
        }

        if (_blocks.Count > 0)
        {
            _owner.CheckFormat(cache);
        }

        foreach (var b in _blocks)
        {
            cache.AppendSlots(b.Rows, _owner.BlockTokens);
        }
    }

    /// <summary>The prefix's calibration rows, <paramref name="k"/> candidates each (null on a miss); k at most the lookup's.</summary>
    public TopRows? TopRows(int k)
    {
        if (_blocks.Count == 0)
        {
            return null;
        }

        if (k < 1 || k > _calibrationK)
        {
            throw new ArgumentOutOfRangeException(nameof(k), k, $"this prefix was looked up for calibration rows of {_calibrationK} candidates; ask for 1 to {_calibrationK}.");
        }

        var ids = new int[Tokens * k];
        var probs = new float[Tokens * k];
        int row = 0;
        foreach (var b in _blocks)
        {
            var t = b.Top ?? throw new InvalidOperationException("this prefix was looked up without calibration rows.");
            for (int r = 0; r < t.Rows; r++, row++)
            {
                t.Ids.AsSpan(r * t.K, k).CopyTo(ids.AsSpan(row * k, k));
                t.Probs.AsSpan(r * t.K, k).CopyTo(probs.AsSpan(row * k, k));
            }
        }

        return new TopRows(k, ids, probs);
    }
}
