"""Training throughput: kitseg's training step against the seed's naive loop, in one process.

Naive (the seed's way): every step loads a case with nibabel (gunzip and float64 ``get_fdata``),
takes 4 random 512x512 axial slices, normalises in float64, and runs a 1-slice U-Net with
cross-entropy and Adam. Ours: the memory-mapped preprocessed cache, foreground oversampling and
augmentation in a DataLoader, 2.5D input, CE + Dice, the memory format the trainer picks
(``choose_memory_format``) and its in-process allocator setting (``tune_cpu_malloc``, CPU/glibc),
run with the demo recipe (96x96 patches at 2.0 mm, batch 16) and with the naive loop's own shape
(4 whole 512x512 slices at native spacing per step).

Order matters because the allocator setting is process-wide and can't be undone: the naive loop
and our loop with glibc's default malloc run first, then the setting, our loop as shipped, and
the naive loop again with the same setting, which shows how much of the gain is the allocator.

Both use the same U-Net width and depth. Slices per second favour the demo recipe (a 96x96
patch is smaller than a 512x512 slice) and input megapixels per second disfavour it (small
patches use the CPU less well, and each of its pixels covers 6.6x the area). The same-shape run
favours neither: that ratio is the one to quote.

    python benchmarks/bench_train.py --cases 4 --steps 12

Writes benchmarks/results/train.json and the training section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_e2e import add_label_argument, section_title, update_section  # noqa: E402
from benchmarks.bench_engine import machine, machine_line  # noqa: E402
from segcore.inference import cpu_bf16_fast  # noqa: E402
from segcore.preprocessing import PreprocessConfig  # noqa: E402
from segcore.unet import UNet, UNetConfig  # noqa: E402
from training.datasets import Augment, CaseCache, SliceDataset, find_cases, write_kits_case  # noqa: E402
from training.synth import make_phantom  # noqa: E402
from training.train import (  # noqa: E402
    AMP_DTYPES,
    amp_autocast,
    choose_memory_format,
    default_workers,
    dice_ce_loss,
    first_batch,
    memory_format_name,
    resolve_amp,
    tune_cpu_malloc,
)


def _clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the device has finished: CUDA runs ahead of the host, so a
    clock read without the wait would stop before the queued steps had run."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def naive(cases: list[Path], steps: int, base: int, device: torch.device) -> dict[str, float]:
    model = UNet(UNetConfig(in_slices=1, num_classes=3, base_width=base, depth=4)).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    pixels = n_slices = 0
    # On CUDA the first step pays one-off start-up (library handles, cuDNN's algorithm search
    # where it is on), in both loops: untimed there. CPU tables keep their first step.
    warm = int(device.type == "cuda")
    for step in range(steps + warm):
        if step == warm:
            t0 = _clock(device)
        case = cases[rng.integers(len(cases))]
        img = nib.load(case / "imaging.nii.gz").get_fdata()  # float64, decompressed every step
        seg = np.asanyarray(nib.load(case / "segmentation.nii.gz").dataobj)
        idx = rng.integers(0, img.shape[0], 4)
        x = torch.from_numpy((np.clip(img[idx], -200, 300) - 50.0) / 80.0).float()[:, None].to(device)
        y = torch.from_numpy(seg[idx].astype(np.int64)).to(device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= warm:
            n_slices += 4
            pixels += x.shape[-1] * x.shape[-2] * 4
    dt = _clock(device) - t0
    return {"seconds": dt, "slices_per_s": n_slices / dt, "mpix_per_s": pixels / dt / 1e6}


def ours(
    data: Path,
    cache: Path,
    steps: int,
    base: int,
    device: torch.device,
    workers: int,
    patch: int,
    spacing: float | None,
    batch: int,
    amp: str = "auto",
) -> dict[str, float | str]:
    cfg = PreprocessConfig(target_spacing_mm=(spacing, spacing) if spacing else None)
    cc = CaseCache(cache, cfg, 3)
    # Built once, as before a real run's first epoch; not timed.
    arrays = [cc.get(c) for c in find_cases(data)]
    cuda = device.type == "cuda"
    warm = int(cuda)  # an untimed first step on CUDA, as in naive()
    ds = SliceDataset(
        arrays, context=1, patch=patch, length=(steps + warm) * batch, fg_fraction=0.6, augment=Augment(), seed=0
    )
    loader = DataLoader(
        ds, batch_size=batch, num_workers=workers, drop_last=True, persistent_workers=workers > 0, pin_memory=cuda
    )
    model = UNet(UNetConfig(in_slices=3, num_classes=3, base_width=base, depth=4)).to(device).train()
    amp = resolve_amp(amp, device)  # as training.train does: auto is bf16 on CUDA, fp32 on a CPU
    dtype = AMP_DTYPES.get(amp)
    t_fmt = time.perf_counter()
    fmt, _ = choose_memory_format(model, lambda: first_batch(ds, batch), device, amp_dtype=dtype)
    t_fmt = time.perf_counter() - t_fmt
    model = model.to(memory_format=fmt)  # type: ignore[call-overload]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    if cuda:
        torch.backends.cudnn.benchmark = True  # as training.train sets it (--no-cudnn-benchmark: off)
    it = iter(loader)
    x, y = next(it)  # worker start-up is not throughput
    n = pixels = 0
    for step in range(steps - 1 + warm):
        if step == warm:
            t0 = _clock(device)
        x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
        y = y.to(device, non_blocking=True)
        with amp_autocast(device, dtype):
            logits = model(x)
        loss, _ = dice_ce_loss(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= warm:
            n += x.shape[0]
            pixels += x.shape[0] * x.shape[-1] * x.shape[-2]
        x, y = next(it)
    dt = _clock(device) - t0
    return {
        "seconds": dt,
        "slices_per_s": n / dt,
        "mpix_per_s": pixels / dt / 1e6,
        "memory_format": memory_format_name(fmt),
        "amp": amp,
        "format_choice_s": t_fmt,  # once per run, before the first step; not in the throughput
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--base-width", type=int, default=16)
    ap.add_argument(
        "--workers",
        type=int,
        help="DataLoader workers for our loop (default: the trainer's, training.train.default_workers: 0 on a "
        "CPU, where a worker process takes a core from the training step's threads, several on CUDA). Tables "
        "made before session 32 ran one worker on a CPU, which is not what the trainer does there",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train.json")
    ap.add_argument("--no-docs", action="store_true", help="write the JSON only, leave docs/benchmarks.md alone")
    add_label_argument(ap, "Training throughput")
    a = ap.parse_args()
    device = torch.device(a.device)
    workers_note = "the trainer's default here" if a.workers is None else "set by --workers"
    if a.workers is None:
        a.workers = default_workers(device)
    tmp = Path(tempfile.mkdtemp(prefix="kitseg-bench-train-"))
    for i in range(a.cases):
        hu, seg, sp = make_phantom(np.random.default_rng(100 + i), inplane=512)
        write_kits_case(tmp / "data" / f"case_{i:05d}", hu, seg, sp)
    cases = sorted((tmp / "data").iterdir())
    res: dict = {"device": str(device), "machine": machine()}
    res["base_width"] = a.base_width
    res["workers"] = a.workers
    res["naive"] = naive(cases, a.steps, a.base_width, device)
    # The naive loop's own shape: 4 whole 512x512 slices at native spacing per step, so the
    # per-slice and per-pixel ratios are the same number and neither favours us.
    same = (tmp / "data", tmp / "cache", a.steps, a.base_width, device, a.workers, 512, None, 4)
    res["ours_same_shape_default_malloc"] = ours(*same)
    res["malloc_tuned"] = device.type == "cpu" and tune_cpu_malloc()  # as training.train does on CPU
    # The demo recipe (docs/training.md): 96x96 patches at 2.0 mm, batch 16.
    res["ours"] = ours(tmp / "data", tmp / "cache", a.steps, a.base_width, device, a.workers, 96, 2.0, 16)
    res["ours_same_shape"] = ours(*same)
    if device.type == "cpu" and cpu_bf16_fast():
        # Opt-in on a CPU (--amp bf16): faster where the CPU has native bf16, but both phantom
        # recipes trained this way scored lower on the development sets (docs/training.md).
        res["ours_same_shape_bf16"] = ours(*same, amp="bf16")
    if res["malloc_tuned"]:
        res["naive_tuned_malloc"] = naive(cases, a.steps, a.base_width, device)
        res["ratio_same_shape_vs_naive_tuned_malloc"] = (
            res["ours_same_shape"]["slices_per_s"] / res["naive_tuned_malloc"]["slices_per_s"]
        )
    res["ratio_same_shape_default_malloc"] = (
        res["ours_same_shape_default_malloc"]["slices_per_s"] / res["naive"]["slices_per_s"]
    )
    res["ratio_slices"] = res["ours"]["slices_per_s"] / res["naive"]["slices_per_s"]
    res["ratio_mpix"] = res["ours"]["mpix_per_s"] / res["naive"]["mpix_per_s"]
    res["ratio_same_shape"] = res["ours_same_shape"]["slices_per_s"] / res["naive"]["slices_per_s"]
    shutil.rmtree(tmp, ignore_errors=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))
    n, o, d, ss = res["naive"], res["ours"], res["ours_same_shape_default_malloc"], res["ours_same_shape"]
    m = res["machine"]
    md = [
        f"## {section_title(a.label, 'Training throughput')} ({res['device']}, base {a.base_width}, {a.steps} steps each, {a.cases} 512x512 phantoms)",
        "",
        f"Machine: {machine_line(m)}.",
        "",
        "| loop | memory format | amp | slices/s | input Mpixel/s | ratio to naive |",
        "|---|---|---|---|---|---|",
        f"| naive (nibabel load per step, float64, 4 x 512x512, 1 slice in; glibc malloc defaults) | NCHW | off | {n['slices_per_s']:.2f} | {n['mpix_per_s']:.2f} | 1 |",
        f"| kitseg at the naive loop's shape (memmap cache, 4 x 512x512 native, 3 slices in), glibc malloc defaults | {d['memory_format']} | {d['amp']} | {d['slices_per_s']:.2f} | {d['mpix_per_s']:.2f} | {res['ratio_same_shape_default_malloc']:.2f}x |",
        f"| **kitseg at the naive loop's shape, as shipped** (trainer's malloc setting{' on' if res['malloc_tuned'] else ': not applied'}) | {ss['memory_format']} | {ss['amp']} | {ss['slices_per_s']:.2f} | {ss['mpix_per_s']:.2f} | **{res['ratio_same_shape']:.2f}x** |",
    ]
    if "ours_same_shape_bf16" in res:
        f = res["ours_same_shape_bf16"]
        md.append(
            f"| the same with `--amp bf16` (opt-in on a CPU: lower development scores, docs/training.md) | {f['memory_format']} | bf16 | {f['slices_per_s']:.2f} | {f['mpix_per_s']:.2f} | {f['slices_per_s'] / n['slices_per_s']:.2f}x |"
        )
    md.append(
        f"| kitseg, demo recipe (16 x 96x96 patches at 2.0 mm, 3 slices in), as shipped | {o['memory_format']} | {o['amp']} | {o['slices_per_s']:.2f} | {o['mpix_per_s']:.2f} | {res['ratio_slices']:.1f}x slices/s, {res['ratio_mpix']:.2f}x Mpixel/s |"
    )
    if "naive_tuned_malloc" in res:
        t = res["naive_tuned_malloc"]
        md.append(
            f"| naive, with the trainer's malloc setting (for comparison: what the allocator alone gives) | NCHW | off | {t['slices_per_s']:.2f} | {t['mpix_per_s']:.2f} | {t['slices_per_s'] / n['slices_per_s']:.2f}x (kitseg as shipped: {res['ratio_same_shape_vs_naive_tuned_malloc']:.2f}x this) |"
        )
    md += [
        "",
        f"The trainer picks the memory format once per run by timing one batch each way "
        f"({ss['format_choice_s']:.0f} s at the naive loop's shape, {o['format_choice_s']:.1f} s for the demo "
        f"recipe; not in the throughput). Our loop ran {a.workers} DataLoader worker(s), {workers_note}.",
    ]
    if not a.no_docs:
        update_section(ROOT / "docs" / "benchmarks.md", md[0].split(" (")[0] + " (", "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
