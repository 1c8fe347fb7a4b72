#!/usr/bin/env bash
# Reproduces the phantom checkpoints: procedural phantoms -> train on CPU (or GPU) -> evaluate on
# held-out phantoms made with a different seed (never used for training or model selection).
#
# RECIPE=quick (default): the 15-minute CPU run. Since session 10 (candidate O in
#   docs/training.md): a 2.5 mm grid, 80-pixel patches, per-patch Dice, 25 epochs. Session 10
#   evaluated it on seed 10 (30 cases, 10000-10029); since session 12 (the engine's body crop
#   makes validation and evaluation about 2x cheaper) on seed 11 (11000-11029). About 13 minutes
#   here. Sessions 8-9 ran 13 epochs of the long recipe's settings on seed 9; sessions 5-7 ran
#   10 epochs on seed 6. Since session 14 (candidate R) on seed 12 (12000-12029).
# RECIPE=long: 2.0 mm, 96-pixel patches, batch Dice, 30 epochs (about 24 minutes here). This is
#   the checkpoint shipped in app/demo_model. It was chosen on the development sets and evaluated
#   once on seed 7 (30 cases, 7000-7029).
# RECIPE=quick ends with the post-processing chosen on the development sets in session 14
# (candidate R): tumor components under 0.5 mL become kidney (`kitseg-train postprocess`; the
# weights are those training picked, unchanged). RECIPE=long doesn't: on the development sets it
# cost the long recipe's checkpoint 0.004 of composite (docs/training.md).
# Test seeds 1, 2, 4, 5, 6, 9, 10 and 11 were used to report (seed 5 also to choose between) earlier
# recipes. Seeds 3 (cases 3000-3019) and 8 (8000-8039) are the development sets recipes are
# chosen on (docs/training.md). Session 18 evaluated the seed-12 checkpoint once more on seed 13
# (13000-13029). A new recipe needs a new test seed (14 onwards).
# Usage: [RECIPE=quick|long] scripts/train_phantom_demo.sh [WORKDIR]   (default: runs/phantom-demo[-long])
set -euo pipefail
RECIPE=${RECIPE:-quick}
case "$RECIPE" in
    quick)
        EPOCHS=25 TEST_SEED=12 W=${1:-runs/phantom-demo}
        RECIPE_ARGS=(--patch 80 --spacing 2.5 --dice sample --max-minutes 12) MIN_TUMOR_ML=0.5 ;;
    long)
        EPOCHS=30 TEST_SEED=7 W=${1:-runs/phantom-demo-long}
        RECIPE_ARGS=(--patch 96 --spacing 2.0 --dice batch) MIN_TUMOR_ML=0 ;;
    *) echo "RECIPE must be quick or long, got '$RECIPE'" >&2; exit 2 ;;
esac
PY=${PYTHON:-python}
start=$(date +%s)
$PY -m training phantoms --out "$W/data/train" --n 80 --seed 0 --workers 2
$PY -m training phantoms --out "$W/data/test" --n 30 --seed "$TEST_SEED" --start "${TEST_SEED}000" --workers 2
$PY -m training train --data "$W/data/train" --out "$W/run" --val-fraction 0.05 \
    --epochs "$EPOCHS" --iters 80 --batch-size 16 --base-width 16 --in-slices 3 "${RECIPE_ARGS[@]}" \
    --fg-fraction 0.6 --name kitseg-demo-phantom \
    --describe "80 procedural KiTS19-layout phantoms (kitseg-train phantoms --n 80 --seed 0), $EPOCHS epochs; synthetic, not for clinical use" \
    --no-progress
$PY -m training postprocess --checkpoint "$W/run/best.safetensors" --out "$W/run/final.safetensors" --min-tumor-ml "$MIN_TUMOR_ML"
$PY -m training evaluate --checkpoint "$W/run/final.safetensors" --data "$W/data/test" --out "$W/test" --precision fp32 --mirror
echo "total wall time: $(( $(date +%s) - start )) s"
