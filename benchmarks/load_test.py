"""Bounded load test on loopback: many more parallel POST /segment than the queue holds.

Starts ``kitseg-serve`` in a subprocess (the demo model unless --checkpoint is given) and fires
``--requests`` uploads from ``--concurrency`` threads at once. A correct service answers only
200, or 503 with Retry-After when its queue is full; it never crashes, never answers 5xx
otherwise, and its memory stays bounded. Records the statuses, latencies and the server's peak
RSS (VmHWM), and after the run checks that the server still answers and its spool is empty.

    python benchmarks/load_test.py --requests 48 --concurrency 16 --queue-size 4

Writes benchmarks/results/load.json and the load-test section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_e2e import update_section  # noqa: E402
from training.datasets import write_kits_case  # noqa: E402
from training.synth import make_phantom  # noqa: E402


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def start_service(env: dict[str, str], quiet: bool = False) -> tuple[subprocess.Popen[bytes], str]:
    """``kitseg-serve`` on a free 127.0.0.1 port with ``env``, once it answers ``/ready``; its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stderr=subprocess.DEVNULL if quiet else None,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            raise SystemExit("server did not become ready")
        time.sleep(0.3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--queue-size", type=int, default=4)
    ap.add_argument("--inplane", type=int, default=256, help="phantom in-plane size (pixels)")
    ap.add_argument("--checkpoint", default="")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "load.json")
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="kitseg-load-"))
    hu, seg, sp = make_phantom(np.random.default_rng(3), inplane=a.inplane)
    write_kits_case(tmp / "case", hu, seg, sp)
    payload = (tmp / "case" / "imaging.nii.gz").read_bytes()
    env = {
        **os.environ,
        "KITSEG_RESULT_DIR": str(tmp / "results"),
        "KITSEG_QUEUE_SIZE": str(a.queue_size),
        "KITSEG_LOG_LEVEL": "WARNING",
        "KITSEG_CHECKPOINT": a.checkpoint,
    }
    if not a.checkpoint:
        env.pop("KITSEG_CHECKPOINT")
    proc, url = start_service(env)
    try:
        base_rss = _status_kb(proc.pid, "VmRSS") / 1024

        def one(i: int) -> tuple[int, float, str | None]:
            t = time.perf_counter()
            try:
                r = httpx.post(f"{url}/segment", files={"file": (f"{i}.nii.gz", payload)}, timeout=600)
            except httpx.TransportError as e:
                return -1, time.perf_counter() - t, type(e).__name__
            return r.status_code, time.perf_counter() - t, r.headers.get("retry-after")

        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(a.concurrency) as pool:
            results = list(pool.map(one, range(a.requests)))
        wall = time.perf_counter() - t0
        peak_rss = _status_kb(proc.pid, "VmHWM") / 1024
        alive = httpx.get(f"{url}/ready", timeout=10).status_code == 200
        after = httpx.post(f"{url}/segment", files={"file": ("after.nii.gz", payload)}, timeout=600).status_code
        end_rss = _status_kb(proc.pid, "VmRSS") / 1024
        spool_left = len(list((tmp / "results" / "spool").iterdir()))
    finally:
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(tmp, ignore_errors=True)  # the phantom and the server's results

    statuses = collections.Counter(s for s, _, _ in results)
    ok_lat = sorted(t for s, t, _ in results if s == 200)
    rej = [(s, ra) for s, _, ra in results if s == 503]
    row = {
        "requests": a.requests,
        "concurrency": a.concurrency,
        "queue_size": a.queue_size,
        "upload_mb": len(payload) / 2**20,
        "volume_shape": list(hu.shape),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "all_503_have_retry_after": all(ra is not None for _, ra in rej),
        "only_200_or_503": set(statuses) <= {200, 503},
        "wall_s": wall,
        "latency_200_s": {
            "p50": ok_lat[len(ok_lat) // 2] if ok_lat else None,
            "max": ok_lat[-1] if ok_lat else None,
        },
        "server_rss_mb": {"baseline": base_rss, "peak": peak_rss, "after": end_rss},
        "alive_after": alive,
        "next_request_after": after,
        "spool_files_left": spool_left,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(row, indent=2))
    print(json.dumps(row, indent=2))
    md = [
        "## Load test (loopback, CPU)",
        "",
        f"`python benchmarks/load_test.py --requests {a.requests} --concurrency {a.concurrency} "
        f"--queue-size {a.queue_size}`: {a.requests} uploads of a {'x'.join(map(str, hu.shape))} phantom "
        f"({row['upload_mb']:.1f} MB) from {a.concurrency} threads at once against a queue of {a.queue_size}.",
        "",
        "| sent | answered 200 | answered 503 (all with Retry-After) | other | wall s | p50 / max latency of 200s (s) "
        "| server RSS baseline / peak / after (MB) | ready after | next request | spool files left |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {a.requests} | {statuses.get(200, 0)} | {statuses.get(503, 0)} ({row['all_503_have_retry_after']}) "
        f"| {sum(v for k, v in statuses.items() if k not in (200, 503))} | {wall:.1f} "
        f"| {row['latency_200_s']['p50'] or 0:.1f} / {row['latency_200_s']['max'] or 0:.1f} "
        f"| {base_rss:.0f} / {peak_rss:.0f} / {end_rss:.0f} | {alive} | {after} | {spool_left} |",
    ]
    update_section(ROOT / "docs" / "benchmarks.md", "## Load test", "\n".join(md))
    print("\n".join(md))
    ok = row["only_200_or_503"] and row["all_503_have_retry_after"] and alive and after == 200 and spool_left == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
