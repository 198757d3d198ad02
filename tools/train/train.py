"""Train the coordgen-demo Llama model on the prepared streams and export it in the Hugging Face layout.

Two phases: 512-token rows first (cheap, where copying is learned), then 2048-token rows so the model
handles the benchmark's 1,500-token prompts. Checkpoints every --ckpt-every steps; a rerun resumes from
the newest. Seeded: the same command retrains the same model.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import struct
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Config:
    def __init__(self, **kw):
        self.vocab_size = kw.get("vocab_size", 4096)
        self.hidden_size = kw.get("hidden_size", 256)
        self.intermediate_size = kw.get("intermediate_size", 704)
        self.num_hidden_layers = kw.get("num_hidden_layers", 8)
        self.num_attention_heads = kw.get("num_attention_heads", 8)
        self.num_key_value_heads = kw.get("num_key_value_heads", 2)
        self.rms_norm_eps = kw.get("rms_norm_eps", 1e-5)
        self.rope_theta = kw.get("rope_theta", 10000.0)
        self.max_position_embeddings = kw.get("max_position_embeddings", 4096)
        self.head_dim = self.hidden_size // self.num_attention_heads

    def hf(self, bos: int, eos: int) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings, "tie_word_embeddings": True,
            "hidden_act": "silu", "bos_token_id": bos, "eos_token_id": eos, "torch_dtype": "float16",
        }


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, cos, sin):
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    return x * cos + rot * sin


class Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        d, hd = c.hidden_size, c.head_dim
        self.c = c
        self.input_layernorm = RMSNorm(d, c.rms_norm_eps)
        self.q_proj = nn.Linear(d, c.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, c.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, c.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * hd, d, bias=False)
        self.post_attention_layernorm = RMSNorm(d, c.rms_norm_eps)
        self.gate_proj = nn.Linear(d, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, d, bias=False)

    def forward(self, x, cos, sin, mask):
        c = self.c
        b, t, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(b, t, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        g = c.num_attention_heads // c.num_key_value_heads
        k = k.repeat_interleave(g, dim=1)
        v = v.repeat_interleave(g, dim=1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(c.head_dim) + mask
        y = torch.softmax(att, dim=-1) @ v
        x = x + self.o_proj(y.transpose(1, 2).reshape(b, t, -1))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Llama(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.normal_(self.embed_tokens.weight, std=0.02)
        for blk in self.layers:
            nn.init.normal_(blk.o_proj.weight, std=0.02 / math.sqrt(2 * c.num_hidden_layers))
            nn.init.normal_(blk.down_proj.weight, std=0.02 / math.sqrt(2 * c.num_hidden_layers))

    def forward(self, ids, positions=None):
        b, t = ids.shape
        if positions is None:
            positions = torch.arange(t).unsqueeze(0)
        inv = 1.0 / (self.c.rope_theta ** (torch.arange(0, self.c.head_dim, 2).float() / self.c.head_dim))
        freqs = positions.float().unsqueeze(-1) * inv
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)
        mask = torch.full((t, t), float("-inf")).triu(1)
        x = self.embed_tokens(ids)
        for blk in self.layers:
            x = blk(x, cos, sin, mask)
        return self.norm(x) @ self.embed_tokens.weight.T

    def hf_state(self) -> dict[str, torch.Tensor]:
        out = {"model.embed_tokens.weight": self.embed_tokens.weight, "model.norm.weight": self.norm.weight}
        for i, blk in enumerate(self.layers):
            p = f"model.layers.{i}."
            out[p + "input_layernorm.weight"] = blk.input_layernorm.weight
            out[p + "post_attention_layernorm.weight"] = blk.post_attention_layernorm.weight
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out[p + f"self_attn.{n}.weight"] = getattr(blk, n).weight
            for n in ("gate_proj", "up_proj", "down_proj"):
                out[p + f"mlp.{n}.weight"] = getattr(blk, n).weight
        return out


def save_safetensors(path: str, tensors: dict[str, torch.Tensor], dtype=torch.float16) -> None:
    names = sorted(tensors)
    header, blobs, off = {}, [], 0
    code = {torch.float16: "F16", torch.float32: "F32"}[dtype]
    for n in names:
        arr = tensors[n].detach().to(dtype).contiguous().numpy()
        b = arr.tobytes()
        header[n] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    header["__metadata__"] = {"format": "pt"}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for b in blobs:
            f.write(b)


SPECIALS = 5  # <|end|> <|context|> <|user|> <|assistant|> <|pad|> come first in the vocabulary


def synthetic_row(rng, natural, seq: int, vocab: int):
    """One row of packed copy examples: a span (random tokens, or a window of a corpus row), then one to
    three repeats of it, then <|end|>. Only the repeats carry loss: the first occurrence is unpredictable
    noise for random spans, and learning it would flatten the model's output distribution."""
    toks, wts = [], []
    while len(toks) < seq:
        n = int(rng.integers(6, 64))
        if rng.random() < 0.5:
            span = rng.integers(SPECIALS, vocab, n).tolist()
        else:
            src = natural[int(rng.integers(len(natural)))]
            i = int(rng.integers(0, len(src) - n))
            span = [t for t in src[i:i + n].tolist() if t >= SPECIALS] or [SPECIALS]
        k = int(rng.integers(1, 4))
        toks += span * (k + 1) + [0]
        wts += [0] * len(span) + [2] * (len(span) * k) + [1]
    return np.array(toks[:seq], dtype=np.uint16), np.array(wts[:seq], dtype=np.uint8)


def load_hf(model, path: str) -> None:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    dt = {"F16": np.float16, "F32": np.float32}
    state = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        state[name] = torch.from_numpy(np.frombuffer(data[a:b], dtype=dt[t["dtype"]]).reshape(t["shape"]).astype(np.float32))
    own = model.hf_state()
    missing = set(own) - set(state)
    if missing:
        raise SystemExit(f"{path} lacks {sorted(missing)[:3]}...")
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(state[name])


def load_rows(work: str, name: str, seq: int):
    a = np.fromfile(os.path.join(work, f"{name}.bin"), dtype=np.uint16).reshape(-1, seq)
    w = np.fromfile(os.path.join(work, f"{name}.w.bin"), dtype=np.uint8).reshape(-1, seq)
    return a, w


def batch_loss(model, rows, wts):
    x = torch.from_numpy(rows.astype(np.int64))
    w = torch.from_numpy(wts.astype(np.float32))[:, 1:]
    logits = model(x[:, :-1])
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
    return (ce * w.reshape(-1)).sum() / w.sum()


@torch.no_grad()
def evaluate(model, rows, wts, bs):
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, len(rows), bs):
        x = torch.from_numpy(rows[i:i + bs].astype(np.int64))
        logits = model(x[:, :-1])
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        tot += ce.item()
        n += x[:, 1:].numel()
    model.train()
    return tot / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--work", default=os.path.join(here, "work"))
    ap.add_argument("--out", default=os.path.join(here, "..", "..", "models", "coordgen-demo"))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--steps-short", type=int, default=1900, help="optimizer steps on 512-token rows")
    ap.add_argument("--steps-long", type=int, default=110, help="optimizer steps on 2048-token rows")
    ap.add_argument("--phases", default="0:train_512,600:train_512b,800:train_512c,1000:train_512d,1400:train_512c",
                    help="which 512-token row set each stretch of steps reads, as STEP:SET,... (see prepare.py's mixes)")
    ap.add_argument("--batch-short", type=int, default=8)
    ap.add_argument("--batch-long", type=int, default=1)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--ckpt-every", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--bench", action="store_true", help="time a few steps of each phase and exit")
    ap.add_argument("--export-only", action="store_true", help="export the newest checkpoint to --out and exit")
    ap.add_argument("--init-from", default="", help="start from an exported model directory (model.safetensors) "
                    "instead of random weights; steps count from 0 with a fresh optimizer")
    ap.add_argument("--synthetic", type=float, default=0.0,
                    help="share of each short batch replaced by synthetic copy rows made on the fly (spans of "
                         "random tokens or of corpus text, then repeated): the signal that forms induction heads")
    ap.add_argument("--long-set", default="train_2048", help="row set of the 2048-token steps")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--stop-at", type=int, default=0, help="checkpoint and exit (no export) at this step; a later "
                    "run with other --steps-* resumes from it")
    ap.add_argument("--run-name", default="", help="suffix of this run's checkpoint and log files in --work "
                    "(checkpoint-NAME.pt, log-NAME.jsonl), so a second stage does not resume the first")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(os.cpu_count() or 2)
    cfg = Config(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                 num_key_value_heads=args.kv_heads, intermediate_size=args.ffn)
    model = Llama(cfg)
    if args.init_from:
        load_hf(model, os.path.join(args.init_from, "model.safetensors"))
        print(f"initialised from {args.init_from}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params:,}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    phases = [(int(a), b) for a, b in (p.split(":") for p in args.phases.split(","))]
    sets = {name: load_rows(args.work, name, 512) for _, name in phases}
    long, long_w = load_rows(args.work, args.long_set, 2048)
    vshort, vshort_w = load_rows(args.work, "val_512", 512)
    vlong, vlong_w = load_rows(args.work, "val_2048", 2048)
    total = args.steps_short + args.steps_long

    if args.bench:
        for name, rows, ws, bs in (("short", *sets["train_512"], args.batch_short), ("long", long, long_w, args.batch_long)):
            t = time.time()
            for i in range(3):
                loss = batch_loss(model, rows[i * bs:(i + 1) * bs], ws[i * bs:(i + 1) * bs])
                loss.backward()
                opt.step()
                opt.zero_grad()
            dt = (time.time() - t) / 3
            print(f"{name}: {dt:.2f}s/step, {bs * rows.shape[1] / dt:.0f} tokens/s", flush=True)
        return

    suffix = f"-{args.run_name}" if args.run_name else ""
    ckpt_path = os.path.join(args.work, f"checkpoint{suffix}.pt")
    if args.export_only:
        ck = torch.load(ckpt_path)
        model.load_state_dict(ck["model"])
        export(model, cfg, args, n_params, ck["tokens_seen"], ck["step"])
        return
    log_path = os.path.join(args.work, f"log{suffix}.jsonl")
    step, tokens_seen = 0, 0
    if os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, tokens_seen = ck["step"], ck["tokens_seen"]
        torch.set_rng_state(ck["rng"])
        print(f"resumed at step {step}", flush=True)
        if os.path.exists(log_path):
            # Steps logged after the checkpoint by an interrupted run are redone: drop them.
            with open(log_path) as f:
                kept = [line for line in f if json.loads(line)["step"] <= step]
            with open(log_path, "w") as f:
                f.writelines(kept)
    elif os.path.exists(log_path):
        os.remove(log_path)

    order_long = np.random.default_rng(args.seed + 1).permutation(len(long))
    orders = {name: np.random.default_rng(args.seed + (0 if name == "train_512" else 2 + ord(name[-1]) - ord("b"))).permutation(len(sets[name][0]))
              for name in sets}
    syn_rng = np.random.default_rng(args.seed + 100 + step)
    t0 = time.time()
    while step < total:
        warm = args.warmup
        lr = args.lr * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total)))
        for g in opt.param_groups:
            g["lr"] = lr
        if step < args.steps_short:
            # The phase this step is in, and how far into it: each phase reads its set from its own start.
            k = max(i for i, p in enumerate(phases) if p[0] <= step)
            start, name = phases[k]
            # Steps this set already served in earlier phases, so a set revisited continues where it stopped.
            served = sum(phases[j + 1][0] - phases[j][0] for j in range(k) if phases[j][1] == name)
            bs, idx = args.batch_short, orders[name]
            i0 = ((served + step - start) * bs) % len(idx)
            sel = idx[i0:i0 + bs]
            rows, ws = sets[name][0][sel], sets[name][1][sel]
            n_syn = int(round(args.synthetic * bs))
            if n_syn:
                rows, ws = rows.copy(), ws.copy()
                for r in range(n_syn):
                    rows[r], ws[r] = synthetic_row(syn_rng, sets[name][0], rows.shape[1], cfg.vocab_size)
        else:
            bs, idx = args.batch_long, order_long
            i0 = ((step - args.steps_short) * bs) % len(idx)
            sel = idx[i0:i0 + bs]
            rows, ws = long[sel], long_w[sel]
        loss = batch_loss(model, rows, ws)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += rows.size
        rec = {"step": step, "loss": round(loss.item(), 4), "lr": lr, "tokens": tokens_seen}
        if step % args.eval_every == 0 or step == total:
            rec["val_512"] = round(evaluate(model, vshort[:32], vshort_w[:32], 8), 4)
            rec["val_2048"] = round(evaluate(model, vlong[:8], vlong_w[:8], 2), 4)
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if step % 20 == 0 or "val_512" in rec:
            el = time.time() - t0
            print(f"step {step}/{total} loss {loss.item():.3f} {rec.get('val_512', '')} {rec.get('val_2048', '')} "
                  f"tokens {tokens_seen:,} {el / 60:.1f} min", flush=True)
        if step % args.ckpt_every == 0 or step == total or step == args.stop_at:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                        "tokens_seen": tokens_seen, "rng": torch.get_rng_state()}, ckpt_path + ".tmp")
            os.replace(ckpt_path + ".tmp", ckpt_path)
        if step == args.stop_at:
            print(f"stopped at step {step} (--stop-at); resume with other --steps-* to finish", flush=True)
            return

    export(model, cfg, args, n_params, tokens_seen, step)


def export(model, cfg, args, n_params, tokens_seen, step):
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.work, "tokenizer.json"), encoding="utf-8") as f:
        tj = json.load(f)
    end = tj["model"]["vocab"]["<|end|>"]
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(cfg.hf(bos=end, eos=end), f, indent=2)
    with open(os.path.join(args.out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False)
    save_safetensors(os.path.join(args.out, "model.safetensors"), model.hf_state())
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump({"parameters": n_params, "tokens_seen": tokens_seen, "steps": step, "seed": args.seed,
                   "args": {k: v for k, v in vars(args).items() if k not in ("work", "out", "init_from")}}, f, indent=2)
    print(f"exported step {step} to {args.out}", flush=True)


if __name__ == "__main__":
    main()
