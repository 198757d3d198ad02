"""Corpus assembly from licence-clean text that this machine's Debian packages provide.

Sources (see tools/train/README.md for the licence record):
  * bible-kjv-text  - King James Version, public domain, read with the `bible` program (package bible-kjv)
  * python3.11-doc  - Python documentation sources (reStructuredText), PSF licence
  * wordnet-base    - WordNet 3.0 glosses and synonym sets, WordNet licence (permissive, BSD-like)

Every document gets a stable id; `split_of(doc_id)` puts about 8% of documents in the held-out split,
which feeds only workloads/ and evaluation, never training.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import subprocess
from dataclasses import dataclass, field

PYDOC_DIR = "/usr/share/doc/python3.11/html/_sources"
WORDNET_DIR = "/usr/share/wordnet"


@dataclass
class Document:
    doc_id: str
    source: str
    title: str
    sentences: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(self.sentences)


def split_of(doc_id: str) -> str:
    h = int(hashlib.sha1(doc_id.encode()).hexdigest()[:8], 16)
    return "heldout" if h % 100 < 8 else "train"


_SENT = re.compile(r"(?<=[.!?;])\s+(?=[A-Z(\"'])")


def split_sentences(text: str) -> list[str]:
    out = []
    for s in _SENT.split(text):
        s = s.strip()
        if len(s) > 2:
            out.append(s)
    return out


def kjv_documents() -> list[Document]:
    raw = subprocess.run(["bible", "-l100000", "Ge1:1-Re22:21"], capture_output=True, text=True, check=True).stdout
    docs: list[Document] = []
    cur: Document | None = None
    for line in raw.splitlines():
        if not line.strip():
            continue
        m = re.match(r"^\s+(\d+) (.*)$", line)
        if m and cur is not None:
            cur.sentences.extend(split_sentences(m.group(2)))
        else:
            title = line.strip()
            cur = Document(f"kjv:{title}", "kjv", title)
            docs.append(cur)
    return [d for d in docs if len(d.sentences) >= 4]


_ROLE = re.compile(r":[a-z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_+")
_LIT = re.compile(r"``([^`]+)``")
_EMPH = re.compile(r"\*\*?([^*]+)\*\*?")


def _clean_rst(text: str) -> str:
    text = _ROLE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _LIT.sub(r"\1", text)
    text = _EMPH.sub(r"\1", text)
    text = text.replace("`", "")
    return re.sub(r"\s+", " ", text).strip()


def pydoc_documents() -> list[Document]:
    docs: list[Document] = []
    files = sorted(glob.glob(os.path.join(PYDOC_DIR, "**", "*.rst.txt"), recursive=True))
    for path in files:
        rel = os.path.relpath(path, PYDOC_DIR)
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
        section_title = rel
        paras: list[str] = []
        buf: list[str] = []
        in_block = False
        sections: list[tuple[str, list[str]]] = []

        def flush_para():
            if buf:
                p = _clean_rst(" ".join(buf))
                if len(p) > 40 and not p.startswith(">>>"):
                    paras.append(p)
                buf.clear()

        for i, line in enumerate(lines):
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            if re.match(r"^[=\-~^*#]{4,}\s*$", nxt) and line.strip() and not line.startswith(" "):
                flush_para()
                if paras:
                    sections.append((section_title, paras))
                    paras = []
                section_title = _clean_rst(line)
                continue
            if re.match(r"^[=\-~^*#]{4,}\s*$", line):
                continue
            if in_block:
                if line.strip() == "" or line.startswith(" ") or line.startswith("\t"):
                    continue
                in_block = False
            if line.startswith(".. ") or line.startswith("   :"):
                flush_para()
                in_block = True
                continue
            if line.strip() == "":
                flush_para()
                continue
            if line.startswith("    ") or line.startswith("\t") or line.lstrip().startswith(">>>"):
                flush_para()
                continue
            buf.append(line.strip())
            if line.rstrip().endswith("::"):
                flush_para()
                in_block = True
        flush_para()
        if paras:
            sections.append((section_title, paras))
        for k, (title, ps) in enumerate(sections):
            sents = []
            for p in ps:
                sents.extend(split_sentences(p.replace("::", ":")))
            if len(sents) >= 4:
                docs.append(Document(f"pydoc:{rel}#{k}", "pydoc", title, sents))
    return docs


class WordNet:
    """Synonyms, part-of-speech sets and glosses read from WordNet's data files."""

    def __init__(self, root: str = WORDNET_DIR):
        self.synonym: dict[str, str] = {}
        self.pos: dict[str, set[str]] = {}
        self.glosses: list[tuple[str, str]] = []
        offsets: dict[tuple[str, str], list[str]] = {}
        for pos, tag in (("noun", "n"), ("verb", "v"), ("adj", "a"), ("adv", "r")):
            with open(os.path.join(root, f"data.{pos}"), encoding="latin-1") as f:
                for line in f:
                    if line.startswith("  "):
                        continue
                    head, _, gloss = line.partition("|")
                    parts = head.split()
                    off, wcnt = parts[0], int(parts[3], 16)
                    words = [parts[4 + 2 * i].lower() for i in range(wcnt)]
                    offsets[(tag, off)] = words
                    g = gloss.strip().split(";")[0].strip()
                    if words and g and "_" not in words[0]:
                        self.glosses.append((words[0].replace("(a)", "").replace("(p)", ""), g))
            with open(os.path.join(root, f"index.{pos}"), encoding="latin-1") as f:
                for line in f:
                    if line.startswith("  "):
                        continue
                    parts = line.split()
                    lemma = parts[0]
                    self.pos.setdefault(lemma, set()).add(tag)
                    if "_" in lemma or lemma in self.synonym:
                        continue
                    p_cnt = int(parts[3])
                    synset_cnt = int(parts[2])
                    first = parts[4 + p_cnt + 2]  # first (most frequent) sense
                    for w in offsets.get((tag, first), []):
                        w = re.sub(r"\(.*\)$", "", w)
                        if w != lemma and "_" not in w and w.isalpha() and synset_cnt >= 1:
                            self.synonym[lemma] = w
                            break

    def is_modifier(self, word: str) -> bool:
        tags = self.pos.get(word.lower())
        return bool(tags) and tags <= {"a", "r", "s"}


def all_documents() -> list[Document]:
    return kjv_documents() + pydoc_documents()
