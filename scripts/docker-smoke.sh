#!/usr/bin/env bash
# Proves the deployment on a machine without a registry: Debian's docker.io, a debootstrap base
# image, the project image built with CPU torch, the compose stack on 127.0.0.1, one real
# POST /segment with a phantom from the host, four wait=false jobs across a SIGKILL of the
# container's process and Docker's restart of it (restart: unless-stopped), then teardown.
#
#   sudo scripts/docker-smoke.sh            (root: it installs packages and starts dockerd)
#
# Environment: KITSEG_SMOKE_KEEP=1 keeps dockerd and images afterwards. KITSEG_SMOKE_EXTRAS (default
# onnx, as compose's api-cpu service builds it; empty for the plain image) picks the image's extras,
# and the smoke checks that the service then runs the backend they imply.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORK=${KITSEG_SMOKE_WORK:-/var/tmp/kitseg-smoke}
PORT=${KITSEG_SMOKE_PORT:-18000}
mkdir -p "$WORK"
log() { echo "[smoke $(date +%H:%M:%S)] $*"; }

if ! command -v dockerd >/dev/null || ! command -v docker-compose >/dev/null || ! command -v debootstrap >/dev/null; then
  log "installing docker.io docker-compose debootstrap"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose debootstrap >/dev/null
fi

STARTED_DOCKERD=0
if ! docker info >/dev/null 2>&1; then
  log "starting dockerd (vfs, no iptables)"
  nohup dockerd --storage-driver=vfs --iptables=false --bridge=none >"$WORK/dockerd.log" 2>&1 &
  echo $! >"$WORK/dockerd.pid"
  STARTED_DOCKERD=1
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null
fi

cleanup() {
  log "teardown"
  (cd "$ROOT" && KITSEG_SMOKE_PORT=$PORT docker-compose -p kitseg-smoke -f scripts/docker-compose.smoke.yml down -v >/dev/null 2>&1) || true
  if [ "${KITSEG_SMOKE_KEEP:-0}" != "1" ] && [ "$STARTED_DOCKERD" = "1" ]; then
    kill "$(cat "$WORK/dockerd.pid")" 2>/dev/null || true
  fi
}
trap cleanup EXIT

if ! docker image inspect kitseg-base:bookworm >/dev/null 2>&1; then
  log "debootstrap a Debian bookworm base with python3 (no registry here)"
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log"
  # The slim python image's layout: python and pip on PATH.
  ln -sf /usr/bin/python3 "$WORK/rootfs/usr/local/bin/python"
  [ -e "$WORK/rootfs/usr/bin/pip" ] || ln -sf /usr/bin/pip3 "$WORK/rootfs/usr/local/bin/pip"
  rm -f "$WORK"/rootfs/usr/lib/python3*/EXTERNALLY-MANAGED
  tar -C "$WORK/rootfs" -c . | docker import - kitseg-base:bookworm
fi

EXTRAS=${KITSEG_SMOKE_EXTRAS-onnx}
log "building the project image (CPU torch, extras '$EXTRAS'; host CA bundle mounted for pip)"
CTX="$WORK/context"
rm -rf "$CTX"
mkdir -p "$CTX"
git -C "$ROOT" ls-files -z | xargs -0 -I{} cp --parents {} "$CTX"/
cp /etc/ssl/certs/ca-certificates.crt "$CTX/.host-ca.crt"
# This machine keeps a CPU build of torch on disk; without one pip would pull a CUDA build of several GB.
cp /opt/wheels/torch-2.13.0+cpu-*.whl "$CTX/" 2>/dev/null || true
DOCKER_BUILDKIT=0 docker build --network host \
  --build-arg BASE_IMAGE=kitseg-base:bookworm \
  --build-arg TORCH_VARIANT=local --build-arg TORCH_SPEC=torch==2.13.0 --build-arg EXTRAS="$EXTRAS" \
  -t kitseg:latest "$CTX" >"$WORK/build.log"

log "starting the compose stack on 127.0.0.1:$PORT"
# vfs copies the whole image to create a container: minutes, not the client's default 60 s.
export COMPOSE_HTTP_TIMEOUT=${COMPOSE_HTTP_TIMEOUT:-900}
mkdir -p "$ROOT/checkpoints"
KITSEG_SMOKE_PORT=$PORT docker-compose -p kitseg-smoke -f scripts/docker-compose.smoke.yml up -d api
for _ in $(seq 300); do
  curl -fsS "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1 && break
  cid=$(docker-compose -p kitseg-smoke -f scripts/docker-compose.smoke.yml ps -q api)
  if [ -n "$cid" ] && [ "$(docker inspect -f '{{.State.Running}}' "$cid")" = "false" ]; then
    docker logs --tail 40 "$cid"
    log "FAILED: the api container exited"
    exit 1
  fi
  sleep 2
done
curl -fsS "http://127.0.0.1:$PORT/ready"

log "POST /segment with a phantom from the host"
# The host side needs the project (phantoms) and httpx: the setup script's .venv when there is one.
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
"$PY" -m training phantoms --out "$WORK/phantom" --n 1 --size 128 --workers 1 >/dev/null
"$PY" - "$PORT" "$WORK/phantom/case_00000" "$EXTRAS" <<'EOF'
import gzip, sys
import httpx, nibabel as nib, numpy as np
port, case, extras = sys.argv[1], sys.argv[2], sys.argv[3]
card = httpx.get(f"http://127.0.0.1:{port}/model", timeout=60).json()
# backend=auto: ONNX Runtime for fp32 on a CPU when the extra is installed; a CPU with native bf16
# runs bf16 (precision=auto), and that is torch's.
want = "onnxruntime" if "onnx" in extras.split(",") and card["precision"] == "fp32" else "torch"
assert card["backend"] == want, (
    f"backend {card['backend']!r}, expected {want!r} for extras {extras!r} at precision {card['precision']!r}"
)
with open(f"{case}/imaging.nii.gz", "rb") as f:
    r = httpx.post(f"http://127.0.0.1:{port}/segment", files={"file": f}, timeout=600)
r.raise_for_status()
res = r.json()
assert res["model"]["demo"] is True and [c["name"] for c in res["classes"]] == ["kidney", "tumor"], res
m = httpx.get(f"http://127.0.0.1:{port}{res['mask_url']}", timeout=60)
mask = nib.Nifti1Image.from_bytes(gzip.decompress(m.content))
ref = nib.load(f"{case}/imaging.nii.gz")
assert mask.shape == ref.shape and np.allclose(mask.affine, ref.affine, atol=1e-4)
seg = np.asanyarray(nib.load(f"{case}/segmentation.nii.gz").dataobj)
pred = np.asanyarray(mask.dataobj)
dice = 2 * ((pred > 0) & (seg > 0)).sum() / ((pred > 0).sum() + (seg > 0).sum())
metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=60).text  # prometheus-client in the image
assert 'kitseg_jobs_total{outcome="ok"} 1.0' in metrics, metrics[-2000:]
print(f"smoke OK: backend {card['backend']} ({card['precision']}, compiled {card['compiled']}), kidney {res['classes'][0]['volume_ml']:.1f} mL, kidney Dice vs truth {dice:.3f}")
assert dice > 0.8
EOF
log "wait=false jobs, then the container's process killed (SIGKILL) and restarted by Docker: the restarted service runs them"
API=$(KITSEG_SMOKE_PORT=$PORT docker-compose -p kitseg-smoke -f scripts/docker-compose.smoke.yml ps -q api)
"$PY" - "$PORT" "$WORK/phantom/case_00000" "$WORK/accepted.txt" <<'EOF'
import sys
import httpx
port, case, out = sys.argv[1], sys.argv[2], sys.argv[3]
ids = []
for _ in range(4):  # one running and three queued (the queue holds 4)
    with open(f"{case}/imaging.nii.gz", "rb") as f:
        r = httpx.post(f"http://127.0.0.1:{port}/segment?wait=false", files={"file": f}, timeout=60)
    assert r.status_code == 202, r.text
    ids.append(r.json()["id"])
open(out, "w").write("\n".join(ids))
EOF
# A crash, not a stop: SIGKILL to the container's main process from the host (as the kernel's
# out-of-memory killer would). Docker's restart policy must bring it back by itself; `docker kill`
# would count as a manual stop, which that policy leaves alone.
RESTARTS=$(docker inspect -f '{{.RestartCount}}' "$API")
kill -9 "$(docker inspect -f '{{.State.Pid}}' "$API")"
for _ in $(seq 180); do
  [ "$(docker inspect -f '{{.RestartCount}}' "$API")" -gt "$RESTARTS" ] && curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null && break
  sleep 1
done
if [ "$(docker inspect -f '{{.RestartCount}}' "$API")" -le "$RESTARTS" ]; then
  docker inspect -f '{{.State.Status}} exit {{.State.ExitCode}}' "$API"
  log "FAILED: Docker did not restart the crashed container (restart: unless-stopped)"
  exit 1
fi
log "Docker restarted the crashed container (restart count $(docker inspect -f '{{.RestartCount}}' "$API"))"
"$PY" - "$PORT" "$WORK/accepted.txt" <<'EOF'
import sys, time
import httpx
port, ids = sys.argv[1], open(sys.argv[2]).read().split()
for rid in ids:
    deadline = time.time() + 300
    while (r := httpx.get(f"http://127.0.0.1:{port}/segmentations/{rid}", timeout=60)).status_code == 202:
        assert time.time() < deadline, r.text
        time.sleep(0.5)
    assert r.status_code == 200, r.text
    assert httpx.get(f"http://127.0.0.1:{port}/segmentations/{rid}/mask", timeout=60).status_code == 200
metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=60).text
resumed = [float(ln.split()[-1]) for ln in metrics.splitlines() if ln.startswith("kitseg_jobs_resumed_total")]
print(f"smoke OK: {len(ids)} accepted jobs answered 200 after the crash, {resumed[0]:.0f} of them run by the restarted service")
assert resumed[0] >= 1, "every job had finished before the crash: nothing was taken over"
EOF
log "passed"
