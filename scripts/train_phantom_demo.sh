#!/usr/bin/env bash
# Reproduces the demo checkpoint: procedural phantoms -> train on CPU (or GPU) -> evaluate on
# held-out phantoms made with a different seed (never used for training or model selection).
# Test seeds 1, 2, 4 and 5 were each used to report (and seed 5 also to choose between) earlier
# recipes, and seed 3 (cases 3000-3019) is the development set recipes are chosen on
# (docs/training.md). This recipe (80 training phantoms, evaluated with test-time mirroring) was
# chosen there and reports on seed 6: 30 fresh cases, 6000-6029. A new recipe needs seed 7.
# Usage: scripts/train_phantom_demo.sh [WORKDIR]   (default: runs/phantom-demo)
set -euo pipefail
W=${1:-runs/phantom-demo}
PY=${PYTHON:-python}
start=$(date +%s)
$PY -m training phantoms --out "$W/data/train" --n 80 --seed 0 --workers 2
$PY -m training phantoms --out "$W/data/test" --n 30 --seed 6 --start 6000 --workers 2
$PY -m training train --data "$W/data/train" --out "$W/run" --val-fraction 0.05 \
    --epochs 10 --iters 80 --batch-size 16 --patch 96 --base-width 16 --in-slices 3 --spacing 2.0 \
    --fg-fraction 0.6 --max-minutes 11.5 --name kitseg-demo-phantom \
    --describe "80 procedural KiTS19-layout phantoms (kitseg-train phantoms --n 80 --seed 0); synthetic, not for clinical use" \
    --no-progress
$PY -m training evaluate --checkpoint "$W/run/best.safetensors" --data "$W/data/test" --out "$W/test" --precision fp32 --mirror
echo "total wall time: $(( $(date +%s) - start )) s"
