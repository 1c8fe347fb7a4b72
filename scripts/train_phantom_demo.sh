#!/usr/bin/env bash
# Reproduces the phantom checkpoints: procedural phantoms -> train on CPU (or GPU) -> evaluate on
# held-out phantoms made with a different seed (never used for training or model selection).
#
# RECIPE=quick (default): the 15-minute CPU run, 13 epochs (since session 8; 10 before),
#   evaluated on seed 9 (30 cases, 9000-9029). About 14 minutes here.
# RECIPE=long: the same recipe trained 3x longer (30 epochs, about 24 minutes here). This is the
#   checkpoint shipped in app/demo_model. It was chosen on the development sets and evaluated once
#   on seed 7 (30 cases, 7000-7029).
# Test seeds 1, 2, 4, 5 and 6 were used to report (seed 5 also to choose between) earlier recipes.
# Seeds 3 (cases 3000-3019) and 8 (8000-8039) are the development sets recipes are chosen on
# (docs/training.md). A new recipe needs a new test seed (10 onwards).
# Usage: [RECIPE=quick|long] scripts/train_phantom_demo.sh [WORKDIR]   (default: runs/phantom-demo[-long])
set -euo pipefail
RECIPE=${RECIPE:-quick}
case "$RECIPE" in
    quick) EPOCHS=13 TEST_SEED=9 LIMIT=(--max-minutes 11.5) W=${1:-runs/phantom-demo} ;;
    long) EPOCHS=30 TEST_SEED=7 LIMIT=() W=${1:-runs/phantom-demo-long} ;;
    *) echo "RECIPE must be quick or long, got '$RECIPE'" >&2; exit 2 ;;
esac
PY=${PYTHON:-python}
start=$(date +%s)
$PY -m training phantoms --out "$W/data/train" --n 80 --seed 0 --workers 2
$PY -m training phantoms --out "$W/data/test" --n 30 --seed "$TEST_SEED" --start "${TEST_SEED}000" --workers 2
$PY -m training train --data "$W/data/train" --out "$W/run" --val-fraction 0.05 \
    --epochs "$EPOCHS" --iters 80 --batch-size 16 --patch 96 --base-width 16 --in-slices 3 --spacing 2.0 \
    --fg-fraction 0.6 "${LIMIT[@]}" --name kitseg-demo-phantom \
    --describe "80 procedural KiTS19-layout phantoms (kitseg-train phantoms --n 80 --seed 0), $EPOCHS epochs; synthetic, not for clinical use" \
    --no-progress
$PY -m training evaluate --checkpoint "$W/run/best.safetensors" --data "$W/data/test" --out "$W/test" --precision fp32 --mirror
echo "total wall time: $(( $(date +%s) - start )) s"
