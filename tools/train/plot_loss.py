"""Draw a run's train/validation loss curve: plot_loss.py [LOG.jsonl OUT.png TITLE]
(default: work/log.jsonl into models/coordgen-demo/loss.png)."""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
by_step = {}
log_file = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "work", "log.jsonl")
for line in open(log_file):
    r = json.loads(line)
    by_step[r["step"]] = r  # a resumed run re-logs steps after its checkpoint: the last entry wins
rows = [by_step[k] for k in sorted(by_step)]
tokens = [r["tokens"] / 1e6 for r in rows]
loss = [r["loss"] for r in rows]
smooth, acc = [], None
for v in loss:
    acc = v if acc is None else 0.95 * acc + 0.05 * v
    smooth.append(acc)
fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
ax.plot(tokens, loss, color="#bbbbbb", lw=0.6, label="train (per step)")
ax.plot(tokens, smooth, color="#1f77b4", lw=1.6, label="train (smoothed)")
for key, color, label in (("val_512", "#d62728", "validation, 512-token rows"), ("val_2048", "#2ca02c", "validation, 2048-token rows")):
    pts = [(r["tokens"] / 1e6, r[key]) for r in rows if key in r]
    if pts:
        ax.plot(*zip(*pts), "o-", color=color, lw=1.4, ms=4, label=label)
switch = next((r["tokens"] / 1e6 for r in rows if r["step"] > 1 and r["tokens"] - rows[rows.index(r) - 1]["tokens"] == 2048), None)
if switch:
    ax.axvline(switch, color="#888888", ls="--", lw=0.8)
    ax.text(switch, ax.get_ylim()[1] * 0.95, " 2048-token phase", fontsize=8, color="#555555")
ax.set_xlabel("tokens seen (millions)")
ax.set_ylabel("cross-entropy (nats/token)")
ax.set_title(sys.argv[3] if len(sys.argv) > 3 else "coordgen-demo training loss")
ax.set_ylim(bottom=0)
ax.grid(alpha=0.3)
ax.legend()
fig.tight_layout()
out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(HERE, "..", "..", "models", "coordgen-demo", "loss.png")
fig.savefig(out)
print(f"wrote {out}")
