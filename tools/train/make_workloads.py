"""Write workloads/{summary,rag,ui,reply}.jsonl from held-out documents only (never trained on).

Each line: {"id", "task", "context", "prompt", "max_tokens", "reference"}; contexts are 300-1,500
tokens under the demo tokenizer. "reference" is the generator's own target answer, kept for
inspection; benchmarks compare methods against the model's greedy output, not against it.
"""
from __future__ import annotations

import argparse
import json
import os
import random

import bpe
import corpus
import tasks

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokenizer", default=os.path.join(HERE, "work", "tokenizer.json"))
    ap.add_argument("--out", default=os.path.join(HERE, "..", "..", "workloads"))
    ap.add_argument("--per-task", type=int, default=60)
    ap.add_argument("--seed", type=int, default=99)
    args = ap.parse_args()

    enc = bpe.load(args.tokenizer)
    docs = [d for d in corpus.all_documents() if corpus.split_of(d.doc_id) == "heldout"]
    factory = tasks.TaskFactory(docs, corpus.WordNet(), args.seed)
    rng = random.Random(args.seed)
    os.makedirs(args.out, exist_ok=True)
    max_tokens = {"summary": 160, "rag": 96, "ui": 48, "reply": 128}
    for task in tasks.TASKS:
        rows, tries = [], 0
        while len(rows) < args.per_task and tries < args.per_task * 50:
            tries += 1
            target = rng.choice([(1200, 2400), (2400, 4000), (4000, 6000)])
            context, prompt, reference = factory.make(task, *target)
            n = len(enc.encode(context))
            if not 300 <= n <= 1500:
                continue
            rows.append({"id": f"{task}-{len(rows):03d}", "task": task, "context": context, "prompt": prompt,
                         "max_tokens": max_tokens[task], "reference": reference, "context_tokens": n})
        with open(os.path.join(args.out, f"{task}.jsonl"), "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        lens = sorted(r["context_tokens"] for r in rows)
        print(f"{task}: {len(rows)} prompts, context tokens min {lens[0]} median {lens[len(lens) // 2]} max {lens[-1]}")


if __name__ == "__main__":
    main()
