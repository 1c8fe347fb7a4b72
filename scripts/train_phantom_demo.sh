#!/usr/bin/env bash
# Reproduces the phantom checkpoints: procedural phantoms -> train on CPU (or GPU) -> evaluate on
# held-out phantoms made with a different seed (never used for training or model selection).
#
# RECIPE=quick (default): the 15-minute CPU run. Since session 20 (candidate LF in
#   docs/training.md): the long recipe's training (2.0 mm, 96-pixel patches, batch Dice, 30 epochs)
#   in fp32 under a 12-minute guard, without post-processing; evaluated on test seed 14
#   (14000-14029). On session 20's CPU (2 cores of a Xeon with AVX-512 BF16 + AMX) all 30 epochs fit
#   (613-692 s). On a slower CPU fewer fit: since session 24, --fit-schedule shortens the cosine
#   schedule to the epochs that fit, so the run anneals instead of being cut off (candidate LT;
#   on the AVX2 machine 15-22 of 30, 0.006 above the cut-off run on the development sets over two
#   seeds), and the test seed is 15 (15000-15029): kidney 0.974 / tumor 0.841 there on the AVX2
#   machine, 14.0 min (16 epochs). On the AVX2 machine R scores higher on the development sets (RECIPE=r).
#   On an AVX-512 BF16 EPYC (session 32) all 30 epochs fit: 11.8 min, kidney 0.984 / tumor 0.872 on
#   seed 15, and the same checkpoint 0.986 / 0.836 on a fresh seed 16; trained again with --seed 1,
#   tumor 0.849 / 0.803 on the two (docs/training.md).
# RECIPE=r: the 15-minute recipe of sessions 14-19 (candidate R): a 2.5 mm grid, 80-pixel patches,
#   per-patch Dice, 25 epochs, 12-minute guard, then tumor components under 0.5 mL become kidney
#   (`kitseg-train postprocess`; the weights are those training picked, unchanged). About 13
#   minutes on the AVX2 machine; tumor 0.849 on test seed 12, 0.822 on seed 13. Its predecessors:
#   candidate O (sessions 10-13, seeds 10 and 11), 13 epochs of the long recipe's settings
#   (sessions 8-9, seed 9), 10 epochs (sessions 5-7, seed 6).
# RECIPE=long: the same training as quick, all 30 epochs without a guard (about 24 minutes on the
#   AVX2 machine). This is the checkpoint shipped in app/demo_model. It was chosen on the
#   development sets and evaluated once on seed 7 (30 cases, 7000-7029). No post-processing: on the
#   development sets the 0.5 mL rule cost its checkpoint 0.004 of composite (docs/training.md).
# Test seeds 1, 2, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15 and 16 have been used to report (seed 5 also
# to choose between) recipes. Seeds 3 (cases 3000-3019) and 8 (8000-8039) are the development sets
# recipes are chosen on (docs/training.md). A new recipe needs a new test seed (17 onwards).
# Usage: [RECIPE=quick|r|long] scripts/train_phantom_demo.sh [WORKDIR]   (default: runs/phantom-demo[-r|-long])
set -euo pipefail
RECIPE=${RECIPE:-quick}
case "$RECIPE" in
    quick)
        EPOCHS=30 TEST_SEED=15 W=${1:-runs/phantom-demo}
        RECIPE_ARGS=(--patch 96 --spacing 2.0 --dice batch --max-minutes 12 --fit-schedule) MIN_TUMOR_ML=0 ;;
    r)
        EPOCHS=25 TEST_SEED=12 W=${1:-runs/phantom-demo-r}
        RECIPE_ARGS=(--patch 80 --spacing 2.5 --dice sample --max-minutes 12) MIN_TUMOR_ML=0.5 ;;
    long)
        EPOCHS=30 TEST_SEED=7 W=${1:-runs/phantom-demo-long}
        RECIPE_ARGS=(--patch 96 --spacing 2.0 --dice batch) MIN_TUMOR_ML=0 ;;
    *) echo "RECIPE must be quick, r or long, got '$RECIPE'" >&2; exit 2 ;;
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
