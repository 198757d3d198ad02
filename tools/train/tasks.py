"""Context-grounded examples in the paper's four task families, and the prompt template.

The template is the contract between training and the engine (docs/templates.md, and
CoordGen.Engine's PromptTemplate): one special token per role, the context first.

    <|context|>\n{context}\n<|user|>\n{prompt}\n<|assistant|>\n{response}<|end|>

Drift: responses copy from the context with the lexical drift real models show: WordNet synonyms
(one fixed synonym per word, so the drift is a learnable function), dropped modifiers, swapped
clauses and truncated sentences.
"""
from __future__ import annotations

import json
import random
import re

from corpus import Document, WordNet

SPECIAL_TOKENS = ["<|end|>", "<|context|>", "<|user|>", "<|assistant|>", "<|pad|>"]
TASKS = ("summary", "rag", "ui", "reply")
# Training-only family: quote a located span verbatim. It teaches the copy mechanism (induction) fast;
# the four task families above then teach when and how to drift.
TRAIN_ONLY_TASKS = ("quote",)


def render(context: str, prompt: str, response: str | None = None) -> str:
    head = f"<|context|>\n{context}\n<|user|>\n{prompt}\n<|assistant|>\n"
    return head if response is None else head + response + "<|end|>"


_STOP = set("""a an the and or but of to in on at by for with from as is are was were be been it its this that these those
he she they them his her their we us our you your i me my not no so if then than there here which who whom what when where
why how all any each some such unto upon shall will would should can could may might must have has had do does did""".split())

_WORD = re.compile(r"[A-Za-z]+|[^A-Za-z]+")


def good_sentence(s: str) -> bool:
    if len(s) < 20 or len(s) > 400 or "+--" in s or "===" in s or "|" in s:
        return False
    letters = sum(ch.isalpha() or ch == " " for ch in s)
    return letters / len(s) > 0.8


class Drifter:
    def __init__(self, wn: WordNet, rng: random.Random):
        self.wn = wn
        self.rng = rng

    def reword(self, sentence: str, p_syn: float, p_drop: float, p_swap: float) -> str:
        rng = self.rng
        s = sentence
        if rng.random() < p_swap:
            parts = re.split(r",\s+", s.rstrip("."), maxsplit=1)
            if len(parts) == 2 and 3 <= len(parts[0].split()) and 3 <= len(parts[1].split()):
                a, b = parts
                s = b[0].upper() + b[1:] + ", " + a[0].lower() + a[1:] + "."
        out = []
        for tok in _WORD.findall(s):
            low = tok.lower()
            if tok.isalpha() and low not in _STOP and len(low) > 3:
                if self.wn.is_modifier(low) and rng.random() < p_drop:
                    if out and out[-1] == " ":
                        out.pop()
                    continue
                syn = self.wn.synonym.get(low)
                if syn and rng.random() < p_syn:
                    tok = syn.capitalize() if tok[0].isupper() else syn
            out.append(tok)
        s = "".join(out)
        s = re.sub(r"\s+", " ", s).strip()
        if rng.random() < 0.15:
            cut = s.find(", ", len(s) // 3)
            if cut > 0:
                s = s[:cut] + "."
        return s


def _take_sentences(doc: Document, rng: random.Random, lo_chars: int, hi_chars: int) -> list[str]:
    sents = [s for s in doc.sentences if good_sentence(s)]
    if not sents:
        return []
    target = rng.randint(lo_chars, hi_chars)
    start = rng.randrange(max(1, len(sents) - 3))
    out, n = [], 0
    for s in sents[start:]:
        if n >= target:
            break
        out.append(s)
        n += len(s) + 1
    return out


def summary_example(doc: Document, d: Drifter, rng: random.Random, lo: int, hi: int):
    sents = _take_sentences(doc, rng, lo, hi)
    if len(sents) < 4:
        return None
    k = max(2, min(6, len(sents) // 4))
    picks = sorted(rng.sample(range(len(sents)), k))
    if 0 not in picks and rng.random() < 0.6:
        picks = [0] + picks[:-1]
    summary = " ".join(d.reword(sents[i], 0.12, 0.5, 0.3) for i in picks)
    prompt = rng.choice(["Summarize the document.", "Write a short summary of the document above.", "Summarize this."])
    context = f"Title: {doc.title}\n" + " ".join(sents)
    return context, prompt, summary


def rag_example(docs: list[Document], d: Drifter, rng: random.Random, lo: int, hi: int):
    n = rng.randint(3, 6)
    chosen = rng.sample(docs, n)
    per = max(120, rng.randint(lo, hi) // n)
    passages = []
    for doc in chosen:
        s = _take_sentences(doc, rng, per // 2, per)
        if s:
            passages.append((doc.title, s))
    if len(passages) < 2:
        return None
    which = rng.randrange(len(passages))
    title, sents = passages[which]
    target = rng.choice(sents)
    others = " ".join(" ".join(s) for i, (_, s) in enumerate(passages) if i != which).lower()
    cands = [w for w in re.findall(r"[A-Za-z]{5,}", target) if w.lower() not in _STOP and w.lower() not in others]
    if not cands:
        return None
    key = rng.choice(cands)
    context = "\n".join(f"[{i + 1}] {t}: {' '.join(s)}" for i, (t, s) in enumerate(passages))
    prompt = rng.choice([f"What does the text say about {key}?", f"Which passage mentions {key}, and what does it say?",
                         f"Find the part about {key}."])
    answer = f"Passage [{which + 1}] says: " + d.reword(target, 0.08, 0.3, 0.2)
    return context, prompt, answer


_APPS = ["Messages", "Mail", "Settings", "Calendar", "Notes", "Music", "Photos", "Maps", "Shop", "Bank", "Weather", "Files"]
_ROLES = ["button", "text_field", "switch", "label", "list_item", "tab", "checkbox", "link"]


def ui_example(words: list[str], sentences: list[str], rng: random.Random, lo: int, hi: int):
    app = rng.choice(_APPS)
    target_chars = rng.randint(lo, hi)
    elements, used = [], set()
    prefix = {"button": "btn", "text_field": "field", "switch": "sw", "label": "lbl", "list_item": "item",
              "tab": "tab", "checkbox": "chk", "link": "link"}
    size = 0
    while size < target_chars or len(elements) < 6:
        role = rng.choice(_ROLES)
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 3))).capitalize()
        if text in used:
            continue
        used.add(text)
        el = {"id": f"{prefix[role]}_{rng.randint(1, 999)}", "role": role, "text": text}
        elements.append(el)
        size += len(json.dumps(el)) + 2
    actionable = [e for e in elements if e["role"] in ("button", "text_field", "switch", "list_item", "tab", "checkbox", "link")]
    if len(actionable) < 3:
        return None
    steps = []
    for e in rng.sample(actionable, rng.randint(2, min(5, len(actionable)))):
        if e["role"] == "text_field":
            phrase = " ".join(rng.choice(sentences).split()[:rng.randint(2, 7)]).rstrip(",.;:")
            steps.append({"action": "type", "id": e["id"], "text": phrase, "_target": e["text"]})
        else:
            steps.append({"action": "tap", "id": e["id"], "_target": e["text"]})
    done = rng.randint(0, len(steps) - 1)
    screen = {"app": app, "screen": rng.choice(words).capitalize(), "elements": elements}
    history = [{k: v for k, v in s.items() if not k.startswith("_")} for s in steps[:done]]
    goal = "; ".join(
        f"type \"{s['text']}\" into {s['_target']}" if s["action"] == "type" else f"tap {s['_target']}" for s in steps)
    context = "Screen: " + json.dumps(screen) + "\nHistory: " + json.dumps(history)
    prompt = f"Goal: {goal}. What is the next action?"
    nxt = {k: v for k, v in steps[done].items() if not k.startswith("_")}
    return context, prompt, json.dumps(nxt)


_GREET = ["Hi", "Hey", "Hello", "Morning", "Hiya", "Dear friend", "Yo", "Good evening"]
_SIGN = ["Cheers", "Take care", "Talk soon", "Best", "Love", "See you", "Thanks again", "Later"]
_NAMES = ["Alice", "Bob", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena", "Mateo",
          "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara"]


def reply_example(sentences: list[str], d: Drifter, rng: random.Random, lo: int, hi: int):
    me, other = rng.sample(_NAMES, 2)
    greet, sign = rng.choice(_GREET), rng.choice(_SIGN)
    habits = [" ".join(rng.choice(sentences).split()[:rng.randint(3, 6)]).rstrip(",.;:") for _ in range(3)]
    target = rng.randint(lo, hi)
    msgs, size = [], 0
    while size < target:
        body = rng.choice(sentences)
        if rng.random() < 0.5:
            body = rng.choice(habits) + ", " + body[0].lower() + body[1:]
        m = f"{me}: {greet} {other}, {body} {sign}, {me}"
        msgs.append(m)
        size += len(m) + 1
    incoming = f"{other}: " + rng.choice(sentences)
    reused = rng.choice(msgs).split(", ", 1)[1].rsplit(f" {sign}", 1)[0]
    reply = f"{greet} {other}, {rng.choice(habits)}. " + d.reword(reused, 0.1, 0.4, 0.2) + f" {sign}, {me}"
    context = f"Past messages from {me}:\n" + "\n".join(msgs) + f"\nNew message:\n{incoming}"
    prompt = f"Write {me}'s reply in their usual style."
    return context, prompt, reply


def quote_example(doc: Document, rng: random.Random, lo: int, hi: int):
    sents = _take_sentences(doc, rng, lo, hi)
    if len(sents) < 3:
        return None
    k = rng.randint(1, min(4, len(sents) - 1))
    start = rng.randrange(len(sents) - k + 1)
    lead = " ".join(sents[start].split()[:4])
    prompt = rng.choice([f'Quote the part that begins with "{lead}".', f'Copy the text starting at "{lead}".'])
    context = f"Title: {doc.title}\n" + " ".join(sents)
    return context, prompt, " ".join(sents[start:start + k])


class TaskFactory:
    """Builds examples from a list of documents (one split only)."""

    def __init__(self, docs: list[Document], wn: WordNet, seed: int):
        self.docs = docs
        self.rng = random.Random(seed)
        self.drift = Drifter(wn, self.rng)
        self.sentences = [s for doc in docs for s in doc.sentences if good_sentence(s) and len(s) < 160]
        self.words = sorted({w.lower() for s in self.sentences[:20000] for w in re.findall(r"[A-Za-z]{4,10}", s)})

    def make(self, task: str, lo: int, hi: int):
        rng = self.rng
        for _ in range(20):
            if task == "summary":
                r = summary_example(rng.choice(self.docs), self.drift, rng, lo, hi)
            elif task == "rag":
                r = rag_example(self.docs, self.drift, rng, lo, hi)
            elif task == "ui":
                r = ui_example(self.words, self.sentences, rng, lo, hi)
            elif task == "quote":
                r = quote_example(rng.choice(self.docs), rng, lo, hi)
            else:
                r = reply_example(self.sentences, self.drift, rng, lo, hi)
            if r is not None:
                return r
        raise RuntimeError(f"could not build a {task} example")

    def plain(self, lo: int, hi: int) -> str:
        doc = self.rng.choice(self.docs)
        sents = _take_sentences(doc, self.rng, lo, hi) or doc.sentences[:8]
        return f"{doc.title}\n" + " ".join(sents) + "<|end|>"
