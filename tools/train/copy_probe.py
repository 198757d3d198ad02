"""Has the copy (induction) mechanism formed? Teacher-forced answer loss on held-out tasks and on
synthetic repeats of random token runs, from a training checkpoint.

A model that copies shows quote-answer loss far below 4 nats/token and repeat loss far below the
first occurrence's (about 8.3 nats for 4,096 tokens).

    /usr/bin/python3 copy_probe.py [--work tools/train/work]
"""
import argparse
import os
import random

import torch
import torch.nn.functional as F

import bpe
import corpus
import tasks
from train import Config, Llama

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=os.path.join(HERE, "work"))
    ap.add_argument("--checkpoint", default="checkpoint.pt", help="file name in --work (checkpoint-copy.pt for the copy stage)")
    args = ap.parse_args()
    ck = torch.load(os.path.join(args.work, args.checkpoint))
    state = ck["model"]
    hidden = state["embed_tokens.weight"].shape[1]
    layers = sum(1 for k in state if k.endswith("input_layernorm.weight"))
    inter = state["layers.0.gate_proj.weight"].shape[0]
    kv = state["layers.0.k_proj.weight"].shape[0]
    head_dim = 32
    cfg = Config(vocab_size=state["embed_tokens.weight"].shape[0], hidden_size=hidden, num_hidden_layers=layers,
                 num_attention_heads=hidden // head_dim, num_key_value_heads=kv // head_dim, intermediate_size=inter)
    model = Llama(cfg)
    model.load_state_dict(state)
    model.eval()
    enc = bpe.load(os.path.join(args.work, "tokenizer.json"))
    docs = [d for d in corpus.all_documents() if corpus.split_of(d.doc_id) == "heldout"]
    factory = tasks.TaskFactory(docs, corpus.WordNet(), 5)
    print(f"checkpoint step {ck['step']}, {ck['tokens_seen']:,} tokens")
    for kind in ("quote", "summary", "rag"):
        losses = []
        for _ in range(8):
            c, p, r = factory.make(kind, 300, 1200)
            head, tail = enc.encode(tasks.render(c, p)), enc.encode(r + "<|end|>")
            ids = torch.tensor([head + tail])
            with torch.no_grad():
                ce = F.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:], reduction="none")
            losses.append(ce[len(head) - 1:].mean().item())
        print(f"{kind:8s} answer loss {sum(losses) / len(losses):.2f} nats/token")
    rng = random.Random(1)
    first, rest = [], []
    for _ in range(8):
        seg = [rng.randrange(len(tasks.SPECIAL_TOKENS), cfg.vocab_size) for _ in range(30)]
        ids = torch.tensor([seg * 3])
        with torch.no_grad():
            ce = F.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:], reduction="none")
        first.append(ce[:29].mean().item())
        rest.append(ce[30:].mean().item())
    print(f"random repeats: first occurrence {sum(first) / 8:.2f}, repeats {sum(rest) / 8:.2f} nats/token")


if __name__ == "__main__":
    main()
