#!/usr/bin/env bash
# The CUDA checks issues 2 and 5 ask for, as one short script for a lent GPU machine (about 9
# minutes on an H100/H200). The steps run in the order 1, 2, 3, 5, 2b, 4, 6, 7, so that a run cut
# short loses the least. It needs CUDA torch and the project's runtime dependencies. On an
# offline GPU host that has CUDA torch (and pytest) but not the rest, fetch the other
# dependencies' wheels where PyPI is reachable (benchmarks/gpu_wheels.sh, into .whl) and run, from
# the repository's root on the host:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#   PYTHONPATH=/tmp/site:$PWD PYTHON=python3 bash benchmarks/gpu_check.sh
# The steps:
#   1. the GPU tests (pytest -m gpu): a checkpoint written on CUDA loads on CPU and back; the CUDA
#      engine puts labels where the CPU engine does (KiTS IPL and oblique LPS, fp32 and bf16); a
#      tiny CUDA training run (bf16, channels_last, cuDNN benchmark) whose checkpoint loads on CPU;
#      the service on CUDA (bf16, warm-up) whose masks line up in world space (KiTS IPL and LPS)
#      and match the CPU service's;
#   2. a short CUDA training smoke with AMP (bf16) on 512x512 phantoms at native spacing,
#      base 32, batch 16: the training log reports slices/s (target >= 400); 2b. the same with
#      --no-cudnn-benchmark on the same cache, so the two slices/s show what cuDNN's search buys
#      (each epoch's figure includes its first step, where the search runs);
#   3. POST /segment for a 200x512x512 .nii.gz on CUDA: server time = total - receive
#      (target <= 0.75 s); the fastest of 3 requests, each in a fresh process (about 1 minute);
#   4. training throughput against the naive loop, on CUDA;
#   5. the same upload over a real socket, decoding during the upload on and off (bench_upload.py):
#      with it on, the time after the last byte is the server time the service really has;
#   6. step 3 with KITSEG_COMPILE=on (torch.compile; `auto` leaves CUDA eager until this is measured):
#      its server time against step 3's, and the start-up the compile costs (about 1 minute more);
#   7. the training cache built in one process against --cache-workers processes, on the host's
#      cores (bench_preprocess.py; on the 2-core development CPU two processes gained nothing).
# Results go to $OUT (the device tool's output folder) or runs/gpu-check; docs/benchmarks.md is left
# alone (the device machine's copy does not come back), so record them by hand.
# DEVICE=cpu ITERS=2 SLICES=20 BATCH=2 runs the same steps on a CPU, to check the script itself;
# GPU_TESTS=1 adds step 1 there, whose tests then skip. (At batch 16, CPU training at 512x512 and
# base 32 needs more than 24 GiB of RAM.)
# No `set -e`: a failing step (a gpu test, say, or pytest's exit status 1 for a test module it
# could not collect) is logged with its status, and the other steps still run and measure.
set -uo pipefail
PY=${PYTHON:-python}
OUT=${OUT:-runs/gpu-check}
DEVICE=${DEVICE:-cuda}
ITERS=${ITERS:-60}
SLICES=${SLICES:-200}
BATCH=${BATCH:-16}
GPU_TESTS=${GPU_TESTS:-$([ "$DEVICE" = cuda ] && echo 1 || echo 0)}  # 1 on a CPU checks step 1 too
AMP=$([ "$DEVICE" = cuda ] && echo bf16 || echo off)
mkdir -p "$OUT"
# Phantoms, caches and checkpoints stay out of $OUT: only the 8 results below go there (the device
# tool brings back at most 8 files from it).
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# Python's own temporary folders (multiprocessing's pymp-*, the dry runs' kitseg-*) go there too,
# so that nothing is left behind in /tmp.
export TMPDIR="$WORK/tmp"
mkdir -p "$TMPDIR"
step() { echo "== $(date +%T) $*"; }
run() { "$@" || echo "!! exit status $? from: $*"; }
gpu_tests() {
  # Test modules whose dev-only imports are missing (schemathesis, say, on an image that has only
  # the runtime wheels) must not stop the gpu tests from being collected and run.
  $PY -m pytest -q -m gpu tests -p no:cacheprovider --continue-on-collection-errors 2>&1 | tail -12
}
smoke() {  # one epoch of ITERS steps at 512x512, base 32; extra arguments are appended
  $PY -m training train --data "$WORK/data" --cache "$WORK/cache" --val-fraction 0.2 --epochs 1 --iters "$ITERS" \
      --batch-size "$BATCH" --patch 512 --spacing 0 --base-width 32 --amp "$AMP" --device "$DEVICE" --no-progress "$@"
}
{
  $PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"
  if [ "$DEVICE" = cuda ]; then
    $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1
  fi
  if [ "$GPU_TESTS" = 1 ]; then
    step "1. gpu tests"
    run gpu_tests
  fi
  step "2. training smoke"
  run $PY -m training phantoms --out "$WORK/data" --n 6 --size 512 --seed 0 --workers 4
  run smoke --out "$WORK/run"
  run cp "$WORK/run/metrics.jsonl" "$OUT/train-smoke.jsonl"
  step "3. server time, 200 slices"
  run $PY benchmarks/bench_e2e.py --slices "$SLICES" --device "$DEVICE" --mirror --no-docs --out "$OUT/e2e.json"
  step "5. decoding during the upload"
  run $PY benchmarks/bench_upload.py --slices "$SLICES" --device "$DEVICE" --mbps 0 1000 --repeat 3 --no-docs \
      --out "$OUT/upload.json"
  step "2b. training smoke without cuDNN's search"
  run smoke --out "$WORK/run-nobench" --no-cudnn-benchmark
  run cp "$WORK/run-nobench/metrics.jsonl" "$OUT/train-smoke-no-cudnn-benchmark.jsonl"
  rm -rf "$WORK/data" "$WORK/cache" "$WORK/run" "$WORK/run-nobench"
  step "4. training throughput against the naive loop"
  run $PY benchmarks/bench_train.py --device "$DEVICE" --steps "$((ITERS / 2 + 2))" --no-docs --out "$OUT/train.json"
  step "6. server time with torch.compile"
  run $PY benchmarks/bench_e2e.py --slices "$SLICES" --device "$DEVICE" --mirror --compile on --repeat 2 --no-docs \
      --out "$OUT/e2e-compiled.json"
  step "7. the training cache in one process and in several"
  if [ "$DEVICE" = cuda ]; then PP=(--cases 8 --slices 200); else PP=(--cases 2 --slices 40 --repeat 1); fi
  run $PY benchmarks/bench_preprocess.py "${PP[@]}" --no-docs --out "$OUT/preprocess.json"
  step "done"
} 2>&1 | tee "$OUT/gpu-check.log"
