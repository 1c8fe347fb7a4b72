"""``kitseg-train`` / ``python -m training``: make phantoms, synthesize CT for label maps, train,
and evaluate a checkpoint. Every subcommand has ``--dry-run``, a tiny version that CI runs.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import multiprocessing
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from segcore.options import PRECISIONS, add_engine_arguments, engine_options, int_from

log = logging.getLogger("kitseg.train")
# Workers are spawned, not forked: forking after torch has started its OpenMP threads deadlocks.
_SPAWN = multiprocessing.get_context("spawn")


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _float_where(ok: Callable[[float], bool], rule: str) -> Callable[[str], float]:
    """argparse type for a number ``ok`` accepts (NaN fails every comparison, so every rule
    refuses it); otherwise the error says it "must be ``rule``"."""

    def parse(text: str) -> float:
        v = _number(text)
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return v

    return parse


_INF = float("inf")
_positive = _float_where(lambda v: 0.0 < v < _INF, "a finite number > 0")  # a rate, a time
_share = _float_where(lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
_fraction = _float_where(lambda v: 0.0 < v < 1.0, "between 0 and 1 (exclusive)")
_spacing = _float_where(lambda v: 0.0 <= v < _INF, "a spacing >= 0 mm (0: native)")  # in-plane, mm
_volume_ml = _float_where(lambda v: 0.0 <= v < _INF, "a finite volume >= 0 mL")


def _volumes(text: str) -> tuple[float, ...]:
    """argparse type for a comma-separated list of volumes in mL (each finite and >= 0)."""
    values = tuple(_volume_ml(t.strip()) for t in text.split(",") if t.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"no volume in {text!r}")
    return values


_ema_decay = _float_where(lambda v: 0.0 <= v < 1.0, "in [0, 1)")  # a moving-average decay


def _in_slices(text: str) -> int:
    """argparse type for the slices a model takes: 1, or 2k+1 (the slice and k on each side)."""
    v = int_from(1)(text)
    if v % 2 == 0:
        raise argparse.ArgumentTypeError(f"must be odd (1, or 2k+1 for k neighbours on each side), got {text}")
    return v


def _case_range(text: str) -> tuple[int, int]:
    """argparse type for ``lo:hi``, the case numbers lo <= n < hi."""
    try:
        lo, hi = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be lo:hi, case numbers from lo to hi - 1 (e.g. 0:150), got {text!r}"
        ) from None
    if not 0 <= lo < hi:
        raise argparse.ArgumentTypeError(f"must be lo:hi with 0 <= lo < hi, got {text}")
    return lo, hi


# ---------------------------------------------------------------- phantoms
def _one_phantom(args: tuple[int, str, int, bool, int]) -> str:
    from training.datasets import write_kits_case
    from training.synth import make_phantom

    i, out, inplane, cysts, seed = args
    rng = np.random.default_rng((seed, i))
    hu, seg, sp = make_phantom(rng, inplane=inplane, cysts=cysts)
    case = f"case_{i:05d}"
    write_kits_case(Path(out) / case, hu, seg, sp)
    return case


def cmd_phantoms(a: argparse.Namespace) -> int:
    n, size = (3, 64) if a.dry_run else (a.n, a.size)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(a.start + i, str(out), size, a.cysts, a.seed) for i in range(n)]
    t0 = time.perf_counter()
    if a.workers > 1:
        with ProcessPoolExecutor(a.workers, mp_context=_SPAWN) as ex:
            list(tqdm(ex.map(_one_phantom, jobs), total=n, desc="phantoms"))
    else:
        for j in tqdm(jobs, desc="phantoms"):
            _one_phantom(j)
    print(f"wrote {n} KiTS19-layout phantom cases to {out} in {time.perf_counter() - t0:.1f}s")
    return 0


# ---------------------------------------------------------------- synth-ct
def _one_render(args: tuple[str, str, str, int]) -> str:
    import nibabel as nib

    from segcore.io import load_labels, save_image
    from segcore.preprocessing import canonical_info, canonical_view, from_canonical
    from training.synth import render_for_labels

    seg_path, case_id, out_dir, seed = args
    seg, affine = load_labels(seg_path)
    canon = canonical_info(affine, seg.shape)  # type: ignore[arg-type]
    seg_zyx = np.ascontiguousarray(canonical_view(seg, canon))
    # Seeded per case name (stable across processes), so re-running renders the same CT.
    rng = np.random.default_rng((seed, zlib.crc32(case_id.encode())))
    hu_zyx = render_for_labels(seg_zyx, canon.spacing_zyx, rng)
    hu = from_canonical(hu_zyx, canon)
    case_dir = Path(out_dir) / case_id
    case_dir.mkdir(parents=True, exist_ok=True)
    save_image(np.ascontiguousarray(hu), affine, case_dir / "imaging.nii.gz")
    # Copy the labels unchanged (uint8), same affine, so the case is self-contained.
    img = nib.load(seg_path)
    save_image(
        np.ascontiguousarray(np.asanyarray(img.dataobj).astype(np.uint8)), affine, case_dir / "segmentation.nii.gz"
    )
    return case_dir.name


def cmd_synth_ct(a: argparse.Namespace) -> int:
    if not a.dry_run:
        return _synth_ct(a, Path(a.labels))
    # Tiny and independent of ../shared: a label-only folder made from a 64x64 phantom, removed
    # afterwards (the rendered case goes to --out).
    from training.datasets import write_kits_case
    from training.synth import make_phantom

    with tempfile.TemporaryDirectory(prefix="kitseg-labels-") as tmp:
        _, seg, sp = make_phantom(np.random.default_rng(0), inplane=64)
        write_kits_case(Path(tmp) / "case_00000", None, seg, sp)
        return _synth_ct(a, Path(tmp))


def _synth_ct(a: argparse.Namespace, src: Path) -> int:
    from training.datasets import find_cases

    # Case folders, flat case_XXXXX_segmentation.nii.gz files (KiTS23's label-only download) or
    # an nnU-Net dataset's labelsTr/: each case's CT goes to OUT/<case>/imaging.nii.gz.
    cases = [c for c in find_cases(src, need_image=False, label_file=a.label_file) if c.label is not None]
    if a.cases:
        lo, hi = a.cases
        cases = [c for c in cases if (n := c.case_id.rpartition("_")[2]).isdigit() and lo <= int(n) < hi]
    if a.dry_run:
        cases = cases[:1]
    if not cases:
        print(f"no case_XXXXX/{a.label_file or 'segmentation.nii.gz'} found under {src}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(str(c.label), c.case_id, str(out), a.seed) for c in cases]
    t0 = time.perf_counter()
    if a.workers > 1:
        with ProcessPoolExecutor(a.workers, mp_context=_SPAWN) as ex:
            list(tqdm(ex.map(_one_render, jobs), total=len(jobs), desc="synth-ct"))
    else:
        for j in tqdm(jobs, desc="synth-ct"):
            _one_render(j)
    print(f"rendered CT for {len(jobs)} label maps into {out} in {time.perf_counter() - t0:.1f}s")
    return 0


# ---------------------------------------------------------------- train
def cmd_train(a: argparse.Namespace) -> int:
    from training.train import TrainConfig, train

    extra: dict[str, Any] = {"name": a.name}
    if a.dry_run and not a.out:
        # Nothing to keep: the phantoms and the run go to a temporary folder, removed afterwards.
        with tempfile.TemporaryDirectory(prefix="kitseg-dry-") as tmp:
            rc = cmd_train(argparse.Namespace(**{**vars(a), "out": str(Path(tmp) / "run")}))
        print("dry run: its temporary folder is removed again (--out keeps the run)")
        return rc
    if a.dry_run:
        # Data goes beside --out, so a caller (evaluate's dry run) finds it.
        tmp = Path(a.out).parent
        for i in range(3):
            _one_phantom((i, str(tmp / "data"), 64, a.kits23, 0))
        cfg = TrainConfig(
            data=str(tmp / "data"),
            out=a.out,
            epochs=2,
            iters_per_epoch=2,
            batch_size=2,
            patch=32,
            base_width=4,
            depth=3,
            in_slices=a.in_slices,
            kits23=a.kits23,
            val_fraction=0.34,
            target_spacing_mm=a.spacing if a.spacing > 0 else None,
            device=a.device,
            progress=False,
            extra=extra,
        )
    else:
        if not a.data or not a.out:
            print("train needs --data and --out (or --dry-run)", file=sys.stderr)
            return 2
        if a.fit_schedule and a.max_minutes is None:
            print("--fit-schedule fits the LR schedule to --max-minutes; give --max-minutes too", file=sys.stderr)
            return 2
        if not _fold_arguments_agree(a, a.val_cases, "--val-cases"):
            return 2
        cfg = TrainConfig(
            data=a.data,
            out=a.out,
            cache=a.cache,
            epochs=a.epochs,
            iters_per_epoch=a.iters,
            batch_size=a.batch_size,
            patch=a.patch,
            lr=a.lr,
            lr_schedule=a.lr_schedule,
            val_fraction=a.val_fraction,
            val_cases=a.val_cases.split(",") if a.val_cases else None,
            fold=a.fold,
            **({"folds": a.folds} if a.folds is not None else {}),
            splits=a.splits,
            seed=a.seed,
            device=a.device,
            amp=a.amp,
            workers=a.workers,
            cache_workers=a.cache_workers,
            max_minutes=a.max_minutes,
            fit_schedule=a.fit_schedule,
            resume=a.resume,
            kits23=a.kits23,
            label_file=a.label_file,
            base_width=a.base_width,
            depth=a.depth,
            block=a.block,
            in_slices=a.in_slices,
            target_spacing_mm=a.spacing if a.spacing > 0 else None,
            antialias=a.antialias,
            max_train_cases=a.max_train_cases,
            data_description=a.describe,
            progress=not a.no_progress,
            extra=extra,
            fg_fraction=a.fg_fraction,
            tumor_sampling=a.tumor_sampling,
            dice=a.dice,
            deep_supervision=a.deep_supervision,
            min_tumor_ml=a.min_tumor_ml,
            ema=a.ema,
            val_precision=a.val_precision,
            val_every=a.val_every,
            val_copies=not a.no_val_copies,
            dist_timeout_minutes=a.dist_timeout,
            memory_format=a.memory_format,
            tune_malloc=not a.no_tune_malloc,
            cudnn_benchmark=not a.no_cudnn_benchmark,
        )
    res = train(cfg)
    best = res["best"]
    if best:
        print(
            f"best: kidney Dice {best.get('val_kidney_dice', float('nan')):.4f}  tumor Dice "
            f"{best.get('val_tumor_dice', float('nan')):.4f}  composite {best.get('val_composite', float('nan')):.4f}  "
            f"(epoch {best.get('epoch')}, {res['elapsed_s']:.0f}s); checkpoints in {cfg.out}"
        )
    return 0


# ---------------------------------------------------------------- postprocess
def _train_tiny(a: argparse.Namespace, folder: Path) -> Path:
    """The dry-run training (a tiny model on tiny phantoms written to ``folder / "data"``) for the
    subcommands that need a checkpoint; returns its run folder, ``folder / "run"``."""
    run = folder / "run"
    cmd_train(
        argparse.Namespace(
            **{
                **vars(a),
                "dry_run": True,
                "out": str(run),
                "name": "dry-run",
                "in_slices": 1,
                "kits23": False,
                "spacing": 0,
                "device": "cpu",
            }
        )
    )
    return run


def cmd_postprocess(a: argparse.Namespace) -> int:
    if a.dry_run:
        # A tiny checkpoint in a temporary folder, rewritten there and loaded back; all removed afterwards.
        with tempfile.TemporaryDirectory(prefix="kitseg-dry-") as tmp_name:
            tmp = Path(tmp_name)
            run = _train_tiny(a, tmp)
            dry = {"checkpoint": [str(run / "best.safetensors")], "out": str(run / "post.safetensors")}
            if a.choose:
                dry["data"] = str(tmp / "data")  # chosen on the validation cases the tiny run recorded
            elif a.min_tumor_ml is None and a.kidney_filter is None:
                dry["min_tumor_ml"] = 0.5
            return _postprocess(argparse.Namespace(**{**vars(a), **dry}))
    return _postprocess(a)


def _postprocess(a: argparse.Namespace) -> int:
    checkpoints = [a.checkpoint] if isinstance(a.checkpoint, str) else a.checkpoint or []
    problem = None
    if not checkpoints or not a.out:
        problem = "postprocess needs --checkpoint and --out (or --dry-run)"
    elif a.choose and a.min_tumor_ml is not None:
        problem = "give --min-tumor-ml (the value to write) or --choose (choose it on validation cases), not both"
    elif not a.choose and a.min_tumor_ml is None and a.kidney_filter is None:
        problem = "give --choose (choose the post-processing on validation cases), or what to write: --min-tumor-ml, --kidney-filter"
    elif a.choose and not a.data:
        problem = "--choose needs --data, the dataset the checkpoint's validation cases are in"
    elif not a.choose and (a.data or a.cases or a.fold is not None):
        problem = "--data, --cases and --fold say which cases --choose scores; without --choose they do nothing"
    elif len(checkpoints) > 1 and (a.cases or a.fold is not None):
        problem = "several checkpoints are a cross-validation's folds, each scored on its own validation cases: no --cases or --fold"
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if not _fold_arguments_agree(a, a.cases, "--cases"):
        return 2
    outs = _postprocess_outputs(checkpoints, Path(a.out))  # checked before the scoring, made after it
    change: dict[str, Any] = {}
    if a.kidney_filter is not None:
        change["keep_largest"] = a.kidney_filter == "on"
    if a.min_tumor_ml is not None:
        change["min_tumor_ml"] = a.min_tumor_ml
    chosen_on = None
    if a.choose:
        (change["keep_largest"], change["min_tumor_ml"]), chosen_on = _choose_postprocessing(a, checkpoints)
    for ck, out in zip(checkpoints, outs, strict=True):
        out.parent.mkdir(parents=True, exist_ok=True)
        _rewrite_postprocessing(ck, out, change, chosen_on)
    return 0


def _postprocess_outputs(checkpoints: list[str], out: Path) -> list[Path]:
    """Where each rewritten checkpoint goes: ``out`` itself for one; for several, a file in the
    folder ``out`` named after its run folder and its own name (``kits19-fold0-best.safetensors``).
    Nothing is created here."""
    from training.train import ConfigError

    if len(checkpoints) == 1:
        return [out]
    names = [f"{Path(ck).resolve().parent.name}-{Path(ck).name}" for ck in checkpoints]
    if len(set(names)) < len(names):
        raise ConfigError(
            f"two checkpoints would be written to the same file in {out}: {names}; give each run its own folder"
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} must be a folder for several checkpoints")
    return [out / n for n in names]


def _choose_postprocessing(a: argparse.Namespace, checkpoints: list[str]) -> tuple[tuple[bool, float], dict[str, Any]]:
    """Score every candidate post-processing on held-out cases (one network run per case) and
    return the one to keep (:func:`training.train.best_postprocessing`) with what it was chosen on."""
    from segcore.checkpoint import check_ensemble, read_meta
    from segcore.inference import Engine
    from segcore.metrics import tumor_dice_by_size
    from training.datasets import find_cases, labelled, select_cases
    from training.train import best_postprocessing, choice_score, sweep_postprocessing

    # One choice for every fold: they must be one configuration, as an ensemble's members are.
    metas = list(map(read_meta, checkpoints))
    check_ensemble(
        [
            dataclasses.replace(
                m, postprocessing=dataclasses.replace(m.postprocessing, keep_largest=True, min_tumor_ml=0.0)
            )
            for m in metas
        ]
    )
    kits23_metrics = metas[0].model.num_classes == 4
    filters = (False, True) if a.kidney_filter is None else (a.kidney_filter == "on",)
    cases = labelled(find_cases(a.data, label_file=a.label_file), a.data, a.label_file)
    if a.cases:
        jobs = [(checkpoints[0], select_cases(cases, a.cases.split(","), a.data))]
    elif a.fold is not None:
        jobs = [(checkpoints[0], _fold_validation_cases(a, cases))]
    else:
        jobs = _held_out_jobs(checkpoints, cases, a.data)
    values = sorted({0.0, *a.candidates})
    rows: dict[tuple[bool, float], list[dict[str, Any]]] = {(f, v): [] for f in filters for v in values}
    for ck, mine in jobs:
        engine = Engine.from_checkpoint([ck], **engine_options(a))
        if a.compile != "off":
            engine.warmup()
        for k, got in sweep_postprocessing(engine, mine, values, filters, kits23_metrics, progress=True).items():
            rows[k] += got
    best = best_postprocessing(rows, a.min_gain)
    score = "KiTS23 score (Dice + Surface Dice) / 2" if kits23_metrics else "composite"
    lines = [
        "| kidney filter | min_tumor_ml | kidney Dice | tumor Dice | composite |"
        + (f" {score} |" if kits23_metrics else "")
        + " tumor Dice, a tumor < 10 mL | all >= 10 mL | tumor-free |",
        "|---|---|---|---|---|---|---|---|" + ("---|" if kits23_metrics else ""),
    ]
    scores: dict[str, float] = {}
    for (f, v), got in rows.items():
        mean = {k: float(np.mean([r[k] for r in got])) for k in ("kidney_dice", "tumor_dice", "composite")}
        chosen_by = float(np.mean([choice_score(r) for r in got]))
        scores[f"{'on' if f else 'off'} {v:g}"] = round(chosen_by, 6)
        size = tumor_dice_by_size(got)
        groups = " | ".join(
            "n/a" if (d := size[k]["tumor_dice"]) is None else f"{d:.4f} (n={size[k]['n']})"
            for k in ("small", "large", "tumor_free")
        )
        mark = " (chosen)" if (f, v) == best else ""
        lines.append(
            f"| {'on' if f else 'off'}{mark} | {v:g}{' (off)' if v == 0 else ''} | {mean['kidney_dice']:.4f} "
            f"| {mean['tumor_dice']:.4f} | {mean['composite']:.4f} |"
            + (f" {chosen_by:.4f} |" if kits23_metrics else "")
            + f" {groups} |"
        )
    n = len(rows[best])
    print("\n".join(lines))
    print(
        f"\nchosen: kidney filter {'on' if best[0] else 'off'}, min_tumor_ml {best[1]:g} mL over {n} held-out "
        f"case(s), step by step by the mean {score}: the filter only if it beats no filter, then the highest "
        f"min_tumor_ml (of equal ones the smallest), and 0 unless it beats 0; each by more than {a.min_gain:g}"
    )
    chosen_on = {
        "cases": [r["case"] for r in rows[best]],
        "score": score,
        "score_by_candidate": scores,
        "min_gain": a.min_gain,
        "checkpoints": len(checkpoints),
    }
    return best, chosen_on


def _rewrite_postprocessing(src: str, out: Path, change: dict[str, Any], chosen_on: dict[str, Any] | None) -> None:
    from segcore.checkpoint import load_checkpoint, read_meta, save_checkpoint

    model, meta = load_checkpoint(src)  # verifies the weights' sha256
    before = meta.postprocessing
    post = dataclasses.replace(before, **change)
    record: dict[str, Any] = {
        "from": before.to_dict(),
        "to": post.to_dict(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if chosen_on is not None:
        record["chosen_on"] = chosen_on
    history = [*meta.provenance.get("postprocessing_changes", []), record]
    meta = dataclasses.replace(
        meta, postprocessing=post, provenance={**meta.provenance, "postprocessing_changes": history}
    )
    digest = save_checkpoint(out, model, meta)
    if read_meta(out).postprocessing != post:
        raise RuntimeError(f"{out} does not read back with the new post-processing")
    print(
        f"wrote {out}: post-processing {post.to_dict()} (was {before.to_dict()}); weights sha256 {digest[:12]}... "
        "unchanged"
    )


# ---------------------------------------------------------------- export
def cmd_export(a: argparse.Namespace) -> int:
    if a.dry_run:
        # A tiny checkpoint in a temporary folder, exported there and checked; all removed afterwards.
        with tempfile.TemporaryDirectory(prefix="kitseg-dry-") as tmp_name:
            run = _train_tiny(a, Path(tmp_name))
            return _export(argparse.Namespace(checkpoint=run / "best.safetensors", out=run / "model.onnx"))
    if not a.checkpoint or not a.out:
        print("export needs --checkpoint and --out (or --dry-run)", file=sys.stderr)
        return 2
    return _export(a)


def _export(a: argparse.Namespace) -> int:
    from segcore.checkpoint import read_meta
    from segcore.ort import ONNX_META_KEY, export_checkpoint

    try:
        diff = export_checkpoint(a.checkpoint, a.out)
    except ImportError as e:
        print(e, file=sys.stderr)
        return 2
    cfg = read_meta(a.checkpoint).model
    print(
        f"wrote {a.out}: input x (batch, {cfg.in_slices}, H, W) float32, H and W multiples of {cfg.multiple}; "
        f"output logits (batch, {cfg.num_classes}, H, W); the checkpoint's metadata under '{ONNX_META_KEY}'. "
        f"Largest logit difference from torch: {diff:.2g}"
    )
    return 0


# ---------------------------------------------------------------- check-data
def cmd_check_data(a: argparse.Namespace) -> int:
    if a.dry_run:
        with tempfile.TemporaryDirectory(prefix="kitseg-dry-") as tmp_name:
            data = Path(tmp_name) / "data"
            for i in range(2):
                _one_phantom((i, str(data), 48, False, 0))
            return _check_data(argparse.Namespace(**{**vars(a), "data": str(data), "dry_run": False}))
    if not a.data:
        print("check-data needs --data (or --dry-run)", file=sys.stderr)
        return 2
    return _check_data(a)


def _check_data(a: argparse.Namespace) -> int:
    from training.datasets import check_dataset

    report = check_dataset(a.data, 4 if a.kits23 else 3, a.label_file, progress=True, read_images=a.images)
    s = report["summary"]

    def spread(d: dict[str, float] | None, fmt: str = ".1f") -> str:
        return "-" if d is None else f"{d['min']:{fmt}} / {d['median']:{fmt}} / {d['max']:{fmt}}"

    print(
        f"{a.data}: {s['cases']} case(s), {s['labelled']} labelled, {s['imaging_only']} imaging only, "
        f"{s['labels_only']} label map(s) only\n"
        f"  orientations: {', '.join(f'{k} {v}' for k, v in sorted(s['orientations'].items())) or '-'}\n"
        f"  in-plane sizes: {', '.join(f'{k} {v}' for k, v in sorted(s['in_plane_sizes'].items())) or '-'}\n"
        f"  slices (min / median / max): {spread(s['slices'], '.0f')}\n"
        f"  slice thickness mm: {spread(s['slice_mm'], '.2f')}; in-plane spacing mm: {spread(s['in_plane_mm'], '.3f')}\n"
        f"  kidney region mL: {spread(s['kidney_ml'])}; tumor mL (cases with one): {spread(s['tumor_ml'])}\n"
        f"  tumor-free cases: {s['tumor_free']}; with a tumor under 10 mL: {s['with_a_tumor_under_10_ml']}; "
        f"with cysts: {s['with_cysts']}"
        + (f"\n  kidney region HU, each case's median: {spread(s['kidney_hu_median'], '.0f')}" if a.images else "")
    )
    for w in report["warnings"]:
        print(f"warning: {w}")
    for problem in report["problems"]:
        print(f"problem: {problem}", file=sys.stderr)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "dataset_check.json").write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {out / 'dataset_check.json'}")
    if report["problems"]:
        print(f"{len(report['problems'])} case(s) with problems: fix or remove them before training", file=sys.stderr)
        return 1
    print("no problems found")
    return 0


# ---------------------------------------------------------------- evaluate
def kits_table(rows: list[dict[str, Any]], summary: dict[str, float]) -> str:
    keys = ["kidney_dice", "tumor_dice", "composite", "pixel_accuracy", "all_background_accuracy"]
    keys += sorted(k for k in summary if k.startswith("kits23_"))
    head = "| case | " + " | ".join(keys) + " | seconds |"
    sep = "|" + "---|" * (len(keys) + 2)
    lines = [head, sep]
    for r in rows:
        lines.append(f"| {r['case']} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + f" | {r['seconds']:.1f} |")
    lines.append("| **mean** | " + " | ".join(f"**{summary[k]:.4f}**" for k in keys) + f" | {summary['seconds']:.1f} |")
    return "\n".join(lines)


def cmd_evaluate(a: argparse.Namespace) -> int:
    if not a.dry_run:
        return _evaluate(a)
    # A tiny model trained on tiny phantoms in a temporary folder, removed afterwards.
    with tempfile.TemporaryDirectory(prefix="kitseg-dry-") as tmp_name:
        tmp = Path(tmp_name)
        run = {"checkpoint": str(_train_tiny(a, tmp) / "best.safetensors"), "data": str(tmp / "data")}
        return _evaluate(argparse.Namespace(**{**vars(a), **run}))


def _evaluate(a: argparse.Namespace) -> int:
    from segcore.inference import Engine
    from training.datasets import find_cases, labelled, select_cases
    from training.train import evaluate_cases, score_predictions

    if sum(map(bool, (a.checkpoint, a.predictions, a.held_out))) != 1 or not a.data:
        print(
            "evaluate needs --data and one of --checkpoint, --held-out or --predictions (or --dry-run)",
            file=sys.stderr,
        )
        return 2
    if a.held_out and (a.cases or a.fold is not None or a.limit):
        print(
            "--held-out scores each checkpoint on the cases it records: no --cases, --fold or --limit", file=sys.stderr
        )
        return 2
    if not _fold_arguments_agree(a, a.cases, "--cases"):
        return 2
    cases = labelled(find_cases(a.data, label_file=a.label_file), a.data, a.label_file)
    if a.cases:
        cases = select_cases(cases, a.cases.split(","), a.data)
    if a.fold is not None:
        cases = _fold_validation_cases(a, cases)
    if a.limit:
        cases = cases[: a.limit]
    if a.predictions:
        rows = score_predictions(cases, a.predictions, kits23_metrics=a.kits23, progress=True)
        return _report(a, rows, f"masks from {a.predictions}", {"predictions": a.predictions})
    # Each checkpoint with the cases it is scored on: with --held-out, the validation cases it
    # records (one checkpoint per cross-validation fold: every case by the fold that held it out).
    ensemble = [a.checkpoint] if isinstance(a.checkpoint, str) else a.checkpoint  # a dry run passes one
    jobs = [(ensemble, cases)] if ensemble else [([ck], mine) for ck, mine in _held_out_jobs(a.held_out, cases, a.data)]
    rows: list[dict[str, Any]] = []
    for checkpoints, mine in jobs:
        engine = Engine.from_checkpoint(
            checkpoints,
            **engine_options(a),
        )
        if a.compile != "off":
            engine.warmup()
        if a.min_tumor_ml is not None:
            post = dataclasses.replace(engine.meta.postprocessing, min_tumor_ml=a.min_tumor_ml)
            engine.meta = dataclasses.replace(engine.meta, postprocessing=post)
        with_kits23 = a.kits23 or engine.meta.model.num_classes == 4
        rows += evaluate_cases(engine, mine, kits23_metrics=with_kits23, progress=True)
        print(f"{' + '.join(checkpoints)}: {len(mine)} case(s), post-processing {engine.meta.postprocessing.to_dict()}")
    order = {c.case_id: i for i, c in enumerate(cases)}
    rows.sort(key=lambda r: order[r["case"]])
    source = f"{engine.backend}, precision {engine.precision}{', mirrored' if engine.mirror else ''}"
    if a.held_out:
        source += f", each case by the one of {len(jobs)} checkpoints that held it out"
    elif len(ensemble) > 1:
        source += f", an ensemble of {len(ensemble)} checkpoints"
    return _report(
        a,
        rows,
        source,
        {
            **(
                {"held_out": {ck[0]: [c.case_id for c in mine] for ck, mine in jobs}}
                if a.held_out
                else {
                    "checkpoint": ensemble[0] if len(ensemble) == 1 else ensemble,
                    "postprocessing": engine.meta.postprocessing.to_dict(),
                }
            ),
            "backend": engine.backend,
            "precision": engine.precision,
            "mirror": engine.mirror,
            "body_crop": engine.body_crop,
            "compiled": engine.compiled,
        },
    )


def _fold_validation_cases(a: argparse.Namespace, cases: list[Any]) -> list[Any]:
    """Fold ``--fold``'s validation cases among ``cases``: nnU-Net's folds for their ids (``--folds``
    of them), or those of ``--splits``."""
    from training.datasets import fold_cases, kfold_splits, read_splits

    ids = [c.case_id for c in cases]
    splits = read_splits(a.splits) if a.splits else kfold_splits(ids, *([a.folds] if a.folds else []))
    return fold_cases(cases, splits, a.fold, a.data)[1]


def _held_out_jobs(checkpoints: list[str], cases: list[Any], root: str) -> list[tuple[str, list[Any]]]:
    """Each checkpoint with the validation cases its training recorded (``provenance.val_cases``).
    A case held out by two of them, or by none that ``root`` has, is an error: a cross-validation
    result scores every case once, by the model that never trained on it."""
    from segcore.checkpoint import read_meta
    from training.datasets import DatasetError, select_cases

    owner: dict[str, str] = {}
    for ck in checkpoints:
        val = read_meta(ck).provenance.get("val_cases") or []
        if not val:
            raise DatasetError(f"{ck} records no validation cases (provenance.val_cases)")
        for case_id in val:
            if case_id in owner:
                raise DatasetError(f"{case_id} is held out by both {owner[case_id]} and {ck}")
            owner[case_id] = ck
    held = select_cases(cases, list(owner), root, "held-out case(s)")
    return [(ck, [c for c in held if owner[c.case_id] == ck]) for ck in checkpoints]


def _report(a: argparse.Namespace, rows: list[dict[str, Any]], source: str, how: dict[str, Any]) -> int:
    """Print the KiTS table of ``rows`` and write it under ``--out``; ``how`` says what made the masks."""
    from segcore.metrics import summarize, tumor_dice_by_size

    summary = summarize([{k: v for k, v in r.items() if k != "case"} for r in rows])
    table = kits_table(rows, summary)
    print(table)
    print(
        f"\nKiTS19: kidney Dice {summary['kidney_dice']:.4f}, tumor Dice {summary['tumor_dice']:.4f}, "
        f"composite {summary['composite']:.4f} over {len(rows)} cases "
        f"({source}; pixel accuracy {summary['pixel_accuracy']:.4f} vs "
        f"{summary['all_background_accuracy']:.4f} for all-background)"
    )
    by_size = tumor_dice_by_size(rows)
    print(
        "tumor Dice by the reference's tumors: "
        + "; ".join(
            f"{label} {'n/a' if (d := by_size[k]['tumor_dice']) is None else f'{d:.4f}'} (n={by_size[k]['n']})"
            for k, label in (("small", "a tumor < 10 mL"), ("large", "all >= 10 mL"), ("tumor_free", "tumor-free"))
        )
    )
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "kits_table.md").write_text(table + "\n")
        (out / "summary.json").write_text(
            json.dumps(
                {"summary": summary, "tumor_dice_by_size": by_size, "cases": rows, **how},
                indent=2,
            )
        )
        with open(out / "cases.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {out}/kits_table.md, summary.json, cases.csv")
    return 0


#: ``--label-file`` of train and evaluate
LABEL_FILE_HELP = (
    "each case folder's label file (default: segmentation.nii.gz as in KiTS19/23, else KiTS21's "
    "aggregated_MAJ_seg.nii.gz; e.g. aggregated_OR_seg.nii.gz for KiTS21's union). Cases without one "
    "(KiTS19's test cases 210-299) are left out"
)


#: ``--data`` of train and evaluate
DATA_HELP = (
    "the cases: a KiTS19/21/23-layout folder (case_XXXXX/imaging.nii.gz + segmentation.nii.gz), or an nnU-Net "
    "raw dataset (imagesTr/<case>_0000.nii.gz + labelsTr/<case>.nii.gz; given its imagesTs/ folder, the test "
    "split: imagesTs/ + labelsTs/)"
)


def _fold_arguments_agree(a: argparse.Namespace, cases: str | None, cases_flag: str) -> bool:
    """False, with the reason on stderr, when ``--fold``, ``--folds`` and ``--splits`` conflict with
    a list of cases or miss the fold they describe."""
    if a.fold is not None and cases:
        print(f"a fold names its validation cases: give --fold or {cases_flag}, not both", file=sys.stderr)
        return False
    if (a.splits or a.folds is not None) and a.fold is None:
        print("--splits and --folds describe cross-validation folds: say which with --fold", file=sys.stderr)
        return False
    return True


def _fold_arguments(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--fold",
        type=int_from(0),
        metavar="K",
        help=f"cross-validation: {what}. The folds are nnU-Net's own for the same case ids (the sorted ids "
        "shuffled with seed 12345, as its splits_final.json), unless --splits gives a file; a training run "
        "writes the split it used as OUT/splits_final.json",
    )
    p.add_argument(
        "--folds",
        type=int_from(2),
        help="how many folds --fold counts (default: nnU-Net's 5)",
    )
    p.add_argument("--splits", help="a splits_final.json (nnU-Net's format) to take --fold from")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kitseg-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    ph = sub.add_parser(
        "phantoms",
        help="write procedural KiTS19-layout phantom cases",
        description=(
            "Write N procedural abdomen phantoms (fat, muscle, spine, aorta, liver, spleen, two kidneys with cortex and "
            "medulla, 0-2 tumors of varied size/texture, some exophytic) as case_XXXXX/imaging.nii.gz + "
            "segmentation.nii.gz, shape (slices, H, W), orientation IPL."
        ),
    )
    ph.add_argument("--out", required=True, help="output folder")
    ph.add_argument("--n", type=int_from(1), default=40, help="number of cases (default 40)")
    ph.add_argument("--start", type=int_from(0), default=0, help="first case number")
    ph.add_argument("--size", type=int_from(32), default=256, help="in-plane matrix size (KiTS is 512; default 256)")
    ph.add_argument("--cysts", action="store_true", help="add cysts (label 3, KiTS21/23 style)")
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--workers", type=int_from(1), default=2, help="parallel processes")
    ph.add_argument("--dry-run", action="store_true", help="3 tiny 64x64 cases")
    ph.set_defaults(func=cmd_phantoms)

    sc = sub.add_parser(
        "synth-ct",
        help="render a plausible CT for each real KiTS label map",
        description=(
            "For each case_XXXXX/segmentation.nii.gz (or --label-file) under --labels, render imaging.nii.gz on the "
            "same grid (same affine) with a synthetic abdomen placed around the real kidneys, and copy the labels next "
            "to it as segmentation.nii.gz. Flat case_XXXXX_segmentation.nii.gz files and an nnU-Net dataset's "
            "labelsTr/ work too; each case goes to OUT/<case>/."
        ),
    )
    sc.add_argument("--labels", default="../shared/data/kits19-labels", help="folder of case_XXXXX/segmentation.nii.gz")
    sc.add_argument(
        "--label-file",
        help="the label file in each case folder (default: segmentation.nii.gz, else KiTS21's aggregated_MAJ_seg.nii.gz)",
    )
    sc.add_argument("--out", required=True, help="output folder (KiTS19 layout)")
    sc.add_argument("--cases", type=_case_range, help="range lo:hi of case numbers, e.g. 0:150 (lo <= n < hi)")
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--workers", type=int_from(1), default=2)
    sc.add_argument("--dry-run", action="store_true", help="one case (a phantom's labels if --labels is missing)")
    sc.set_defaults(func=cmd_synth_ct)

    tr = sub.add_parser(
        "train",
        help="train a U-Net (CPU, CUDA, or DDP under torchrun)",
        description=(
            "Train the 2D/2.5D U-Net with CE + Dice and Adam, validating on whole held-out volumes with the KiTS "
            "metrics each epoch. Writes best.safetensors, last.safetensors, last.state.pt, metrics.jsonl and curves.png. "
            "Multi-GPU/multi-process: torchrun --nproc-per-node N -m training train ..."
        ),
    )
    tr.add_argument("--data", help=DATA_HELP)
    tr.add_argument("--out", help="run folder")
    tr.add_argument("--cache", help="preprocessed cache folder (default OUT/cache)")
    tr.add_argument("--epochs", type=int_from(1), default=20)
    tr.add_argument("--iters", type=int_from(1), default=100, help="iterations per epoch")
    tr.add_argument("--batch-size", type=int_from(1), default=8)
    tr.add_argument("--patch", type=int_from(8), default=160, help="square training patch on the model grid")
    tr.add_argument("--lr", type=_positive, default=1e-3, help="Adam learning rate (the seed's 1e-3)")
    tr.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine")
    tr.add_argument("--val-fraction", type=_fraction, default=0.2, help="patients held out for validation")
    tr.add_argument("--val-cases", help="comma-separated case ids to validate on instead")
    _fold_arguments(tr, "train on fold K's training cases and validate on its validation cases")
    tr.add_argument("--max-train-cases", type=int_from(1))
    tr.add_argument(
        "--val-precision",
        default="fp32",
        choices=PRECISIONS,
        help="engine precision for validation",
    )
    tr.add_argument(
        "--val-every",
        type=int_from(1),
        default=1,
        metavar="N",
        help="validate on the whole validation volumes (and write last/best.safetensors) every N epochs and after "
        "the last; on a GPU, validating KiTS19-sized sets every epoch can take longer than the epoch (not with "
        "--fit-schedule)",
    )
    tr.add_argument(
        "--no-val-copies",
        action="store_true",
        help="gunzip each validation case every time it is validated, instead of validating from uncompressed "
        "copies made once under the cache folder (they take the uncompressed size: about 12 GB for KiTS19's "
        "validation cases)",
    )
    tr.add_argument(
        "--dist-timeout",
        type=_positive,
        default=30.0,
        metavar="MINUTES",
        help="under torchrun, how long a rank waits for the others in a collective before the run fails "
        "(NCCL's own default is 10)",
    )
    tr.add_argument("--fg-fraction", type=_share, default=0.67, help="share of patches centred on kidney/tumor")
    tr.add_argument(
        "--tumor-sampling",
        choices=["slice", "component"],
        default="slice",
        help="a tumor patch is centred on one of the case's tumor slices chosen uniformly, which "
        "favours large tumors (slice), or on one of its tumors (3D components) chosen uniformly "
        "(component; no better on the phantom development sets, docs/training.md)",
    )
    tr.add_argument(
        "--dice",
        choices=["batch", "sample", "both"],
        default="batch",
        help="the loss's Dice term: one Dice per class pooled over the batch (batch), one per "
        "patch and class, averaged (sample: small tumors weigh as much as large ones), or the mean "
        "of the two (both)",
    )
    tr.add_argument(
        "--deep-supervision",
        type=int_from(0),
        default=0,
        metavar="LEVELS",
        help="also train the decoder's outputs at 1/2, 1/4, ... resolution (LEVELS of them) through their "
        "own 1x1 heads, with loss weights 1, 1/2, 1/4, ... as nnU-Net does; the heads are not saved in "
        "checkpoints (0: off; at most depth - 2; the patch must be a multiple of 2**(depth-1))",
    )
    tr.add_argument(
        "--min-tumor-ml",
        type=_volume_ml,
        default=0.0,
        metavar="ML",
        help="post-processing recorded in the checkpoint (and used by validation): tumor components smaller than "
        "ML millilitres become kidney; 0 turns it off. The 15-minute phantom recipe instead applies 0.5 after "
        "training with `postprocess` (docs/training.md)",
    )
    tr.add_argument(
        "--ema",
        type=_ema_decay,
        default=0.0,
        metavar="DECAY",
        help="keep an exponential moving average of the weights and BatchNorm statistics (for example 0.99: "
        "about the last 100 steps), updated after every step; validation, best and last checkpoints use it "
        "(0: off)",
    )
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default="auto", help="auto|cpu|cuda")
    tr.add_argument(
        "--amp",
        default="auto",
        choices=["auto", "off", "bf16", "fp16"],
        help="mixed precision. auto: bf16 on CUDA, off on CPU. bf16 on a CPU with AVX-512 BF16 or AMX trains "
        "1.7-2.3x faster, but scored lower than fp32 on the development sets (docs/training.md)",
    )
    tr.add_argument(
        "--workers",
        type=int_from(0),
        help="DataLoader worker processes (default: 0 on a CPU, whose cores the training step uses; "
        "on CUDA one per spare CPU core, shared among the node's ranks, at most 12)",
    )
    tr.add_argument(
        "--cache-workers",
        type=int_from(0),
        help="processes that preprocess the cases into the cache before training, each rank its share "
        "(default: one per available CPU core, at most 8; none with under 4 cores or under 64 MB of images)",
    )
    tr.add_argument(
        "--memory-format",
        default="auto",
        choices=["auto", "channels_last", "contiguous"],
        help="auto: channels_last on CUDA; on CPU, both timed on the first batch and NCHW kept only if >10%% faster",
    )
    tr.add_argument(
        "--no-tune-malloc",
        action="store_true",
        help="on CPU (glibc), leave malloc alone instead of keeping big freed buffers for reuse (about 1.7x per step)",
    )
    tr.add_argument(
        "--no-cudnn-benchmark",
        action="store_true",
        help="on CUDA, take cuDNN's default convolution algorithms instead of timing them once per shape",
    )
    tr.add_argument(
        "--max-minutes",
        type=_positive,
        help="stop after the epoch that crosses this wall time (a resumed run's earlier parts count toward it)",
    )
    tr.add_argument(
        "--fit-schedule",
        action="store_true",
        help="with --max-minutes: after each epoch, shorten the cosine LR schedule to the epochs that fit in "
        "--max-minutes at the median epoch time so far, so that a slow machine's run anneals instead of being "
        "cut off mid-schedule (where all --epochs fit, nothing changes)",
    )
    tr.add_argument(
        "--resume",
        help="a last.state.pt to continue from, with its history, optimiser, random state and run time; "
        "raise --epochs or --max-minutes to extend a finished run",
    )
    tr.add_argument("--kits23", action="store_true", help="4 classes (with cyst)")
    tr.add_argument(
        "--label-file",
        help=LABEL_FILE_HELP,
    )
    tr.add_argument("--base-width", type=int_from(1), default=16)
    tr.add_argument("--depth", type=int_from(2), default=4)
    tr.add_argument(
        "--block",
        choices=["plain", "residual"],
        default="plain",
        help="the encoder levels' block: plain (two conv + norm + ReLU, Ronneberger) or residual (the "
        "same with a shortcut, as nnU-Net's residual-encoder U-Net); the decoder is plain either way",
    )
    tr.add_argument("--in-slices", type=_in_slices, default=3, help="1, or 2k+1 for 2.5D context")
    tr.add_argument("--spacing", type=_spacing, default=1.6, help="in-plane target spacing in mm; 0 keeps native")
    tr.add_argument(
        "--antialias",
        action="store_true",
        help="when the spacing is coarser than a scan's, average all the pixels each model pixel covers "
        "instead of reading the nearest 2 x 2 (less noise, small structures kept); recorded in the "
        "checkpoint, so inference does the same",
    )
    tr.add_argument("--name", default="kitseg-unet", help="model name stored in the checkpoint")
    tr.add_argument("--describe", default="", help="data description stored in the checkpoint")
    tr.add_argument("--no-progress", action="store_true")
    tr.add_argument("--dry-run", action="store_true", help="2 epochs x 2 iterations of a tiny model on 3 tiny phantoms")
    tr.set_defaults(func=cmd_train)

    po = sub.add_parser(
        "postprocess",
        help="choose or change a checkpoint's post-processing (the weights stay as they are)",
        description=(
            "Write a copy of a checkpoint with another post-processing, chosen on held-out cases after training, "
            "as nnU-Net chooses its own on the cross-validation. The weights and their sha256 are unchanged; the "
            "change, and with --choose what it was chosen on, is recorded in the provenance. Two steps: "
            "--kidney-filter, which keeps only the two largest components of the kidney region (labels > 0; on "
            "after training), and --min-tumor-ml, tumor components smaller than that many millilitres become "
            "kidney (0: off). --choose runs the network once on each held-out case, scores every candidate on "
            "the same masks (the KiTS19 composite; for a 4-class checkpoint the KiTS23 regions' Dice and Surface "
            "Dice) and decides step by step as nnU-Net does: the filter only if it raises the mean over no "
            "filter, then the best --min-tumor-ml (of equal ones the smallest), and 0 unless it raises the mean "
            "over 0. Given the folds of a cross-validation, each is scored on the cases it held out, one choice "
            "is made on all of them, and each fold is written with it (an ensemble's members must share their "
            "post-processing)."
        ),
    )
    po.add_argument(
        "--checkpoint",
        nargs="+",
        help="the checkpoint to read; with --choose, several are one configuration's cross-validation folds",
    )
    po.add_argument(
        "--out",
        help="where to write the new checkpoint (may be the same path); for several, a folder, where each is "
        "written as <its run folder>-<its file name>",
    )
    po.add_argument("--min-tumor-ml", type=_volume_ml, metavar="ML", help="the value to write")
    po.add_argument(
        "--choose",
        action="store_true",
        help="choose --kidney-filter and --min-tumor-ml on held-out cases: by default the validation cases each "
        "checkpoint's training recorded (never cases it trained on); --cases or --fold to name others",
    )
    po.add_argument(
        "--kidney-filter",
        choices=("on", "off"),
        help="keep only the two largest components of the kidney region (on), or every component (off: a "
        "transplant kidney is a third one); with --choose, fixes it and only --min-tumor-ml is chosen",
    )
    po.add_argument(
        "--candidates",
        type=_volumes,
        default=(0.1, 0.25, 0.5, 1.0, 2.0),
        metavar="ML,ML,...",
        help="the values --choose tries, in mL (default 0.1,0.25,0.5,1,2); 0 (off) is always one",
    )
    po.add_argument(
        "--min-gain",
        type=_share,
        default=0.0,
        help="each step --choose keeps must raise the mean score by more than this (default 0: any gain, as "
        "nnU-Net decides; a few held-out cases are noisy, so a margin such as 0.005 keeps chance gains out)",
    )
    po.add_argument("--data", help=DATA_HELP)
    po.add_argument("--cases", help="comma-separated case ids to choose on, instead of the recorded validation cases")
    _fold_arguments(po, "choose on fold K's validation cases instead of the recorded ones")
    po.add_argument("--label-file", help=LABEL_FILE_HELP)
    add_engine_arguments(po, batch_size=16)
    po.add_argument(
        "--dry-run",
        action="store_true",
        help="train a tiny checkpoint, rewrite it (0.5 mL, or with --choose on its validation cases) and read it back",
    )
    po.set_defaults(func=cmd_postprocess)

    cd = sub.add_parser(
        "check-data",
        help="check a dataset before training and describe it (nnU-Net's --verify_dataset_integrity)",
        description=(
            "Read every case as training and evaluation will (the label maps whole, the images' headers) and report "
            "the cases that would fail or mislead: an unreadable file, an image that is not 3D, a label map that is "
            "not on its image's voxel grid (shape and affine: another orientation or origin would train on labels "
            "that lie elsewhere), label values the model has no class for. Then describe the dataset: "
            "orientations, sizes, slice thickness and spacing, kidney and tumor volumes, tumor-free cases, small "
            "tumors, cysts. Exit status 1 when a case has a problem."
        ),
    )
    cd.add_argument("--data", help=DATA_HELP)
    cd.add_argument("--kits23", action="store_true", help="4 classes: label 3 (cyst) is allowed")
    cd.add_argument("--label-file", help=LABEL_FILE_HELP)
    cd.add_argument(
        "--images",
        action="store_true",
        help="also decode every image as training will (finds a truncated file or NaN voxels; minutes for KiTS19) "
        "and describe the kidney region's HU",
    )
    cd.add_argument("--out", help="folder for dataset_check.json (every case's row, the summary and the problems)")
    cd.add_argument("--dry-run", action="store_true", help="check 2 tiny phantoms in a temporary folder")
    cd.set_defaults(func=cmd_check_data)

    ex = sub.add_parser(
        "export",
        help="write a checkpoint's network as a self-describing ONNX model, for other runtimes",
        description=(
            "Write the network as the engine runs it on a CPU (eval mode, BatchNorm folded into the convolutions) "
            "to an ONNX file for other runtimes (ONNX Runtime, TensorRT, Triton). Input x: (batch, slices, H, W) "
            "float32 on the model grid, normalised as the checkpoint's preprocessing says, H and W multiples of "
            "2**(depth-1); output logits: (batch, classes, H, W). The checkpoint's metadata (preprocessing, labels, "
            "post-processing, metrics, provenance, weights sha256) goes in the model's metadata as "
            "'kitseg.checkpoint' (JSON). The file's logits are checked against torch's with ONNX Runtime before it "
            "is written. Needs the onnx extra. Preprocessing, the mapping back to the input grid and "
            "post-processing stay outside the graph: the service and kitseg-predict do them."
        ),
    )
    ex.add_argument("--checkpoint", help="the checkpoint to export")
    ex.add_argument("--out", help="the .onnx file to write")
    ex.add_argument(
        "--dry-run", action="store_true", help="train a tiny checkpoint and export it to a temporary folder"
    )
    ex.set_defaults(func=cmd_export)

    ev = sub.add_parser(
        "evaluate",
        help="score a checkpoint on a dataset with the KiTS metrics",
        description=(
            "Run the inference engine over every case and print the KiTS table: kidney Dice (labels > 0), tumor Dice "
            "(label 2), composite, and pixel accuracy next to the all-background baseline; KiTS21/23 regions with "
            "Surface Dice for 4-class models or with --kits23."
        ),
    )
    ev.add_argument(
        "--checkpoint",
        nargs="+",
        help="the checkpoint to score; several are scored as one ensemble, their softmax probabilities averaged "
        "as nnU-Net averages its folds",
    )
    ev.add_argument(
        "--held-out",
        nargs="+",
        metavar="CHECKPOINT",
        help="score each checkpoint on the validation cases its training recorded, all in one table: given one "
        "checkpoint per cross-validation fold, every case is scored by the model that never trained on it "
        "(nnU-Net's cross-validation result)",
    )
    ev.add_argument(
        "--predictions",
        help="score the masks in this folder instead of running a checkpoint, with the same metrics: another "
        "tool's (nnU-Net's and MONAI's case_XXXXX.nii.gz) or kitseg-predict's (case_XXXXX/imaging_mask.nii.gz), "
        "each on its image's voxel grid",
    )
    ev.add_argument("--data", help=DATA_HELP)
    ev.add_argument("--out", help="folder for kits_table.md, summary.json and cases.csv")
    ev.add_argument("--cases", help="comma-separated case ids")
    _fold_arguments(ev, "evaluate on fold K's validation cases (a cross-validation fold's own held-out cases)")
    ev.add_argument("--limit", type=int_from(1))
    ev.add_argument("--kits23", action="store_true", help="also compute KiTS21/23 regions and Surface Dice")
    ev.add_argument(
        "--label-file",
        help=LABEL_FILE_HELP,
    )
    add_engine_arguments(
        ev,
        batch_size=16,
        notes={
            "backend": "The tables in docs/ before session 7 were made with torch.",
            "body_crop": "The tables in docs/ before session 12 were made without it.",
        },
    )
    ev.add_argument(
        "--min-tumor-ml",
        type=_volume_ml,
        metavar="ML",
        help="override the checkpoint's post-processing: tumor components smaller than ML millilitres become "
        "kidney (0: off; default: what the checkpoint records)",
    )
    ev.add_argument("--dry-run", action="store_true", help="train a tiny model on tiny phantoms and evaluate it")
    ev.set_defaults(func=cmd_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from segcore.errors import KitsegError
    from training.datasets import DatasetError
    from training.train import ConfigError

    try:
        return int(args.func(args))
    # A checkpoint missing, tampered or mismatched; an unreadable volume; a dataset folder missing,
    # without labelled cases or with labels the model has no class for: the message says which.
    except (KitsegError, DatasetError, ConfigError, FileNotFoundError) as e:
        print(f"kitseg-train {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
