#!/usr/bin/env bash
# Train on CT synthesized for 150 real KiTS19 label maps (cases 0-149) and evaluate on the other
# 30 (cases 150-179), which are never used for training or model selection.
# Usage: scripts/train_kits19_synth.sh [LABELS_DIR] [WORKDIR]
#   LABELS_DIR defaults to ../shared/data/kits19-labels (the real KiTS19 segmentations, no images)
set -euo pipefail
LABELS=${1:-../shared/data/kits19-labels}
W=${2:-runs/kits19-synth}
PY=${PYTHON:-python}
start=$(date +%s)
$PY -m training synth-ct --labels "$LABELS" --out "$W/data/train" --cases 0:150 --workers 2
$PY -m training synth-ct --labels "$LABELS" --out "$W/data/test" --cases 150:180 --workers 2
echo "synthesis: $(( $(date +%s) - start )) s"
$PY -m training train --data "$W/data/train" --out "$W/run" --val-fraction 0.02 \
    --epochs 8 --iters 120 --batch-size 16 --patch 128 --base-width 16 --in-slices 3 --spacing 1.6 \
    --fg-fraction 0.6 --val-precision fp32 --name kitseg-kits19-synth \
    --describe "CT synthesized (kitseg-train synth-ct) for real KiTS19 label maps case_00000-00149; KiTS19 challenge, Heller et al., CC BY-NC-SA 4.0" \
    --no-progress
echo "training done: $(( $(date +%s) - start )) s"
$PY -m training evaluate --checkpoint "$W/run/best.safetensors" --data "$W/data/test" --out "$W/test" --precision fp32 --no-mirror
echo "total wall time: $(( $(date +%s) - start )) s"
