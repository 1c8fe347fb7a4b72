#!/usr/bin/env bash
# Two kitseg-serve replicas on one result folder behind nginx (round robin, no sticky sessions),
# all on 127.0.0.1. kitseg-predict --server segments a folder of phantoms through nginx while one
# replica is SIGKILLed and not started again. Every volume must come back, with the same voxel
# counts as a local run of the same model, and nothing may be left in the shared folder.
#
#   scripts/replicas-smoke.sh            (needs nginx on PATH: apt-get install nginx-light)
#
# Environment: PYTHON (default .venv/bin/python), KITSEG_SMOKE_WORK (default /var/tmp/kitseg-replicas),
# KITSEG_SMOKE_PORT (nginx; the replicas take the next two ports, default 18100).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${KITSEG_SMOKE_WORK:-/var/tmp/kitseg-replicas}
PORT=${KITSEG_SMOKE_PORT:-18100}
PA=$((PORT + 1)) PB=$((PORT + 2))
log() { echo "[replicas $(date +%H:%M:%S)] $*"; }
command -v nginx >/dev/null || { echo "needs nginx on PATH (apt-get install nginx-light)" >&2; exit 2; }
rm -rf "$WORK" && mkdir -p "$WORK"
PIDS=()
cleanup() {
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

cat >"$WORK/nginx.conf" <<EOF
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log;
events { worker_connections 64; }
http {
    access_log $WORK/nginx-access.log;
    client_max_body_size 1g;
    upstream kitseg { server 127.0.0.1:$PA max_fails=1 fail_timeout=2s; server 127.0.0.1:$PB max_fails=1 fail_timeout=2s; }
    server { listen 127.0.0.1:$PORT; location / { proxy_pass http://kitseg; } }
}
EOF

log "6 phantoms"
"$PY" -m training phantoms --out "$WORK/data" --n 6 --size 128 --workers 2 >/dev/null
log "two replicas on one result folder (time-to-live 20 s: a sweep every 5 s), nginx in front"
for port in $PA $PB; do
  KITSEG_RESULT_DIR="$WORK/results" KITSEG_RESULT_TTL_S=20 KITSEG_DEVICE=cpu KITSEG_LOG_LEVEL=WARNING \
    "$PY" -m app.serve --port "$port" >"$WORK/replica-$port.log" 2>&1 &
  PIDS+=($!)
done
A=${PIDS[0]}
for port in $PA $PB; do
  for _ in $(seq 120); do curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break; sleep 1; done
  curl -sf "http://127.0.0.1:$port/ready" >/dev/null
done
nginx -c "$WORK/nginx.conf"

log "kitseg-predict --server through nginx; replica A is SIGKILLed once a volume is accepted"
"$PY" -m app.predict_cli "$WORK/data" --glob imaging.nii.gz --out "$WORK/remote" --server "http://127.0.0.1:$PORT" \
  --jobs 2 >"$WORK/predict.log" 2>&1 &
CLI=$!
for _ in $(seq 600); do
  grep -q '"POST /segment?wait=false' "$WORK/nginx-access.log" 2>/dev/null && break
  sleep 0.1
done
kill -9 "$A"
log "replica A killed; the CLI goes on through nginx"
rc=0
wait "$CLI" || rc=$?
cat "$WORK/predict.log"
[ "$rc" = 0 ] || { log "FAILED: kitseg-predict exited with $rc"; exit 1; }

log "the same volumes locally, to compare"
"$PY" -m app.predict_cli "$WORK/data" --glob imaging.nii.gz --out "$WORK/local" >/dev/null 2>&1
"$PY" - "$WORK" "$PB" <<'EOF'
import json, sys, urllib.request
from pathlib import Path
work, port = Path(sys.argv[1]), sys.argv[2]
remote = json.loads((work / "remote" / "statistics.json").read_text())["results"]
local = json.loads((work / "local" / "statistics.json").read_text())["results"]
assert len(remote) == len(local) == 6, (len(remote), len(local))
for r, l in zip(remote, local, strict=True):
    assert "error" not in r, r
    assert [c["voxels"] for c in r["classes"]] == [c["voxels"] for c in l["classes"]], (r["input"], r["classes"], l["classes"])
metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
resumed = next(float(ln.split()[-1]) for ln in metrics.splitlines() if ln.startswith("kitseg_jobs_resumed_total"))
left = [p.relative_to(work) for p in (work / "results" / "pending").rglob("*") if p.is_file() and p.name != ".owner"]
assert not left, left
assert not list((work / "results" / "spool").iterdir())
print(f"replicas OK: 6 of 6 volumes through nginx with one replica killed, voxel counts equal to a local run; "
      f"the survivor took over {resumed:.0f} accepted jobs")
EOF
log "passed"
