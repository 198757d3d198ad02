"""Write workloads/chat.jsonl and workloads/rag-shared.jsonl: workloads whose prompts share prefixes.

Both are derived from the held-out contexts of workloads/{summary,rag,ui,reply}.jsonl (make_workloads.py
made those from held-out documents only), so they are held out from training like them.

chat.jsonl: conversations of 3-6 turns over one context each, the four task families in turn. The first
turn is the family's own request; later turns ask about a keyword found in one sentence of the context
(a UI screen: the next element to tap). Each row carries the history as the server renders a chat: the
context section holds the context, then "User: ..." and "Assistant: ..." lines of the turns before
(RequestParser.RenderChat), so turn t's prompt starts with turn t-1's context section. Keys beyond the
usual ones: "conversation", "turn".

rag-shared.jsonl: 4-8 questions about each of 12 retrieval contexts (key "document"), as apps ask
several questions about one document.

"reference" is the generator's answer (the history's assistant turns use it); benchmarks compare
cache on against cache off on the model's own output, not against it.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re

import bpe

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")

_STOP = set("""a an the and or but of to in on at by for with from as is are was were be been it its this that these those
he she they them his her their we us our you your i me my not no so if then than there here which who whom what when where
why how all any each some such unto upon shall will would should can could may might must have has had do does did about
into over under after before also only other more most very just like said says""".split())

_SENT = re.compile(r"(?<=[.!?])\s+")
_ELEMENT = re.compile(r'\{"id": "([^"]+)", "role": "[^"]+", "text": "([^"]+)"\}')


def load(name: str) -> list[dict]:
    with open(os.path.join(ROOT, "workloads", f"{name}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def keyword_questions(context: str, rng: random.Random, passages: bool) -> list[tuple[str, str]]:
    """(question, answer) pairs about keywords that occur in exactly one sentence of the context."""
    if passages:
        units = []
        for m in re.finditer(r"^\[(\d+)\] [^:\n]*: (.*)$", context, re.M):
            units += [(int(m.group(1)), s) for s in _SENT.split(m.group(2)) if len(s) > 30]
    else:
        units = [(0, s) for s in _SENT.split(context) if len(s) > 30]
    words = {}
    for i, (_, s) in enumerate(units):
        for w in set(re.findall(r"[A-Za-z]{5,}", s)):
            if w.lower() not in _STOP:
                words.setdefault(w.lower(), set()).add(i)
    unique = sorted((w, next(iter(ix))) for w, ix in words.items() if len(ix) == 1)
    rng.shuffle(unique)
    out, used = [], set()
    for w, i in unique:
        if i in used:
            continue
        used.add(i)
        passage, sentence = units[i]
        sentence = sentence[:240]
        if passages:
            q = rng.choice([f"What does the text say about {w}?", f"Which passage mentions {w}, and what does it say?", f"Find the part about {w}."])
            out.append((q, f"Passage [{passage}] says: {sentence}"))
        else:
            q = rng.choice([f"What does the text say about {w}?", f"Find the part about {w}.", f"And what about {w}?"])
            out.append((q, f"The text says: {sentence}"))
    return out


def ui_goals(context: str, rng: random.Random) -> list[tuple[str, str]]:
    elements = _ELEMENT.findall(context)
    rng.shuffle(elements)
    return [(f"Goal: tap {text}. What is the next action?", json.dumps({"action": "tap", "id": eid})) for eid, text in elements]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=os.path.join(ROOT, "models", "coordgen-demo", "tokenizer.json"))
    ap.add_argument("--out", default=os.path.join(ROOT, "workloads"))
    ap.add_argument("--conversations", type=int, default=20)
    ap.add_argument("--documents", type=int, default=12)
    ap.add_argument("--max-prompt-tokens", type=int, default=1700, help="no turn's prompt (history included) goes past this")
    ap.add_argument("--seed", type=int, default=1206)
    args = ap.parse_args()

    enc = bpe.load(args.tokenizer)
    rng = random.Random(args.seed)
    families = {t: load(t) for t in ("summary", "rag", "reply", "ui")}

    chat = []
    order = ["summary", "rag", "reply", "ui"]
    cursor = {t: 0 for t in order}
    c = 0
    while c < args.conversations:
        task = order[c % len(order)]
        items = families[task]
        item = items[cursor[task] % len(items)]
        cursor[task] += 1
        if item["context_tokens"] > 1100:
            continue
        follow = ui_goals(item["context"], rng) if task == "ui" else keyword_questions(item["context"], rng, passages=task == "rag")
        turns = [(item["prompt"], item["reference"])] + follow[: rng.randint(2, 5)]
        if len(turns) < 3:
            continue
        history = []
        rows = []
        for t, (question, answer) in enumerate(turns, start=1):
            context = "\n".join([item["context"]] + history)
            n = len(enc.encode(context))
            if n + 40 + item["max_tokens"] > args.max_prompt_tokens:
                break
            rows.append({"id": f"chat-{c:03d}-t{t}", "task": task, "conversation": f"chat-{c:03d}", "turn": t, "context": context,
                         "prompt": question, "max_tokens": item["max_tokens"], "reference": answer, "context_tokens": n})
            history += [f"User: {question}", f"Assistant: {answer}"]
        if len(rows) < 3:
            continue
        chat += rows
        c += 1

    shared = []
    docs = [r for r in families["rag"] if r["context_tokens"] <= 1500]
    rng.shuffle(docs)
    d = 0
    for item in docs:
        if d == args.documents:
            break
        qs = keyword_questions(item["context"], rng, passages=True)[: rng.randint(4, 8)]
        if len(qs) < 4:
            continue
        for q, (question, answer) in enumerate(qs):
            shared.append({"id": f"rag-shared-{d:02d}-q{q}", "task": "rag", "document": f"rag-shared-{d:02d}", "context": item["context"],
                           "prompt": question, "max_tokens": item["max_tokens"], "reference": answer, "context_tokens": item["context_tokens"]})
        d += 1

    for name, rows in (("chat", chat), ("rag-shared", shared)):
        with open(os.path.join(args.out, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        lens = sorted(r["context_tokens"] for r in rows)
        print(f"{name}: {len(rows)} prompts, context tokens min {lens[0]} median {lens[len(lens) // 2]} max {lens[-1]}")


if __name__ == "__main__":
    main()
