"""Decoding during the upload: what it takes off a request, over a real socket, at a given link speed.

Two ``kitseg-serve`` processes on 127.0.0.1, one with ``KITSEG_DECODE_DURING_UPLOAD=true`` (the
default) and one with ``false``, take the same realistic upload (one phantom abdomen over
``--slices`` slices, ``.nii.gz``) in turns. The client sends the multipart body in 1 MiB pieces,
paced to ``--mbps`` (0: as fast as loopback takes it), and measures, per request:

- *after upload*: from the moment its last byte is handed to the socket to the response;
- *wall*: from the first byte to the response (the client's view, the upload included);
- the server's own stage timings.

The service's time after the upload is what the GPU target counts (upload excluded); the wall
time shows that on loopback the decoding only moves into the upload, which then lasts longer.

    python benchmarks/bench_upload.py --mbps 0 1000 --repeat 3

Writes benchmarks/results/upload.json and the "Decoding during the upload" section of
docs/benchmarks.md. Single pass (``KITSEG_MIRROR=false``), as the end-to-end table, unless
``--mirror`` asks for the service's default (test-time mirroring: twice the model stage).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_e2e import add_label_argument, render, section_title, update_section  # noqa: E402
from benchmarks.bench_engine import machine, machine_line  # noqa: E402
from benchmarks.load_test import _status_kb, start_service  # noqa: E402

BOUNDARY = "kitsegbenchboundary"
PIECE = 1 << 20


def _serve(
    decode: bool, tmp: Path, device: str, precision: str, mirror: bool = False
) -> tuple[subprocess.Popen[bytes], str]:
    env = {
        **os.environ,
        "KITSEG_DECODE_DURING_UPLOAD": "true" if decode else "false",
        "KITSEG_MIRROR": "true" if mirror else "false",
        "KITSEG_DEVICE": device,
        "KITSEG_PRECISION": precision,
        "KITSEG_RESULT_DIR": str(tmp / ("on" if decode else "off")),
        "KITSEG_LOG_LEVEL": "WARNING",
    }
    return start_service(env, quiet=True)


def _body(payload: bytes) -> bytes:
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="ct.nii.gz"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + payload + f"\r\n--{BOUNDARY}--\r\n".encode()


def _send(url: str, body: bytes, mbps: float, pid: int) -> dict[str, Any]:
    marks: dict[str, float] = {}
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the server's peak RSS (Linux >= 4.0)
    base_kb = _status_kb(pid, "VmRSS")

    def paced() -> Iterator[bytes]:
        t0 = marks["start"] = time.perf_counter()
        for i in range(0, len(body), PIECE):
            if mbps > 0:  # hold each piece until the link would have carried the bytes before it
                due = t0 + i * 8 / (mbps * 1e6)
                while (now := time.perf_counter()) < due:
                    time.sleep(min(0.002, due - now))
            yield body[i : i + PIECE]
        marks["last_byte"] = time.perf_counter()

    r = httpx.post(
        f"{url}/segment",
        content=paced(),
        headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"},
        timeout=600,
    )
    done = time.perf_counter()
    assert r.status_code == 200, r.text
    t = r.json()["timings_ms"]
    voxels = 1
    for d in r.json()["input"]["shape"]:
        voxels *= int(d)
    return {
        "rss_growth_bytes_per_voxel": (_status_kb(pid, "VmHWM") - base_kb) * 1024 / voxels,
        "after_upload_ms": 1000 * (done - marks["last_byte"]),
        # The model stage swings by 10 % between requests on this shared machine; this is the rest.
        "non_model_after_upload_ms": 1000 * (done - marks["last_byte"]) - t["model"],
        "wall_ms": 1000 * (done - marks["start"]),
        "upload_ms": 1000 * (marks["last_byte"] - marks["start"]),
        "timings_ms": t,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--mbps", type=float, nargs="+", default=[0, 1000], help="link speeds; 0 = unpaced loopback")
    ap.add_argument("--repeat", type=int, default=3, help="requests per setting, on and off in turns")
    ap.add_argument("--device", default="cpu", help="the services' KITSEG_DEVICE (cpu, cuda)")
    ap.add_argument("--precision", default="auto", help="the services' KITSEG_PRECISION (auto, fp32, bf16)")
    ap.add_argument(
        "--fresh",
        action="store_true",
        help="a fresh pair of services for every request (each request is its process's first); "
        "default: both answer one request first, then take all of them",
    )
    ap.add_argument(
        "--mirror",
        action="store_true",
        help="test-time mirroring on, as the service's default KITSEG_MIRROR=true (default: single pass)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "upload.json")
    ap.add_argument("--no-docs", action="store_true")
    add_label_argument(ap, "Decoding during the upload")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="kitseg-bench-") as tmpdir:
        tmp = Path(tmpdir)
        body = _body(render(a.slices, "one", tmp).read_bytes())
        servers: dict[bool, tuple[subprocess.Popen[bytes], str]] = {}
        engine: dict[bool, str] = {}  # precision and backend, as /model reports them

        def start() -> None:
            for decode in (True, False):
                servers[decode] = _serve(decode, tmp, a.device, a.precision, a.mirror)
                card = httpx.get(f"{servers[decode][1]}/model").json()
                engine[decode] = f"{card['precision']} {card['backend']}"
            if not a.fresh:
                for proc, url in servers.values():  # one request each first: allocator and thread pools
                    _send(url, body, 0, proc.pid)

        def stop() -> None:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(60)
            servers.clear()

        try:
            if not a.fresh:
                start()
            for mbps in a.mbps:
                runs: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
                for _ in range(a.repeat):
                    if a.fresh:
                        start()
                    for decode, (proc, url) in servers.items():
                        run = _send(url, body, mbps, proc.pid)
                        runs[decode].append(run)
                        print(json.dumps({"mbps": mbps, "decode": decode, **run}))
                    if a.fresh:
                        stop()
                for decode, rs in runs.items():

                    def each(key: str, rs: list[dict[str, Any]] = rs) -> list[int]:
                        return [round(float(r[key])) for r in rs]

                    rows.append(
                        {
                            "mbps": mbps,
                            "decode_during_upload": decode,
                            "fresh_processes": a.fresh,
                            "mirror": a.mirror,
                            "upload_mb": len(body) / 2**20,
                            "slices": a.slices,
                            "runs": rs,
                            **{
                                f"{k}_of_each": each(k)
                                for k in ("after_upload_ms", "non_model_after_upload_ms", "wall_ms", "upload_ms")
                            },
                            "decompress_parse_ms_of_each": [round(r["timings_ms"]["decompress_parse"]) for r in rs],
                            "rss_growth_of_each": [round(float(r["rss_growth_bytes_per_voxel"]), 2) for r in rs],
                            "non_model_share_after_upload_of_each": [
                                round(float(r["non_model_after_upload_ms"]) / float(r["after_upload_ms"]), 3)
                                for r in rs
                            ],
                        }
                    )
        finally:
            stop()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rows, indent=2))
    if a.no_docs:
        return 0

    def med(xs: list[float]) -> float:
        return float(statistics.median(xs))

    (model,) = set(engine.values())
    heading = (
        f"## {section_title(a.label, 'Decoding during the upload')}"
        + (", first requests of fresh processes" if a.fresh else "")
        + f" (POST /segment over 127.0.0.1, {a.device}, {model}, {'mirrored' if a.mirror else 'single pass'})"
    )
    md = [
        heading,
        "",
        f"Machine: {machine_line(machine())}; model stage in {model} (the services' `/model`).",
        "",
        f"`python benchmarks/bench_upload.py`: the {rows[0]['upload_mb']:.1f} MB upload of {a.slices} slices to two "
        f"services, decoding on and off, in turns, {a.repeat} requests each per link speed (0 = unpaced loopback), "
        + ("each the first request of a fresh pair of services. " if a.fresh else "after one request each. ")
        + "Medians in ms, each request's figure in brackets. *After upload*: from the client's last byte to the "
        "response; *non-model*: that less the server's model stage, which swings by 10 % between requests here. "
        "Peak RSS growth: the server process's high-water mark during the request over its RSS before it.",
        "",
        "| link Mbit/s | decoding during upload | after upload | non-model after upload | non-model share | "
        "wall (upload included) | upload | server decompress+parse | peak RSS growth, bytes per voxel |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(key: str, v: float) -> str:
        if "rss" in key:
            return f"{v:.1f}"
        return f"{100 * v:.0f} %" if "share" in key else f"{v:.0f}"

    for r in rows:
        cells = []
        for k in (
            "after_upload_ms",
            "non_model_after_upload_ms",
            "non_model_share_after_upload",
            "wall_ms",
            "upload_ms",
            "decompress_parse_ms",
            "rss_growth",
        ):
            xs = r[f"{k}_of_each"]
            cells.append(f"{fmt(k, med(xs))} ({', '.join(fmt(k, x) for x in xs)})")
        md.append(f"| {r['mbps']:.0f} | {'on' if r['decode_during_upload'] else 'off'} | " + " | ".join(cells) + " |")
    update_section(ROOT / "docs" / "benchmarks.md", heading, "\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
