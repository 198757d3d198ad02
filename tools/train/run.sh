#!/usr/bin/env bash
# Retrains coordgen-demo from scratch with one command: packages, corpus, tokenizer, training, export,
# workloads, reference vectors and the loss curve. Seeded and resumable: rerunning after an
# interruption continues from tools/train/work/checkpoint.pt. Delete tools/train/work/ to start over.
set -euo pipefail
cd "$(dirname "$0")"
PY=/usr/bin/python3   # Debian's interpreter, which has python3-torch
bash setup.sh
[ -f work/train_2048.bin ] || $PY prepare.py
$PY train.py "$@"
$PY make_workloads.py
$PY refvectors.py --tiny --demo ../../models/coordgen-demo
$PY plot_loss.py
echo "done: models/coordgen-demo, workloads/, tests/CoordGen.Engine.Tests/Vectors/"
