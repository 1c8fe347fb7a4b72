"""Preprocessing for training: the cache a first run builds, against the way it was built before.

Each training case is read, reoriented, resampled in-plane to the model grid and normalised once,
into the memory-mapped cache (``training.datasets.CaseCache``); for KiTS19's 210 cases (45,000
slices of 512x512) that is the minutes before the first step, while every other DDP rank waits.

Two measurements, each against a baseline run in the same process:

1. Labels. ``preprocess_case`` resamples labels as one-hot maps (bilinear, then argmax, the
   nnU-Net way). Baseline: the code before session 26, which made the one-hot maps of every
   slice from int64 labels and took ``argmax(1)`` (on torch 2.13's CPU 10-50x slower than
   ``max(1).indices`` along the class axis). Now: only slices with foreground are resampled, the
   maps come straight from uint8 comparisons, and the argmax is ``max``'s indices. The labels
   must come out identical; the script stops otherwise.
2. The cache build (gzip read, preprocessing, ``.npy`` write) in the calling process against
   ``--cache-workers`` processes, in turns, on fresh cache folders.

    python benchmarks/bench_preprocess.py --cases 4 --slices 200

Writes benchmarks/results/preprocess.json and the section "Preprocessing for training" of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_e2e import update_section  # noqa: E402
from benchmarks.bench_engine import machine, machine_line  # noqa: E402
from segcore.io import load_labels, load_volume  # noqa: E402
from segcore.preprocessing import (  # noqa: E402
    PreprocessConfig,
    canonical_info,
    canonical_view,
    model_grid,
    preprocess_case,
    resample_slices,
)
from training.datasets import CaseCache, available_cores, find_cases, write_kits_case  # noqa: E402
from training.synth import make_phantom  # noqa: E402


def labels_before(label: np.ndarray, affine: np.ndarray, cfg: PreprocessConfig, num_classes: int = 3) -> np.ndarray:
    """The label half of ``preprocess_case`` as it was before session 26: every slice, int64
    one-hot maps, ``argmax(1)``."""
    canon = canonical_info(affine, label.shape)  # type: ignore[arg-type]
    lab_v = canonical_view(label, canon)
    z, y, x = canon.shape_zyx
    size = model_grid((y, x), (canon.spacing_zyx[1], canon.spacing_zyx[2]), cfg)
    out = np.empty((z, *size), dtype=np.uint8)
    for k0 in range(0, z, 32):
        k1 = min(z, k0 + 32)
        lab = torch.from_numpy(np.ascontiguousarray(lab_v[k0:k1]).astype(np.int64))
        onehot = F.one_hot(lab.clamp_max(num_classes - 1), num_classes).permute(0, 3, 1, 2).float()
        onehot = resample_slices(onehot, size, antialias=cfg.antialias)
        out[k0:k1] = onehot.argmax(1).numpy().astype(np.uint8)
    return out


def _timed(fn, *args):  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--slices", type=int, default=200, help="slices per phantom (512x512 each)")
    ap.add_argument("--spacing", type=float, default=2.0, help="the model grid's in-plane spacing, mm")
    ap.add_argument("--repeat", type=int, default=2, help="turns of each cache build")
    ap.add_argument("--cache-workers", type=int, help="processes for the pooled build (default: min(8, cores))")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "preprocess.json")
    ap.add_argument("--no-docs", action="store_true", help="write the JSON only, leave docs/benchmarks.md alone")
    a = ap.parse_args()
    workers = a.cache_workers or min(8, available_cores())
    cfg = PreprocessConfig(target_spacing_mm=(a.spacing, a.spacing))
    tmp = Path(tempfile.mkdtemp(prefix="kitseg-bench-pp-"))
    try:
        for i in range(a.cases):
            hu, seg, sp = make_phantom(np.random.default_rng(200 + i), inplane=512, slices=a.slices)
            write_kits_case(tmp / "data" / f"case_{i:05d}", hu, seg, sp)
        cases = find_cases(tmp / "data")
        slices = 0
        rows = []
        for c in cases:
            assert c.image is not None and c.label is not None
            vol = load_volume(c.image)
            lab, _ = load_labels(c.label)
            slices += vol.shape[0]
            t_img, _ = _timed(preprocess_case, vol.data, vol.affine, None, cfg, 3)
            t_before, before = _timed(labels_before, lab, vol.affine, cfg)
            t_now, now = _timed(preprocess_case, vol.data, vol.affine, lab, cfg, 3)
            if not np.array_equal(before, now.label):
                print(f"{c.case_id}: the labels differ from the code before", file=sys.stderr)
                return 1
            fg = float(np.mean([(lab[k] > 0).any() for k in range(lab.shape[0])]))
            rows.append(
                {
                    "case": c.case_id,
                    "slices": vol.shape[0],
                    "fg_slices": fg,
                    "image_s": t_img,
                    "labels_before_s": t_before,
                    "case_now_s": t_now,
                }
            )
        img = sum(r["image_s"] for r in rows)
        before_s = img + sum(r["labels_before_s"] for r in rows)
        now_s = sum(r["case_now_s"] for r in rows)
        builds: dict[str, list[float]] = {"in_process": [], "pool": []}
        for _ in range(a.repeat):
            for name, w in (("in_process", 0), ("pool", workers)):
                folder = tmp / f"cache-{name}"
                shutil.rmtree(folder, ignore_errors=True)
                t, n = _timed(CaseCache(folder, cfg, 3).fill, cases, w)
                assert n == len(cases)
                builds[name].append(t)
        res = {
            "machine": machine(),
            "cases": rows,
            "slices": slices,
            "spacing_mm": a.spacing,
            "preprocess_before_s": before_s,
            "preprocess_now_s": now_s,
            "labels_identical": True,
            "cache_build_s": builds,
            "cache_workers": workers,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))
    best = {k: min(v) for k, v in builds.items()}
    fg = np.mean([r["fg_slices"] for r in rows])
    md = [
        f"## Preprocessing for training ({a.cases} phantoms of {a.slices} 512x512 slices, {a.spacing} mm model grid)",
        "",
        f"Machine: {machine_line(res['machine'])}.",
        "",
        "`python benchmarks/bench_preprocess.py`: `preprocess_case` (reorient, resample, normalise; labels as "
        "resampled one-hot maps) against its label code before session 26 (every slice's int64 one-hot maps "
        f"and `argmax(1)`), and the cache build in the calling process against {workers} processes "
        f"(`--cache-workers`), best of {a.repeat} in turns. {fg:.0%} of the phantoms' slices hold kidney. "
        "The labels were identical on every case.",
        "",
        "| step | before | now | ratio |",
        "|---|---|---|---|",
        f"| `preprocess_case`, all {slices} slices | {before_s:.2f} s ({1000 * before_s / slices:.1f} ms/slice) | "
        f"{now_s:.2f} s ({1000 * now_s / slices:.1f} ms/slice) | **{before_s / now_s:.2f}x** |",
        f"| cache build (read, preprocess, write) | {best['in_process']:.2f} s in the process | "
        f"{best['pool']:.2f} s in {workers} processes | **{best['in_process'] / best['pool']:.2f}x** |",
    ]
    if not a.no_docs:
        update_section(ROOT / "docs" / "benchmarks.md", "## Preprocessing for training", "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
