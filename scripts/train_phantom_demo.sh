#!/usr/bin/env bash
# Reproduces the demo checkpoint: procedural phantoms -> train on CPU (or GPU) -> evaluate on
# held-out phantoms made with a different seed (never used for training or model selection).
# Test seeds 1, 2 and 4 were each used once to report earlier recipes, and seed 3 (cases
# 3000-3019) is the development set the recipe was chosen on (docs/training.md), so the reported
# test set is seed 5: 30 cases, because with 10 one case moved the mean tumor Dice by 0.09.
# Seed 5 has since been used to choose between two recipes, so a new recipe reports on seed 6.
# Usage: scripts/train_phantom_demo.sh [WORKDIR]   (default: runs/phantom-demo)
set -euo pipefail
W=${1:-runs/phantom-demo}
PY=${PYTHON:-python}
start=$(date +%s)
$PY -m training phantoms --out "$W/data/train" --n 40 --seed 0 --workers 2
$PY -m training phantoms --out "$W/data/test" --n 30 --seed 5 --start 5000 --workers 2
$PY -m training train --data "$W/data/train" --out "$W/run" --val-fraction 0.1 \
    --epochs 10 --iters 80 --batch-size 16 --patch 96 --base-width 16 --in-slices 3 --spacing 2.0 \
    --fg-fraction 0.6 --max-minutes 11.5 --name kitseg-demo-phantom \
    --describe "40 procedural KiTS19-layout phantoms (kitseg-train phantoms --n 40 --seed 0); synthetic, not for clinical use" \
    --no-progress
$PY -m training evaluate --checkpoint "$W/run/best.safetensors" --data "$W/data/test" --out "$W/test" --precision fp32
echo "total wall time: $(( $(date +%s) - start )) s"
