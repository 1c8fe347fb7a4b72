"""``kitseg-predict``: the service's engine offline, over one NIfTI file or a folder of them.

Writes ``<name>_mask.nii.gz`` for each input plus ``statistics.json`` and ``statistics.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from app.settings import DEMO_CHECKPOINT
from segcore.errors import KitsegError
from segcore.inference import Engine
from segcore.io import load_volume, save_mask
from segcore.ort import BACKENDS
from segcore.stats import compute_statistics


def _inputs(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith((".nii", ".nii.gz")))
    return [path]


def _stem(p: Path) -> str:
    name = p.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return p.stem


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kitseg-predict", description=__doc__)
    ap.add_argument("input", type=Path, help="a .nii/.nii.gz file or a folder searched recursively")
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--checkpoint", type=Path, default=None, help="checkpoint; default: the bundled demo model")
    ap.add_argument("--device", default="auto", help="auto|cpu|cuda")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    ap.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="auto: ONNX Runtime for fp32 on CPU when installed (kitseg[onnx]), torch otherwise",
    )
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--mirror",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="test-time mirroring: average with the left-right flipped input (2x model time)",
    )
    ap.add_argument(
        "--body-crop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the network only on the box around the body (above the checkpoint's lower HU clip) plus a "
        "margin; outside it is background",
    )
    ap.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default="off",
        help="torch.compile the network before the first volume (the same masks; 10-40 s of compiling on a "
        "2-core CPU, so it pays off over dozens of volumes). auto: on for torch bf16 on CPU with a C++ compiler, "
        "as the service does",
    )
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    ckpt = a.checkpoint or DEMO_CHECKPOINT
    if a.checkpoint is None:
        print("using the bundled demo model (synthetic phantoms; not for clinical use)", file=sys.stderr)
    engine = Engine.from_checkpoint(
        str(ckpt),
        device=a.device,
        batch_size=a.batch_size,
        precision=a.precision,
        mirror=a.mirror,
        backend=a.backend,
        body_crop=a.body_crop,
        compile=a.compile,
    )
    if a.compile != "off":
        engine.warmup()
    files = _inputs(a.input)
    if not files:
        print(f"no .nii or .nii.gz files under {a.input}", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    failures = 0
    for f in tqdm(files, desc="segment", unit="vol"):
        t0 = time.perf_counter()
        try:
            vol = load_volume(f)
            pred = engine.predict(vol)
        except KitsegError as e:
            failures += 1
            tqdm.write(f"skip {f}: {e}")
            results.append({"input": str(f), "error": str(e)})
            continue
        stem = _stem(f)
        mask_path = a.out / f"{stem}_mask.nii.gz"
        save_mask(pred.mask, vol, mask_path)
        classes = compute_statistics(pred.mask, vol, engine.meta.labels, pred.confidence, pred.box)
        results.append(
            {"input": str(f), "mask": str(mask_path), "seconds": time.perf_counter() - t0, "classes": classes}
        )
        for c in classes:
            rows.append(
                {
                    "input": str(f),
                    "label": c["label"],
                    "name": c["name"],
                    "present": c["present"],
                    "voxels": c["voxels"],
                    "volume_ml": round(c["volume_ml"], 3),
                    "components": c["components"],
                    "mean_confidence": None if c["mean_confidence"] is None else round(c["mean_confidence"], 4),
                    "max_axial_diameter_mm": c.get("max_axial_diameter_mm"),
                }
            )
    (a.out / "statistics.json").write_text(json.dumps({"checkpoint": str(ckpt), "results": results}, indent=2))
    with open(a.out / "statistics.csv", "w", newline="") as fh:
        fields = [
            "input",
            "label",
            "name",
            "present",
            "voxels",
            "volume_ml",
            "components",
            "mean_confidence",
            "max_axial_diameter_mm",
        ]
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    print(f"segmented {len(files) - failures}/{len(files)} volumes into {a.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
