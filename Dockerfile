# kitseg serving image. One uvicorn process per GPU: each process loads its own model.
#   docker build -t kitseg .                                   # CUDA torch from PyPI
#   docker build --build-arg TORCH_VARIANT=cpu -t kitseg:cpu .  # CPU-only torch
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_VARIANT=cuda
# "train" adds matplotlib and MONAI for the training image (compose service `train`).
ARG EXTRAS=""
ARG TORCH_SPEC="torch>=2.10,<3"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    KITSEG_RESULT_DIR=/var/lib/kitseg/results \
    KITSEG_DEVICE=auto \
    KITSEG_HOST=0.0.0.0 \
    KITSEG_PORT=8000 \
    MALLOC_ARENA_MAX=2

WORKDIR /opt/kitseg

# An optional .host-ca.crt in the build context is used by pip (networks with a TLS proxy; the
# smoke test puts the host's bundle there). The glob keeps the build working without one.
# Optional wheels in the context (e.g. a local CPU torch) are preferred by pip in the same way.
COPY pyproject.toml README.md LICENSE .host-ca.cr[t] *.wh[l] ./
# Dependencies first: a code change does not reinstall torch.
RUN if [ -f .host-ca.crt ]; then export PIP_CERT=/opt/kitseg/.host-ca.crt; fi \
    && if ls ./*.whl >/dev/null 2>&1; then export PIP_FIND_LINKS=/opt/kitseg; fi \
    && if [ "$TORCH_VARIANT" = "cpu" ]; then \
        pip install --index-url https://download.pytorch.org/whl/cpu "$TORCH_SPEC" || pip install "$TORCH_SPEC"; \
    else \
        pip install "$TORCH_SPEC"; \
    fi
RUN if [ -f .host-ca.crt ]; then export PIP_CERT=/opt/kitseg/.host-ca.crt; fi \
    && mkdir -p segcore training app \
    && touch segcore/__init__.py training/__init__.py app/__init__.py \
    && pip install "setuptools>=77" ".${EXTRAS:+[$EXTRAS]}" \
    && pip uninstall -y kitseg \
    && rm -rf segcore training app build ./*.egg-info

COPY segcore ./segcore
COPY app ./app
COPY training ./training
# The build backend is already installed, so this layer needs no network.
RUN rm -rf .host-ca.crt ./*.whl build ./*.egg-info && pip install --no-deps --no-build-isolation . \
    && python -c "import segcore, app.main" \
    && useradd --system --uid 10001 --home-dir /var/lib/kitseg kitseg \
    && mkdir -p /var/lib/kitseg/results /checkpoints \
    && chown -R kitseg /var/lib/kitseg

USER 10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os,sys,urllib.request; sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"KITSEG_PORT\",\"8000\")}/ready', timeout=4).status == 200 else 1)"]
CMD ["kitseg-serve"]
