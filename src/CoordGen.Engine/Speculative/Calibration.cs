using System.Numerics.Tensors;
using CoordGen.Engine.Runtime;
using CoordGen.Messages;

namespace CoordGen.Engine.Speculative;

/// <summary>Settings of in-context calibration (paper §3.3); see docs/decisions/0002-calibration.md.</summary>
public sealed record CalibrationOptions
{
    /// <summary>Next-token candidates kept per context position.</summary>
    public int TopK { get; init; } = 2;

    /// <summary>Candidates below this probability are not followed.</summary>
    public float MinProbability { get; init; } = 0.1f;

    /// <summary>Tokens per calibrated path after its anchor.</summary>
    public int Depth { get; init; } = 8;

    /// <summary>Context tokens kept before each path's anchor, so a draft lookup can match them.</summary>
    public int LeftContext { get; init; } = 2;
}

/// <summary>
/// Per-position top-k next tokens from the prefill, gathered chunk by chunk: from the graphs' top-K
/// head (<see cref="StepBuffers.TopIds"/>), or, for graphs without one, in one vectorized pass per
/// logits row (max, log-sum-exp, k-best scan).
/// </summary>
public sealed class PrefillTopK
{
    private readonly int _k;
    private readonly List<int> _tokens = [];
    private readonly List<float> _probs = [];
    private float[] _scratch = [];

    public PrefillTopK(int k) => _k = k;

    public int K => _k;

    public int Positions => _tokens.Count / _k;

    public int Token(int pos, int rank) => _tokens[(pos * _k) + rank];

    public float Probability(int pos, int rank) => _probs[(pos * _k) + rank];

    /// <summary>Reads rows 0..n-1 of a prefill chunk (call from Generator.Prefill's onChunk).</summary>
    public void AddChunk(StepBuffers buf, int n) => Add(RowsOf(buf, n, _k));

    /// <summary>
    /// Rows 0..n-1 of a step's output, k candidates each: read from the graph's top-K head when it has
    /// at least k (k numbers a row), else scanned from the logits here.
    /// </summary>
    public static TopRows RowsOf(StepBuffers buf, int n, int k)
    {
        if (buf.TopK >= k)
        {
            var ids = new int[n * k];
            var probs = new float[n * k];
            for (int r = 0; r < n; r++)
            {
                for (int j = 0; j < k; j++)
                {
                    ids[(r * k) + j] = (int)buf.TopIds[(r * buf.TopK) + j];
                    probs[(r * k) + j] = buf.TopProbs[(r * buf.TopK) + j];
                }
            }

            return new TopRows(k, ids, probs);
        }

        var scan = new PrefillTopK(k);
        scan.AddRows(buf.Logits.AsSpan(0, n * buf.VocabSize), buf.VocabSize);
        return scan.ToRows();
    }


    /// <summary>Appends rows read elsewhere (a calibrator's copy of a chunk); they must have at least k candidates each.</summary>
    public void Add(TopRows rows)
    {
        if (rows.K < _k)
        {
            throw new ArgumentException($"rows carry {rows.K} candidates each; this calibration keeps {_k}.");
        }

        for (int r = 0; r < rows.Rows; r++)
        {
            for (int j = 0; j < _k; j++)
            {
                _tokens.Add(rows.Ids[(r * rows.K) + j]);
                _probs.Add(rows.Probs[(r * rows.K) + j]);
            }
        }
    }

    /// <summary>What was read so far, as rows.</summary>
    public TopRows ToRows() => new(_k, [.. _tokens], [.. _probs]);

    /// <summary>Reads consecutive logits rows of <paramref name="vocab"/> entries each (a copy of a chunk's, for a calibrator off the device thread).</summary>
    public void AddRows(ReadOnlySpan<float> logits, int vocab)
    {
        Span<int> best = stackalloc int[_k];
        Span<float> bestVal = stackalloc float[_k];
        int n = logits.Length / vocab;
        for (int r = 0; r < n; r++)
        {
            var row = logits.Slice(r * vocab, vocab);
            float max = TensorPrimitives.Max(row);
            if (_scratch.Length != row.Length)
            {
                _scratch = new float[row.Length];
            }

            TensorPrimitives.Subtract(row, max, _scratch);
            TensorPrimitives.Exp(_scratch, _scratch);
            float sum = TensorPrimitives.Sum(_scratch);

            bestVal.Fill(float.NegativeInfinity);
            best.Fill(0);
            for (int i = 0; i < row.Length; i++)
            {
                float v = row[i];
                if (v <= bestVal[_k - 1])
                {
                    continue;
                }

                int j = _k - 1;
                while (j > 0 && v > bestVal[j - 1])
                {
                    bestVal[j] = bestVal[j - 1];
                    best[j] = best[j - 1];
                    j--;
                }

                bestVal[j] = v;
                best[j] = i;
            }

            for (int j = 0; j < _k; j++)
            {
                _tokens.Add(best[j]);
                _probs.Add(MathF.Exp(bestVal[j] - max) / sum);
            }
        }
    }
}

/// <summary>
/// The calibrated tree of paper §3.3, stored as a draft index: for every context position, a
/// depth-first walk follows the model's own likely next tokens (from the prefill logits), jumping to
/// an occurrence of each predicted token in the context and reading the prefill logits there. Paths
/// that differ from the verbatim context are written, with a little left context, into a suffix
/// automaton (separated by -1), which drafting queries like the prompt's own automaton.
/// </summary>
public sealed class CalibratedIndex
{
    private CalibratedIndex(SuffixAutomaton sam, int paths) => (Automaton, Paths) = (sam, paths);

    public SuffixAutomaton Automaton { get; }

    public int Paths { get; }

    /// <summary>Indexes calibrated paths (built here or by a calibrator) for drafting.</summary>
    public static CalibratedIndex From(CalibratedPaths paths)
    {
        var indexer = new Indexer(paths);
        indexer.Advance(int.MaxValue);
        return indexer.Result();
    }

    /// <summary>
    /// <see cref="From"/> in slices: each <see cref="Advance"/> indexes the next symbols, so a drafter can
    /// answer other sessions between slices. The index is the same however the work is sliced.
    /// </summary>
    public sealed class Indexer(CalibratedPaths paths)
    {
        private readonly SuffixAutomaton _sam = new(paths.Symbols.Length);
        private int _next;

        public bool IsComplete => _next >= paths.Symbols.Length;

        /// <summary>Indexes up to <paramref name="symbols"/> more symbols; true when every symbol is in.</summary>
        public bool Advance(int symbols)
        {
            int end = (int)Math.Min(paths.Symbols.Length, (long)_next + Math.Max(0, symbols));
            for (; _next < end; _next++)
            {
                _sam.Extend(paths.Symbols[_next]);
            }

            return IsComplete;
        }

        public CalibratedIndex Result() => IsComplete
            ? new CalibratedIndex(_sam, paths.Paths)
            : throw new InvalidOperationException($"the calibrated index is not built yet ({_next} of {paths.Symbols.Length} symbols); call Advance until it returns true.");
    }

    public static CalibratedIndex Build(IReadOnlyList<int> context, PrefillTopK topK, CalibrationOptions options)
    {
        var builder = new Builder(context, topK, options);
        builder.Advance(int.MaxValue);
        return builder.Result();
    }

    /// <summary>
    /// <see cref="Build"/> in slices: each <see cref="Advance"/> walks the next anchor positions, so a
    /// caller can spread the work (the calibrator does, while other sessions' steps hold the cores). The
    /// index is the same however the work is sliced.
    /// </summary>
    public sealed class Builder
    {
        private readonly IReadOnlyList<int> _context;
        private readonly PrefillTopK _topK;
        private readonly CalibrationOptions _options;
        private readonly Dictionary<int, List<int>> _occurrences = new();
        private readonly List<int> _symbols;
        private readonly List<int> _path;
        private readonly int _n;
        private int _next;
        private int _paths;

        public Builder(IReadOnlyList<int> context, PrefillTopK topK, CalibrationOptions options)
        {
            _context = context;
            _topK = topK;
            _options = options;
            _path = new List<int>(options.Depth);
            _n = Math.Min(context.Count, topK.Positions);
            for (int i = 0; i < _n; i++)
            {
                if (!_occurrences.TryGetValue(context[i], out var l))
                {
                    _occurrences[context[i]] = l = [];
                }

                l.Add(i);
            }

            // The automaton sized for the symbols the paths will write, counted by a walk that writes nothing.
            int symbols = 0;
            for (int i = 0; i < _n; i++)
            {
                symbols += Walk(i, write: false);
            }

            _symbols = new List<int>(symbols);
        }

        /// <summary>Anchor positions walked so far.</summary>
        public int Done => _next;

        public bool IsComplete => _next >= _n;

        /// <summary>Walks up to <paramref name="positions"/> more anchor positions; true when every position is done.</summary>
        public bool Advance(int positions)
        {
            int end = (int)Math.Min(_n, (long)_next + Math.Max(0, positions));
            for (; _next < end; _next++)
            {
                Walk(_next, write: true);
            }

            return IsComplete;
        }

        /// <summary>The calibrated paths as data (a calibrator hands them to the drafter, which indexes them).</summary>
        public CalibratedPaths Paths() => IsComplete
            ? new CalibratedPaths([.. _symbols], _paths)
            : throw new InvalidOperationException($"the calibrated index is not built yet ({_next} of {_n} positions); call Advance until it returns true.");

        public CalibratedIndex Result() => From(Paths());

        // The calibrated paths anchored at position i: written into the automaton, or only counted. Returns the symbols.
        private int Walk(int i, bool write)
        {
            int symbols = 0;
            var context = _context;
            var topK = _topK;
            var options = _options;
            var path = _path;
            int n = _n;
            for (int rank = 0; rank < topK.K; rank++)
            {
                if (topK.Probability(i, rank) < options.MinProbability)
                {
                    break;
                }

                path.Clear();
                int pos = i;
                int y = topK.Token(i, rank);
                bool differs = false;
                while (path.Count < options.Depth)
                {
                    path.Add(y);
                    differs |= pos + 1 >= n || context[pos + 1] != y;
                    int next = NextOccurrence(context, _occurrences, pos, y, n);
                    if (next < 0)
                    {
                        break;
                    }

                    pos = next;
                    y = topK.Token(pos, 0);
                    if (topK.Probability(pos, 0) < options.MinProbability)
                    {
                        break;
                    }
                }

                if (!differs)
                {
                    continue;
                }

                int left = Math.Max(0, i - options.LeftContext);
                symbols += i - left + 1 + path.Count + 1;
                if (!write)
                {
                    continue;
                }

                for (int l = left; l <= i; l++)
                {
                    _symbols.Add(context[l]);
                }

                _symbols.AddRange(path);
                _symbols.Add(-1);
                _paths++;
            }

            return symbols;
        }
    }

    // The verbatim next position if it holds y, else the nearest later occurrence, else the latest earlier one.
    private static int NextOccurrence(IReadOnlyList<int> ctx, Dictionary<int, List<int>> occ, int pos, int y, int n)
    {
        if (pos + 1 < n && ctx[pos + 1] == y)
        {
            return pos + 1;
        }

        if (!occ.TryGetValue(y, out var list))
        {
            return -1;
        }

        int idx = list.BinarySearch(pos + 1);
        if (idx < 0)
        {
            idx = ~idx;
        }

        if (idx < list.Count)
        {
            return list[idx];
        }

        return list[^1] != pos ? list[^1] : -1;
    }
}
