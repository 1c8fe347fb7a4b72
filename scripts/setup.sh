#!/usr/bin/env bash
# Create .venv and install kitseg with its extras, torch first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# torch first, pinned to the build this project is tested with (a CPU wheel where the machine
# provides one locally). KITSEG_TORCH=skip leaves torch to the project's own range (>=2.10).
if [ "${KITSEG_TORCH:-pinned}" != "skip" ] && ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==${KITSEG_TORCH_VERSION:-2.13.0}"
fi
python -m pip install -q -e ".[train,dev,onnx]"
