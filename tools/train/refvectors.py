"""PyTorch reference vectors for the C# graph tests (tests/CoordGen.Engine.Tests/Vectors/).

  tiny-llama/   a random-weight Llama with GQA, non-default rope_theta and an untied head (F32 weights),
                plus logits for three fixed token inputs
  demo.json     coordgen-demo: three fixed texts, their token ids from this tool's tokenizer, and the
                logits PyTorch computes at every position for a fixed slice of the vocabulary

The C# tests compare the compiled ONNX graphs with these numbers: an implementation independent of
the C# reference forward.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

import bpe
from train import Config, Llama, save_safetensors

HERE = os.path.dirname(os.path.abspath(__file__))
VECTORS = os.path.join(HERE, "..", "..", "tests", "CoordGen.Engine.Tests", "Vectors")

TEXTS = [
    "<|context|>\nThe keeper lit the lamp every evening.\n<|user|>\nSummarize the document.\n<|assistant|>\n",
    "In the beginning God created the heaven and the earth.",
    'Screen: {"app": "Mail", "elements": [{"id": "btn_7", "role": "button", "text": "Send"}]}',
]


def tiny() -> None:
    torch.manual_seed(20261123)
    cfg = Config(vocab_size=48, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rope_theta=5000.0)
    model = Llama(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        for blk in model.layers:
            blk.input_layernorm.weight.add_(1.0)
            blk.post_attention_layernorm.weight.add_(1.0)
        model.norm.weight.add_(1.0)
    lm_head = torch.randn(cfg.vocab_size, cfg.hidden_size) * 0.3
    out = os.path.join(VECTORS, "tiny-llama")
    os.makedirs(out, exist_ok=True)
    hf = cfg.hf(bos=1, eos=2)
    hf["tie_word_embeddings"] = False
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    state = model.hf_state()
    state["lm_head.weight"] = lm_head
    save_safetensors(os.path.join(out, "model.safetensors"), state, dtype=torch.float32)
    inputs = [[3, 17, 42, 5], [1, 2, 3, 4, 5, 6, 7, 8, 9], [47, 0, 47, 0, 11, 30]]
    cases = []
    with torch.no_grad():
        for ids in inputs:
            x = torch.tensor([ids])
            hidden = model_hidden(model, x)
            logits = hidden @ lm_head.T
            cases.append({"input_ids": ids, "logits": [[round(v, 6) for v in row] for row in logits[0].tolist()]})
    with open(os.path.join(out, "vectors.json"), "w") as f:
        json.dump({"source": "tools/train/refvectors.py --tiny (PyTorch)", "cases": cases}, f)


def model_hidden(model: Llama, ids: torch.Tensor) -> torch.Tensor:
    """The final-norm hidden states (the model's own head is tied; the tiny case uses a separate head)."""
    t = ids.shape[1]
    c = model.c
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim))
    freqs = torch.arange(t).float().unsqueeze(-1) * inv
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().unsqueeze(0).unsqueeze(0), emb.sin().unsqueeze(0).unsqueeze(0)
    mask = torch.full((t, t), float("-inf")).triu(1)
    x = model.embed_tokens(ids)
    for blk in model.layers:
        x = blk(x, cos, sin, mask)
    return model.norm(x)


def demo(model_dir: str) -> None:
    with open(os.path.join(model_dir, "config.json")) as f:
        hf = json.load(f)
    cfg = Config(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
                 num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=hf["num_attention_heads"],
                 num_key_value_heads=hf["num_key_value_heads"], rms_norm_eps=hf["rms_norm_eps"], rope_theta=hf["rope_theta"])
    model = Llama(cfg)
    state = load_safetensors(os.path.join(model_dir, "model.safetensors"))
    with torch.no_grad():
        model.embed_tokens.weight.copy_(state["model.embed_tokens.weight"])
        model.norm.weight.copy_(state["model.norm.weight"])
        for i, blk in enumerate(model.layers):
            p = f"model.layers.{i}."
            blk.input_layernorm.weight.copy_(state[p + "input_layernorm.weight"])
            blk.post_attention_layernorm.weight.copy_(state[p + "post_attention_layernorm.weight"])
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(blk, n).weight.copy_(state[p + f"self_attn.{n}.weight"])
            for n in ("gate_proj", "up_proj", "down_proj"):
                getattr(blk, n).weight.copy_(state[p + f"mlp.{n}.weight"])
    enc = bpe.load(os.path.join(model_dir, "tokenizer.json"))
    vocab_slice = list(range(0, cfg.vocab_size, 97))
    cases = []
    with torch.no_grad():
        for text in TEXTS:
            ids = enc.encode(text)
            logits = model(torch.tensor([ids]))[0]
            cases.append({"text": text, "input_ids": ids, "argmax": logits.argmax(-1).tolist(),
                          "logits_slice": [[round(row[j].item(), 5) for j in vocab_slice] for row in logits]})
    with open(os.path.join(VECTORS, "demo.json"), "w") as f:
        json.dump({"source": "tools/train/refvectors.py --demo (PyTorch, fp16 weights widened to fp32)",
                   "vocab_slice": vocab_slice, "cases": cases}, f)


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
    import struct
    import numpy as np
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        dt = {"F16": np.float16, "F32": np.float32}[info["dtype"]]
        out[name] = torch.from_numpy(np.frombuffer(data[a:b], dtype=dt).astype(np.float32).reshape(info["shape"]))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--demo", metavar="MODEL_DIR")
    a = ap.parse_args()
    if a.tiny:
        tiny()
    if a.demo:
        demo(a.demo)
