"""Byte-level BPE: training, encoding, and tokenizer.json in the Hugging Face layout.

Pre-tokenization is GPT-2's regex over the raw text; bytes are mapped to printable code points
with GPT-2's byte-to-unicode table, so any UTF-8 input round-trips. The C# side loads the
resulting tokenizer.json into Microsoft.ML.Tokenizers.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict

import regex

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_PAT = regex.compile(GPT2_PATTERN)


def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


B2U = bytes_to_unicode()
U2B = {v: k for k, v in B2U.items()}


def pretokenize(text: str) -> list[str]:
    return ["".join(B2U[b] for b in piece.encode("utf-8")) for piece in _PAT.findall(text)]


def train(texts, vocab_size: int, specials: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    counts: Counter[str] = Counter()
    for t in texts:
        counts.update(pretokenize(t))
    words = [list(w) for w in counts]
    freqs = [counts[w] for w in counts]
    pair_counts: defaultdict[tuple[str, str], int] = defaultdict(int)
    where: defaultdict[tuple[str, str], set[int]] = defaultdict(set)
    for i, w in enumerate(words):
        for a, b in zip(w, w[1:]):
            pair_counts[(a, b)] += freqs[i]
            where[(a, b)].add(i)
    vocab = {s: i for i, s in enumerate(specials)}
    for b in range(256):
        vocab[B2U[b]] = len(vocab)
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size and pair_counts:
        best = max(pair_counts.items(), key=lambda kv: (kv[1], kv[0]))[0]
        if pair_counts[best] < 2:
            break
        merged = best[0] + best[1]
        merges.append(best)
        vocab[merged] = len(vocab)
        for i in list(where[best]):
            w, f = words[i], freqs[i]
            for a, b in zip(w, w[1:]):
                pair_counts[(a, b)] -= f
                if pair_counts[(a, b)] <= 0:
                    del pair_counts[(a, b)]
            j, nw = 0, []
            while j < len(w):
                if j + 1 < len(w) and w[j] == best[0] and w[j + 1] == best[1]:
                    nw.append(merged)
                    j += 2
                else:
                    nw.append(w[j])
                    j += 1
            words[i] = nw
            for a, b in zip(nw, nw[1:]):
                pair_counts[(a, b)] += f
                where[(a, b)].add(i)
        where.pop(best, None)
    return vocab, merges


class Encoder:
    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], specials: list[str]):
        self.vocab = vocab
        self.inv = {i: s for s, i in vocab.items()}
        self.ranks = {m: r for r, m in enumerate(merges)}
        self.specials = specials
        self.special_re = regex.compile("(" + "|".join(regex.escape(s) for s in specials) + ")")
        self.cache: dict[str, list[int]] = {}

    def _bpe(self, word: str) -> list[int]:
        hit = self.cache.get(word)
        if hit is not None:
            return hit
        parts = list(word)
        while len(parts) > 1:
            best, best_rank = -1, None
            for j in range(len(parts) - 1):
                r = self.ranks.get((parts[j], parts[j + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = j, r
            if best < 0:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        ids = [self.vocab[p] for p in parts]
        if len(self.cache) < 500_000:
            self.cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for chunk in self.special_re.split(text):
            if not chunk:
                continue
            if chunk in self.specials:
                out.append(self.vocab[chunk])
            else:
                for w in pretokenize(chunk):
                    out.extend(self._bpe(w))
        return out

    def decode(self, ids: list[int]) -> str:
        buf = bytearray()
        out = []
        for i in ids:
            s = self.inv[i]
            if s in self.specials:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                out.append(s)
            else:
                buf.extend(U2B[ch] for ch in s)
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


def tokenizer_json(vocab: dict[str, int], merges: list[tuple[str, str]], specials: list[str]) -> dict:
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": vocab[s], "content": s, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True} for s in specials],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]},
    }


def load(path: str) -> Encoder:
    with open(path, encoding="utf-8") as f:
        tj = json.load(f)
    specials = [t["content"] for t in tj["added_tokens"]]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in tj["model"]["merges"]]
    return Encoder(tj["model"]["vocab"], merges, specials)
