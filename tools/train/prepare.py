"""Build the corpus, train the tokenizer and write tokenized training streams.

Outputs under --work (default tools/train/work, not committed):
  tokenizer.json
  train_<seq>.bin / train_<seq>.w.bin  packed uint16 token rows and per-token loss weights (uint8)
  val_<seq>.bin / val_<seq>.w.bin      held-out rows for the validation loss
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time

import numpy as np

import bpe
import corpus
import tasks

# Task mixes, by example count. Mix B (used after train.py's --switch-step) adds verbatim quoting,
# which makes the copy mechanism form quickly; see README.md.
MIX = [("summary", 0.26), ("rag", 0.26), ("ui", 0.14), ("reply", 0.14), ("plain", 0.20)]
MIX_B = [("summary", 0.22), ("rag", 0.22), ("ui", 0.11), ("reply", 0.11), ("quote", 0.24), ("plain", 0.10)]
# Mix C (after --switch-step-c) adds synthetic repeats of random token runs: the only way to predict
# them is to copy, which is what forms induction heads quickly in small models.
MIX_C = [("summary", 0.18), ("rag", 0.18), ("ui", 0.08), ("reply", 0.08), ("quote", 0.20), ("repeat", 0.20), ("plain", 0.08)]
# Mix D: mostly repeats, to push the copy mechanism over its phase change.
MIX_D = [("summary", 0.12), ("rag", 0.12), ("ui", 0.04), ("reply", 0.04), ("quote", 0.20), ("repeat", 0.45), ("plain", 0.03)]
# Mix E (stage 4, long contexts): the task families at 2048-token rows, rag and summary first. After stage
# 3 the model copied from short contexts (rag: 55% of output 4-grams on 300-1,400-character contexts)
# but much less from the workloads' long ones (30%): it had seen few long rows.
MIX_E = [("summary", 0.3), ("rag", 0.4), ("ui", 0.1), ("reply", 0.1), ("plain", 0.1)]
RESPONSE_WEIGHT = 2  # response tokens count twice in the loss: copying is what the model is for


def build_rows(factory: tasks.TaskFactory, enc: bpe.Encoder, n_tokens: int, seq: int, lo: int, hi: int,
               rng: random.Random, label: str, mix=MIX):
    end_id = enc.vocab["<|end|>"]
    names = [m[0] for m in mix]
    weights = [m[1] for m in mix]
    toks: list[int] = []
    wts: list[int] = []
    t0 = time.time()
    while len(toks) < n_tokens:
        kind = rng.choices(names, weights)[0]
        if kind == "plain":
            ids = enc.encode(factory.plain(lo // 2, hi))
            w = [1] * len(ids)
        elif kind == "repeat":
            seg = [rng.randrange(len(tasks.SPECIAL_TOKENS), len(enc.vocab)) for _ in range(rng.randint(8, 48))]
            k = rng.randint(2, 4)
            ids = seg * k + [end_id]
            w = [1] * len(seg) + [RESPONSE_WEIGHT] * (len(ids) - len(seg))
        else:
            c, p, r = factory.make(kind, lo, hi)
            head = enc.encode(tasks.render(c, p))
            tail = enc.encode(r + "<|end|>")
            ids = head + tail
            w = [1] * len(head) + [RESPONSE_WEIGHT] * len(tail)
        if len(ids) > seq:
            continue
        toks.extend(ids)
        wts.extend(w)
        if len(toks) % 200_000 < len(ids):
            print(f"  {label}: {len(toks):,}/{n_tokens:,} tokens ({time.time() - t0:.0f}s)", flush=True)
    n_rows = len(toks) // seq
    arr = np.array(toks[: n_rows * seq], dtype=np.uint16).reshape(n_rows, seq)
    warr = np.array(wts[: n_rows * seq], dtype=np.uint8).reshape(n_rows, seq)
    assert arr.max() < 65535 and end_id >= 0
    return arr, warr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", default=os.path.join(os.path.dirname(__file__), "work"))
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--short-tokens", type=int, default=6_000_000, help="tokens of 512-token rows (phase 1)")
    ap.add_argument("--long-tokens", type=int, default=3_000_000, help="tokens of 2048-token rows (phase 2)")
    ap.add_argument("--short-b-tokens", type=int, default=5_000_000, help="tokens of 512-token rows with mix B (phase 1b)")
    ap.add_argument("--short-c-tokens", type=int, default=6_000_000, help="tokens of 512-token rows with mix C (phase 1c)")
    ap.add_argument("--short-d-tokens", type=int, default=2_000_000, help="tokens of 512-token rows with mix D")
    ap.add_argument("--short-e-tokens", type=int, default=200_000, help="tokens of 512-token rows with mix E (stage 4)")
    ap.add_argument("--long-e-tokens", type=int, default=700_000, help="tokens of 2048-token rows with mix E (stage 4)")
    ap.add_argument("--only", default="", help="comma-separated row sets to (re)build, keeping work/tokenizer.json")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    rng = random.Random(args.seed)

    t0 = time.time()
    docs = corpus.all_documents()
    train_docs = [d for d in docs if corpus.split_of(d.doc_id) == "train"]
    wn = corpus.WordNet()
    print(f"corpus: {len(docs)} documents, {len(train_docs)} for training ({time.time() - t0:.0f}s)", flush=True)

    factory = tasks.TaskFactory(train_docs, wn, args.seed)
    if args.only and os.path.exists(os.path.join(args.work, "tokenizer.json")):
        enc = bpe.load(os.path.join(args.work, "tokenizer.json"))
        build_sets(args, factory, enc, docs, wn, rng)
        return
    sample = [d.text for d in rng.sample(train_docs, 600)]
    for kind in tasks.TASKS:
        for _ in range(150):
            c, p, r = factory.make(kind, 400, 3000)
            sample.append(tasks.render(c, p, r))
    sample.extend(f"{w}: {g}" for w, g in rng.sample(wn.glosses, 3000))
    vocab, merges = bpe.train(sample, args.vocab, tasks.SPECIAL_TOKENS)
    tj = bpe.tokenizer_json(vocab, merges, tasks.SPECIAL_TOKENS)
    with open(os.path.join(args.work, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False)
    print(f"tokenizer: {len(vocab)} tokens, {len(merges)} merges ({time.time() - t0:.0f}s)", flush=True)
    enc = bpe.Encoder(vocab, merges, tasks.SPECIAL_TOKENS)

    build_sets(args, factory, enc, docs, wn, rng)


def build_sets(args, factory, enc, docs, wn, rng) -> None:
    t0 = time.time()
    val_docs = [d for d in docs if corpus.split_of(d.doc_id) == "heldout"]
    val_factory = tasks.TaskFactory(val_docs, wn, args.seed + 1)
    plans = [("train_512", factory, args.short_tokens, 512, 300, 1400, MIX),
             ("train_2048", factory, args.long_tokens, 2048, 1200, 6000, MIX),
             ("val_512", val_factory, 100_000, 512, 300, 1400, MIX),
             ("val_2048", val_factory, 200_000, 2048, 1200, 6000, MIX),
             ("train_512b", factory, args.short_b_tokens, 512, 300, 1400, MIX_B),
             ("train_512c", factory, args.short_c_tokens, 512, 300, 1400, MIX_C),
             ("train_512d", factory, args.short_d_tokens, 512, 300, 1400, MIX_D),
             ("train_512e", factory, args.short_e_tokens, 512, 300, 1400, MIX_E),
             ("train_2048e", factory, args.long_e_tokens, 2048, 1200, 6000, MIX_E)]
    for name, fac, n, seq, lo, hi, mix in plans:
        if args.only and name not in args.only.split(","):
            continue
        set_rng = rng
        if name in ("train_512b", "train_512c", "train_512d", "train_512e", "train_2048e"):
            # Own seeded streams, so rebuilding only this set (--only) gives the same rows as a full run.
            offset = {"train_512b": 7, "train_512c": 11, "train_512d": 13, "train_512e": 17, "train_2048e": 19}[name]
            fac = tasks.TaskFactory(fac.docs, wn, args.seed + offset)
            set_rng = random.Random(args.seed + offset)
        arr, warr = build_rows(fac, enc, n, seq, lo, hi, set_rng, name, mix)
        arr.tofile(os.path.join(args.work, f"{name}.bin"))
        warr.tofile(os.path.join(args.work, f"{name}.w.bin"))
        print(f"{name}: {arr.shape[0]} rows x {seq} ({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
