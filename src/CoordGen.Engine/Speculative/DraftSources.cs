namespace CoordGen.Engine.Speculative;

/// <summary>
/// What a session drafts its token tree from (<see cref="SpeculativeDecoder.BuildTree"/>): the suffix
/// automaton over prompt + output, and, where the method uses them, the calibrated index, the history
/// store, the reused segment, the bigram index and the consensus index. Drafting ahead for a
/// hypothetical outcome leaves out the sources whose state that outcome would change (reuse, bigrams).
/// </summary>
internal readonly record struct DraftSources(SuffixAutomaton Sam, CalibratedIndex? Calibrated, HistoryStore? History,
    DraftReuse? Reuse, NgramIndex? Ngrams, ConsensusIndex? Consensus);

/// <summary>Where the running matches stand in the automata of <see cref="DraftSources"/>.</summary>
internal readonly record struct DraftCursors(MatchCursor Sam, MatchCursor Calibrated, MatchCursor History);
