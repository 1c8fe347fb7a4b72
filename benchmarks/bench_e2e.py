"""End to end and memory: one POST /segment per volume size (512x512xN int16 .nii.gz), each in a
fresh process so that its peak RSS is its own. Reports the server-side stage timings
(receive, decompress+parse, preprocess, model, postprocess, statistics, encode, write) and the
peak-RSS growth per input voxel, which must stay a small constant (no classes x voxels floats).
The worker decompresses the upload here (``KITSEG_DECODE_DURING_UPLOAD=false``), as before
session 18; ``bench_upload.py`` measures what decoding during the upload saves over a socket.
Since session 18 the service's startup warm-up runs one whole job on a synthetic CT, so a
"first request" here comes after it (the tables in docs/benchmarks.md were made before).
The upload is one phantom abdomen over the N slices (``--volume tiled``: the volume used before
session 17, one thick-slice phantom repeated along the slices).
Each size runs ``--repeat`` times (3), each in its own process, and the table keeps the run with
the shortest server time: single timings on this shared machine swing by 2x in some stages.
Each process then sends the same upload ``--requests - 1`` more times (1): a second table gives
the fastest of those, the service as it runs once it has answered a request (its allocator and
thread pools warm); peak RSS is the first request's.

    python benchmarks/bench_e2e.py --slices 50 200 600

Writes benchmarks/results/e2e.json and the e2e section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # render() imports training

from segcore.options import BACKENDS  # noqa: E402

CHILD = r"""
import json, os, resource, sys, tempfile, time
from pathlib import Path
import numpy as np, nibabel as nib
n = int(sys.argv[1]); precision = sys.argv[2]; device = sys.argv[3]; mirror = sys.argv[4] == "1"; backend = sys.argv[5]; body_crop = sys.argv[6] == "1"; requests = int(sys.argv[7]); compile_ = sys.argv[9]
tmp = Path(tempfile.mkdtemp(prefix="kitseg-bench-"))
# The upload, rendered by the parent (so that rendering leaves nothing in this process's heap).
payload = Path(sys.argv[8]).read_bytes()
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
from fastapi.testclient import TestClient
from app.main import create_app
from app.settings import Settings
# Decoding during the upload is off here: the test client hands the whole body over at once, so
# the decoding would move in front of the handler, out of the stage timings, without overlapping
# anything. What it saves over a socket is bench_upload.py's to measure.
app = create_app(Settings(result_dir=tmp / "results", device=device, precision=precision, mirror=mirror, backend=backend, body_crop=body_crop, log_level="WARNING", decode_during_upload=False, compile=compile_))
t_start = time.perf_counter()
with TestClient(app) as c:
    c.get("/ready")
    startup_s = time.perf_counter() - t_start  # loading, the warm-up job and any compiling
    backend = app.state.worker.engine.backend  # what "auto" resolved to
    compiled = app.state.worker.engine.compiled
    base = rss_mb()
    # Reset the high-water mark so the peak is this request's (Linux >= 4.0).
    open("/proc/self/clear_refs", "w").write("5")
    t = time.perf_counter()
    r = c.post("/segment", files={"file": ("ct.nii.gz", payload)})
    wall = time.perf_counter() - t
    assert r.status_code == 200, r.text
    peak = max(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
    res = r.json()
    later = []  # the same upload again: a service that has already answered one request
    for _ in range(requests - 1):
        r2 = c.post("/segment", files={"file": ("ct.nii.gz", payload)})
        assert r2.status_code == 200, r2.text
        later.append(r2.json()["timings_ms"])
import shutil; shutil.rmtree(tmp, ignore_errors=True)  # the spool and the result
print(json.dumps({"slices": n, "voxels": 512 * 512 * n, "upload_mb": len(payload) / 2**20, "wall_s": wall,
                  "baseline_rss_mb": base, "peak_rss_mb": peak, "timings_ms": res["timings_ms"], "later_timings_ms": later, "precision": precision, "mirror": mirror, "backend": backend, "body_crop": body_crop, "compiled": compiled, "startup_s": startup_s}))
"""


def add_label_argument(ap: argparse.ArgumentParser, plain: str) -> None:
    """``--label``: a prefix for a benchmark's docs section heading (see :func:`section_title`)."""
    ap.add_argument(
        "--label",
        default="",
        help="prefix for the docs section's heading, so that runs on different machines keep their own "
        f"sections (for example 'Session 32, AVX-512 BF16 CPU: '); default: the plain '{plain}'",
    )


def section_title(label: str, plain: str) -> str:
    """``plain`` (a heading's title, capitalised), or ``label`` followed by it in lower case."""
    return f"{label}{plain[0].lower()}{plain[1:]}" if label else plain


def update_section(doc: Path, heading: str, block: str) -> None:
    """Replace the section of ``doc`` that starts with ``heading`` (up to the next ``## ``), or append it."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n\nWritten by the scripts in `benchmarks/`.\n"
    start = text.find(heading)
    block = block.rstrip() + "\n"
    if start >= 0:
        end = text.find("\n## ", start + 3)
        text = text[:start] + block + (text[end:] if end >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + block
    doc.write_text(text)


def render(n: int, volume: str, folder: Path) -> Path:
    """A phantom 512x512xN int16 CT in the KiTS IPL layout (``.nii.gz``); returns its path.

    ``one``: one abdomen over the N slices (``make_phantom(slices=N)``: 0.76 mm slices at 200).
    ``tiled``: the volume used before session 17, one phantom of 2.5-5 mm slices repeated along
    the slices (at 200, four bodies whose kidneys are copies of each other, so the component
    filter breaks ties; written with 3 mm slices).
    """
    import numpy as np

    from training.datasets import write_kits_case
    from training.synth import make_phantom

    rng = np.random.default_rng(0)
    if volume == "one":
        hu, _, sp = make_phantom(rng, inplane=512, slices=n)
        spacing = (sp[0], 0.78, 0.78)
    else:
        hu, _, _ = make_phantom(rng, inplane=512)
        hu = np.concatenate([hu] * int(np.ceil(n / hu.shape[0])))[:n]
        spacing = (3.0, 0.78, 0.78)
    write_kits_case(folder / f"case_{n}", hu, None, spacing)
    return folder / f"case_{n}" / "imaging.nii.gz"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, nargs="+", default=[50, 200, 600])
    ap.add_argument("--repeat", type=int, default=3, help="fresh processes per size; the fastest is kept")
    ap.add_argument(
        "--requests",
        type=int,
        default=2,
        help="requests per process: the first is the main table, the rest the warm one",
    )
    ap.add_argument(
        "--volume",
        choices=["one", "tiled"],
        default="one",
        help="one: one abdomen over the N slices (default); tiled: one 2.5-5 mm phantom repeated "
        "along the slices, the volume before session 17 (it writes the same docs section: add "
        "--no-docs and --out to keep the table)",
    )
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto (the service's KITSEG_DEVICE)")
    ap.add_argument(
        "--mirror",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="KITSEG_MIRROR; off by default here: one forward per slice is the harder test of the "
        "non-model share (mirroring doubles the model column)",
    )
    ap.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="KITSEG_BACKEND; a non-auto choice gets its own section (auto: onnxruntime on CPU when installed)",
    )
    ap.add_argument(
        "--body-crop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="KITSEG_BODY_CROP (on by default, as in the service); --no-body-crop gets its own section",
    )
    ap.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "on", "off"],
        help="KITSEG_COMPILE; a non-auto choice gets its own section (auto: on for torch bf16 on CPU)",
    )
    ap.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/e2e[-mirror][-BACKEND][-whole-slices].json"
    )
    ap.add_argument("--no-docs", action="store_true", help="write the JSON only, leave docs/benchmarks.md alone")
    a = ap.parse_args()
    if a.out is None:
        suffix = ("-mirror" if a.mirror else "") + ("" if a.backend == "auto" else f"-{a.backend}")
        suffix += "" if a.body_crop else "-whole-slices"
        suffix += "" if a.compile == "auto" else f"-compile-{a.compile}"
        a.out = ROOT / "benchmarks" / "results" / f"e2e{suffix}.json"
    rows = []
    with tempfile.TemporaryDirectory(prefix="kitseg-bench-") as tmp:
        for n in a.slices:
            upload = render(n, a.volume, Path(tmp))
            args = [str(n), a.precision, a.device, str(int(a.mirror)), a.backend, str(int(a.body_crop))]
            runs = []
            for _ in range(a.repeat):
                r = subprocess.run(
                    [sys.executable, "-c", CHILD, *args, str(a.requests), str(upload), a.compile],
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                )
                if r.returncode != 0:
                    print(r.stderr[-3000:], file=sys.stderr)
                    return 1
                run = json.loads(r.stdout.strip().splitlines()[-1])
                run["rss_growth_bytes_per_voxel"] = (
                    (run["peak_rss_mb"] - run["baseline_rss_mb"]) * 2**20 / run["voxels"]
                )
                t = run["timings_ms"]
                run["server_ms"] = t["total"] - t.get("receive", 0)
                run["non_model_fraction"] = 1 - t["model"] / t["total"]
                runs.append(run)
                print(json.dumps(run))
            row = min(runs, key=lambda x: x["server_ms"])
            row["server_ms_of_each_run"] = [round(x["server_ms"]) for x in runs]
            later = [t for x in runs for t in x["later_timings_ms"]]
            if later:
                row["warm_timings_ms"] = min(later, key=lambda t: t["total"] - t.get("receive", 0))
                row["warm_server_ms_of_each"] = [round(t["total"] - t.get("receive", 0)) for t in later]
            row["volume"] = a.volume
            rows.append(row)
            upload.unlink()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rows, indent=2))
    stages = [
        "receive",
        "decompress_parse",
        "preprocess",
        "model",
        "postprocess",
        "statistics",
        "encode",
        "write",
        "total",
    ]
    # The CPU table keeps its own section; a GPU run and a mirrored run each get another one
    # (headings that are not prefixes of each other: update_section finds the first match).
    heading = "## Mirrored end to end" if a.mirror else "## End to end"
    if a.backend != "auto":
        heading = f"## Backend {a.backend}: " + heading.removeprefix("## ").lower()
    if not a.body_crop:
        heading = "## Whole slices (no body crop): " + heading.removeprefix("## ").lower()
    if a.compile != "auto":
        heading = f"## Compile {a.compile}: " + heading.removeprefix("## ").lower()
    if a.device != "cpu":
        heading += f" on {a.device}"
    backends = ", ".join(sorted({r["backend"] for r in rows}))
    compiled = "compiled" if all(r.get("compiled") for r in rows) else "eager"
    startup = ", ".join(f"{r['startup_s']:.0f}" for r in rows if "startup_s" in r)
    md = [
        f"{heading} (POST /segment, {a.device}, precision {a.precision}, backend {a.backend} = {backends}, compile {a.compile} = {compiled}, mirror {'on' if a.mirror else 'off'}, body crop {'on' if a.body_crop else 'off'})",
        "",
        "| slices | upload MB | "
        + " | ".join(f"{s} ms" for s in stages)
        + " | server ms | non-model share | peak RSS growth (bytes/voxel) |",
        "|---" * (len(stages) + 5) + "|",
    ]

    def cells(t: dict[str, float]) -> str:
        """The stage columns, server ms and non-model share of one request's timings."""
        stage_ms = " | ".join(f"{t.get(s, 0):.0f}" for s in stages)
        return f"{stage_ms} | {t['total'] - t.get('receive', 0):.0f} | {1 - t['model'] / t['total']:.0%}"

    for r in rows:
        md.append(
            f"| {r['slices']} | {r['upload_mb']:.1f} | {cells(r['timings_ms'])} | {r['rss_growth_bytes_per_voxel']:.1f} |"
        )
    md += [
        "",
        "The upload: "
        + (
            "one phantom abdomen over the N slices (`make_phantom(slices=N)`; at 200, 0.76 mm slices)"
            if a.volume == "one"
            else "one phantom of 2.5-5 mm slices repeated along the slices, written as 3 mm (`--volume tiled`)"
        )
        + ", 512x512 int16, KiTS19 layout (IPL), gzip.",
        "",
        f"Each row is the fastest of {a.repeat} requests, each in a fresh process (server ms of each: "
        + "; ".join(f"{r['slices']} slices {r['server_ms_of_each_run']}" for r in rows)
        + f"). Start-up of the kept processes, warm-up and any compiling included: {startup} s.",
    ]
    warm = [r for r in rows if "warm_timings_ms" in r]
    if warm:
        md += [
            "",
            "The same upload again, in the same process (the service once it has answered a request):",
            "",
            "| slices | " + " | ".join(f"{s} ms" for s in stages) + " | server ms | non-model share |",
            "|---" * (len(stages) + 3) + "|",
        ]
        for r in warm:
            md.append(f"| {r['slices']} | {cells(r['warm_timings_ms'])} |")
        md += [
            "",
            "Each row is the fastest of those requests (server ms of each: "
            + "; ".join(f"{r['slices']} slices {r['warm_server_ms_of_each']}" for r in warm)
            + ").",
        ]
    if not a.no_docs:
        update_section(ROOT / "docs" / "benchmarks.md", heading + " (", "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
