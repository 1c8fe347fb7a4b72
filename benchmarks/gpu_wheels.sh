#!/usr/bin/env bash
# Fetch, on a machine that reaches PyPI, the wheels benchmarks/gpu_check.sh needs on an offline GPU
# host that has CUDA torch and pip but not the rest (the lent device machines: Python 3.12,
# x86_64, an image with torch, numpy, scipy, matplotlib, pytest, httpx and more):
#   benchmarks/gpu_wheels.sh [DEST]            (default .whl, which git ignores)
# then, on the GPU host, from the repository's root:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#   PYTHONPATH=/tmp/site:$PWD PYTHON=python3 bash benchmarks/gpu_check.sh
# The runtime dependencies of pyproject.toml are resolved with theirs, then the wheels of packages
# the host's image already has (HOST_HAS below, from the device tool's list of 2026-11-17) are
# dropped: carried copies would shadow the image's own (its numpy is the one its torch was built
# against) and would not fit the 64 MiB a device call can carry. HOST_HAS= (empty) keeps them all.
# MONAI (surface Dice) is fetched without its dependencies, because it asks for torch, which the
# host has as a CUDA build and a download would replace. PYTHON_VERSION (default 3.12) picks the
# host's Python.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PYV=${PYTHON_VERSION:-3.12}
PIP=${PIP:-python3 -m pip}
HOST_HAS=${HOST_HAS-"annotated_doc anyio certifi click h11 httpcore httpx idna numpy packaging pillow
prometheus_client pytest safetensors scipy sniffio tqdm typing_extensions"}
common=(--only-binary=:all: --python-version "$PYV" --implementation cp --dest "$DEST"
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64
        --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform linux_x86_64)
mkdir -p "$DEST"
$PIP download -q "${common[@]}" \
    "numpy>=1.26,<3" "scipy>=1.11" "nibabel>=5.2,<6" "safetensors>=0.4" "connected-components-3d>=3.12" \
    "tqdm>=4.66" "fastapi>=0.115" "starlette>=0.47" "uvicorn>=0.30" "python-multipart>=0.0.31" \
    "pydantic>=2.7,<3" "pydantic-settings>=2.3" "isal>=1.6" "fastapi-offline>=1.7" \
    "prometheus-client>=0.20" "httpx>=0.27"
$PIP download -q "${common[@]}" --no-deps "monai>=1.4"
for name in $HOST_HAS; do
    rm -f "$DEST/$name"-[0-9]*.whl
done
echo "$(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1), in $DEST:"
ls "$DEST"
