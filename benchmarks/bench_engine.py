"""Engine benchmark: the default model over a 512x512xN phantom-like volume, against
(a) the seed's naive way (float64 volume, one slice per forward, no inference_mode, fp32, NCHW),
(b) this machine's measured peak (a large matmul and a channels_last 3x3 conv, fp32, and bf16 where
the CPU has it natively),
with the same-process ratios that are meaningful on a shared, noisy machine. The volume is
noise around soft-tissue HU, with no air, so the body crop (``Engine(body_crop=True)``, the
default) runs every pixel there, as a whole-slice engine does; a second part runs a phantom with
air around the body, body crop on against off, to measure what the crop saves.

    python benchmarks/bench_engine.py [--slices 200] [--checkpoint PATH]   # about 4 minutes here

Peers need MONAI (the ``train`` extra) and nnU-Net's architectures:
``pip install --no-deps dynamic-network-architectures``. Without ``--no-deps`` its timm
dependency pulls a torchvision that replaces the installed torch (here: 2.13 CPU by a 2.14 CUDA
build of several GB). Its U-Nets need only torch and numpy.

Writes benchmarks/results/engine.json and updates the engine section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
import torch

from segcore.checkpoint import load_checkpoint
from segcore.inference import Engine, cpp_compiler_available, cpu_bf16_fast
from segcore.io import Volume, load_volume
from segcore.ort import onnxruntime_available
from segcore.unet import flops_per_pixel, fold_batch_norm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_e2e import add_label_argument, section_title, update_section  # noqa: E402

DEMO = ROOT / "app" / "demo_model" / "kitseg-demo-phantom.safetensors"


def machine() -> dict[str, object]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_fast": cpu_bf16_fast(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
    }


def machine_line(m: dict[str, object]) -> str:
    """:func:`machine` in one line, for the Markdown reports."""
    bf16 = "yes" if m["cpu_bf16_fast"] else "no"
    return (
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['threads']} threads), CPU capability "
        f"{m['cpu_capability']}, native bf16 {bf16}; GPU {m['cuda'] or 'none'}"
    )


def peak_gflops(rounds: int = 5) -> dict[str, float]:
    """The best of ``rounds`` short timings of each kernel: a peak, so the best, not the mean
    (on a shared machine a single timing can land in someone else's burst)."""
    a = torch.randn(2048, 2048)
    b = torch.randn(2048, 2048)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False).eval().to(memory_format=torch.channels_last)
    x = torch.randn(8, 64, 128, 128).contiguous(memory_format=torch.channels_last)
    n = 5
    out = {}
    dtypes = {"fp32": torch.float32}
    if cpu_bf16_fast():  # elsewhere bf16 is emulated or a slow path, no peak worth quoting
        dtypes["bf16"] = torch.bfloat16
    with torch.inference_mode():
        for name, dt in dtypes.items():
            aa, bb, cv, xx = a.to(dt), b.to(dt), copy.deepcopy(conv).to(dt), x.to(dt)
            mm = conv_gf = 0.0
            for _ in range(2):
                aa @ bb
                cv(xx)
            for _ in range(rounds):
                t = time.perf_counter()
                for _ in range(n):
                    aa @ bb
                mm = max(mm, 2 * 2048**3 * n / (time.perf_counter() - t) / 1e9)
                t = time.perf_counter()
                for _ in range(n):
                    cv(xx)
                conv_gf = max(conv_gf, 2 * 9 * 64 * 64 * 128 * 128 * 8 * n / (time.perf_counter() - t) / 1e9)
            out[f"matmul_{name}_gflops"] = mm
            out[f"conv3x3_channels_last_{name}_gflops"] = conv_gf
    return out


def naive_seconds(
    model: torch.nn.Module, vol64: np.ndarray, in_slices: int, mean: float, std: float, lo: float, hi: float
) -> float:
    """The seed's way: float64 volume, one slice per forward, autograd on, NCHW, fp32."""
    model = model.float().to(memory_format=torch.contiguous_format)
    k = in_slices // 2
    t = time.perf_counter()
    z = vol64.shape[0]
    out = []
    for i in range(z):
        idx = np.clip(np.arange(i - k, i + k + 1), 0, z - 1)
        x = torch.from_numpy((np.clip(vol64[idx], lo, hi) - mean) / std).float()[None]
        out.append(model(x).argmax(1).numpy())
    return time.perf_counter() - t


def _ms_per_slice(model: torch.nn.Module, in_ch: int, size: int, channels_last: bool, batch: int = 2) -> float:
    model = model.eval()
    x = torch.randn(batch, in_ch, size, size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x)
        ts = []
        for _ in range(2):
            t = time.perf_counter()
            model(x)
            ts.append(time.perf_counter() - t)
    return 1000 * min(ts) / batch


def peers(ours: torch.nn.Module, in_slices: int, grid_px: int) -> dict[str, dict[str, float | str]]:
    """Speed only, fp32, one 512x512 slice: our U-Net (native and on its model grid) next to the
    architectures users compare us with. Instance-norm peers run NCHW (channels_last slows them)."""
    out: dict[str, dict[str, float | str]] = {}
    folded = fold_batch_norm(copy.deepcopy(ours).eval())
    out["kitseg (this checkpoint), 512x512"] = {"ms_per_slice": _ms_per_slice(folded, in_slices, 512, True)}
    out[f"kitseg (this checkpoint), model grid {grid_px}x{grid_px}"] = {
        "ms_per_slice": _ms_per_slice(folded, in_slices, grid_px, True)
    }
    try:
        from monai.networks.nets import BasicUNet
        from monai.networks.nets import UNet as MonaiUNet

        out["MONAI UNet (16..256, 2 res units)"] = {
            "ms_per_slice": _ms_per_slice(
                MonaiUNet(2, 1, 3, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2),
                1,
                512,
                False,
            )
        }
        out["MONAI BasicUNet (defaults)"] = {"ms_per_slice": _ms_per_slice(BasicUNet(2, 1, 3), 1, 512, False)}
    except ImportError as e:
        out["MONAI"] = {"skipped": str(e)}
    try:
        from dynamic_network_architectures.architectures.unet import PlainConvUNet

        # nnU-Net's 2D plan for KiTS19 (512x512 patches): 8 stages, 32..512 features, InstanceNorm.
        nnunet = PlainConvUNet(
            1, 8, [32, 64, 128, 256, 512, 512, 512, 512], torch.nn.Conv2d, 3, [1, 2, 2, 2, 2, 2, 2, 2],
            2, 3, 2, conv_bias=True, norm_op=torch.nn.InstanceNorm2d, norm_op_kwargs={"eps": 1e-5, "affine": True},
            nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True},
        )  # fmt: skip
        out["nnU-Net 2D PlainConvUNet (KiTS19 plan)"] = {"ms_per_slice": _ms_per_slice(nnunet, 1, 512, False, batch=1)}
    except ImportError as e:
        out["nnU-Net"] = {"skipped": f"{e} (pip install --no-deps dynamic-network-architectures)"}
    for v in out.values():
        if "ms_per_slice" in v:
            v["s_per_200_slice_case"] = float(v["ms_per_slice"]) * 200 / 1000
    return out


def _as_loaded(hu: np.ndarray, spacing: tuple[float, float, float]) -> Volume:
    """``hu`` written as a KiTS19-layout case and read back, as the service would read it."""
    from training.datasets import write_kits_case

    tmp = Path(tempfile.mkdtemp(prefix="kitseg-bench-engine-"))
    try:
        write_kits_case(tmp / "case", hu, None, spacing)
        return load_volume(tmp / "case" / "imaging.nii.gz")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _best_of_3_in_turns(
    engines: dict[str, Engine], vol: Volume
) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """Each engine's fastest of 3 predictions of ``vol`` (seconds and model ms), taken in turns so
    that all meet the same background load, and each engine's mask."""
    best: dict[str, dict[str, float]] = {}
    masks = {}
    for _ in range(3):
        for name, eng in engines.items():
            t = time.perf_counter()
            pred = eng.predict(vol)
            dt = time.perf_counter() - t
            masks[name] = pred.mask
            if name not in best or dt < best[name]["seconds"]:
                best[name] = {"seconds": dt, "model_ms": pred.timings_ms["model"]}
    return best, masks


def compile_runs(model: torch.nn.Module, meta: object, slices: int) -> dict[str, object]:
    """``compile=on`` against eager on the service's path: bf16 torch, mirrored, body crop, on one
    phantom abdomen over ``slices`` 512x512 slices (``bench_e2e.py``'s realistic upload); each
    engine warmed (the compiled one compiles there), then best of 3 each, in turns, same process."""
    from training.synth import make_phantom

    hu, _, sp = make_phantom(np.random.default_rng(0), inplane=512, slices=slices)
    vol = _as_loaded(hu, (sp[0], 0.78, 0.78))
    engines, warmup_s = {}, {}
    for name, compile_ in (("eager", "off"), ("compiled", "on")):
        t = time.perf_counter()
        eng = Engine(model, meta, torch.device("cpu"), precision="bf16", backend="torch", mirror=True, compile=compile_)  # type: ignore[arg-type]
        eng.warmup()
        warmup_s[name] = time.perf_counter() - t
        engines[name] = eng
    best, masks = _best_of_3_in_turns(engines, vol)
    return {
        "runs": best,
        "warmup_s": warmup_s,
        "still_compiled": engines["compiled"].compiled,
        "speedup": best["eager"]["seconds"] / best["compiled"]["seconds"],
        "model_speedup": best["eager"]["model_ms"] / best["compiled"]["model_ms"],
        "mask_voxels_differing": int((masks["eager"] != masks["compiled"]).sum()),
        "foreground_voxels": int((masks["eager"] > 0).sum()),
    }


def body_crop_runs(model: torch.nn.Module, meta: object, slices: int) -> dict[str, object]:
    """The fastest fp32 engine on a 512x512 phantom (KiTS IPL layout, air around the body), with the
    body crop and without it; best of 3 each, in turns, same process."""
    from training.synth import make_phantom

    hu, _, _ = make_phantom(np.random.default_rng(0), inplane=512)  # the e2e benchmark's phantom
    reps = int(np.ceil(slices / hu.shape[0]))
    vol = _as_loaded(np.concatenate([hu] * reps)[:slices], (3.0, 0.78, 0.78))
    engines = {
        name: Engine(model, meta, torch.device("cpu"), batch_size=8, precision="fp32", body_crop=crop)  # type: ignore[arg-type]
        for name, crop in (("whole_slices", False), ("body_crop", True))
    }
    best, masks = _best_of_3_in_turns(engines, vol)
    fg = int((masks["whole_slices"] > 0).sum())
    return {
        "backend": engines["body_crop"].backend,
        "runs": best,
        "speedup": best["whole_slices"]["seconds"] / best["body_crop"]["seconds"],
        "model_speedup": best["whole_slices"]["model_ms"] / best["body_crop"]["model_ms"],
        "mask_voxels_differing": int((masks["whole_slices"] != masks["body_crop"]).sum()),
        "foreground_voxels_whole_slices": fg,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--slices",
        type=int,
        default=200,
        help="issue 5: a 512x512x200 volume (the naive baseline alone takes about 90 s here)",
    )
    ap.add_argument("--checkpoint", type=Path, default=DEMO)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "engine.json")
    ap.add_argument("--no-docs", action="store_true", help="write the JSON only, leave docs/benchmarks.md alone")
    add_label_argument(ap, "Engine")
    a = ap.parse_args()
    model, meta = load_checkpoint(a.checkpoint)
    rng = np.random.default_rng(0)
    # 512x512 at 0.78 mm (a typical KiTS grid) in the KiTS IPL layout, phantom-like intensities.
    data = (rng.normal(40, 60, size=(a.slices, 512, 512))).astype(np.float32)
    aff = np.array([[0, 0, -0.78, 0], [0, -0.78, 0, 0], [-3.0, 0, 0, 0], [0, 0, 0, 1]])
    vol = Volume(data, aff, nib.Nifti1Header(), (3.0, 0.78, 0.78))
    pp = meta.preprocessing
    results: dict[str, object] = {"machine": machine(), "slices": a.slices, "checkpoint": a.checkpoint.name}
    results["peak"] = peak_gflops()
    grid_px = 512 * 0.78 / pp.target_spacing_mm[0] if pp.target_spacing_mm else 512
    gflop_per_slice = flops_per_pixel(meta.model) * grid_px**2 / 1e9
    results["model_grid"] = round(grid_px)
    results["gflop_per_slice"] = gflop_per_slice
    configs = {"fp32_torch": ("fp32", "torch", "off"), "bf16_torch": ("bf16", "torch", "off")}
    if onnxruntime_available():
        configs["fp32_onnxruntime"] = ("fp32", "onnxruntime", "off")
    if cpu_bf16_fast() and cpp_compiler_available():
        configs["bf16_torch_compiled"] = ("bf16", "torch", "on")  # what KITSEG_COMPILE=auto runs here
    engines, warmup_s = {}, {}
    for name, (precision, backend, compile_) in configs.items():
        t = time.perf_counter()
        eng = Engine(
            model, meta, torch.device("cpu"), batch_size=8, precision=precision, backend=backend, compile=compile_
        )
        # Not square: a compiled engine would otherwise compile again for the first non-square input.
        eng.warmup((int(grid_px), int(grid_px) + meta.model.multiple))
        warmup_s[name] = time.perf_counter() - t  # with compile, the compile
        engines[name] = eng
    results["warmup_s"] = warmup_s
    # Best of 3 whole predictions for each engine, taken in turns so that all meet the same
    # background load (the same rule as the peak they are compared with); where bf16 is a slow
    # path (no native bf16), it is run once.
    runs: dict[str, dict[str, object]] = {}
    for rnd in range(3):
        for name, eng in engines.items():
            if name.startswith("bf16") and rnd and not cpu_bf16_fast():
                continue
            t = time.perf_counter()
            pred = eng.predict(vol)
            dt = time.perf_counter() - t
            if name not in runs or dt < runs[name]["seconds"]:  # type: ignore[operator]
                runs[name] = {
                    "seconds": dt,
                    "slices_per_s": a.slices / dt,
                    "model_gflops": gflop_per_slice * a.slices / (pred.timings_ms["model"] / 1000),
                    "timings_ms": pred.timings_ms,
                }
    naive = naive_seconds(model, data.astype(np.float64), meta.model.in_slices, pp.mean, pp.std, *pp.clip_hu)
    runs["naive_seed_way"] = {"seconds": naive, "slices_per_s": a.slices / naive}
    results["runs"] = runs
    results["peers"] = peers(model, meta.model.in_slices, round(grid_px))
    results["body_crop"] = bc = body_crop_runs(model, meta, a.slices)
    if "bf16_torch_compiled" in configs:
        results["compile"] = compile_runs(model, meta, a.slices)
    peak = cast(dict[str, float], results["peak"])
    results["speedup_vs_naive"] = {k: naive / runs[k]["seconds"] for k in configs}  # type: ignore[operator]
    # Each engine against the conv peak of its own precision.
    results["fraction_of_conv_peak"] = {
        k: runs[k]["model_gflops"] / peak[f"conv3x3_channels_last_{k.split('_')[0]}_gflops"]  # type: ignore[operator]
        for k in configs
        if f"conv3x3_channels_last_{k.split('_')[0]}_gflops" in peak
    }
    results["precision_auto"] = Engine(model, meta, torch.device("cpu"), backend="torch").precision
    results["best"] = min(configs, key=lambda k: runs[k]["seconds"])  # type: ignore[arg-type,return-value]
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2))
    md = [
        f"## {section_title(a.label, 'Engine')} ({a.slices} slices of 512x512 at 0.78 mm -> {round(grid_px)}x{round(grid_px)} model grid, {gflop_per_slice:.2f} GFLOP/slice)",
        "",
        f"Machine: {results['machine']}",
        "",
        "| run | seconds | slices/s | model GFLOP/s | vs naive |",
        "|---|---|---|---|---|",
    ]
    for k in ("naive_seed_way", *configs):
        r = runs[k]
        gf = f"{r['model_gflops']:.0f}" if "model_gflops" in r else "-"
        md.append(f"| {k} | {r['seconds']:.2f} | {r['slices_per_s']:.1f} | {gf} | {naive / r['seconds']:.2f}x |")  # type: ignore[operator]
    peaks = "; ".join(
        f"{p}: matmul {peak[f'matmul_{p}_gflops']:.0f} GFLOP/s, channels_last 3x3 conv "
        f"{peak[f'conv3x3_channels_last_{p}_gflops']:.0f} GFLOP/s"
        for p in ("fp32", "bf16")
        if f"matmul_{p}_gflops" in peak
    )
    md += [
        "",
        f"Peak here (best of 5, torch), {peaks}. Each engine is the best of 3 predictions, taken in turns"
        + ("" if cpu_bf16_fast() else " (bf16, a slow path on this CPU, once)")
        + f". `precision=auto` on this CPU: {results['precision_auto']}."
        + (
            f" bf16_torch_compiled is `compile=on` (what `KITSEG_COMPILE=auto` runs here); its warm-up, which "
            f"compiles, took {warmup_s['bf16_torch_compiled']:.0f} s."
            if "bf16_torch_compiled" in warmup_s
            else ""
        ),
    ]
    md += [
        "Model throughput as a share of the conv peak in its precision: "
        + ", ".join(f"{k} {v:.0%}" for k, v in results["fraction_of_conv_peak"].items())  # type: ignore[attr-defined]
        + ".",
        "",
        "Peers, speed only (fp32, same process, one slice per row; a case = 200 slices):",
        "",
        "| network | ms per slice | s per 200-slice case |",
        "|---|---|---|",
    ]
    for name, v in results["peers"].items():  # type: ignore[attr-defined]
        if "ms_per_slice" in v:
            md.append(f"| {name} | {v['ms_per_slice']:.0f} | {v['s_per_200_slice_case']:.0f} |")
        else:
            md.append(f"| {name} | skipped: {v['skipped']} | |")
    r0, r1 = bc["runs"]["whole_slices"], bc["runs"]["body_crop"]  # type: ignore[index]
    md += [
        "",
        f"Body crop (the default since session 12), on a phantom with air around the body ({a.slices} slices, "
        f"512x512, IPL, {bc['backend']}, fp32, best of 3 in turns): whole slices {r0['seconds']:.2f} s "
        f"(model {r0['model_ms'] / 1000:.2f} s), body crop {r1['seconds']:.2f} s (model {r1['model_ms'] / 1000:.2f} s): "
        f"**{bc['speedup']:.2f}x** per volume, {bc['model_speedup']:.2f}x on the model stage; "
        f"{bc['mask_voxels_differing']} mask voxels differ of {bc['foreground_voxels_whole_slices']} foreground. "
        "The noise volume above has no air, so the crop keeps every pixel there.",
    ]
    if "compile" in results:
        cr = cast(dict[str, Any], results["compile"])
        e, c = cr["runs"]["eager"], cr["runs"]["compiled"]
        md += [
            "",
            f"torch.compile on the service's path (bf16 torch, mirrored, body crop; one phantom abdomen over "
            f"{a.slices} slices of 512x512, as `bench_e2e.py` uploads; best of 3 in turns): eager {e['seconds']:.2f} s "
            f"(model {e['model_ms'] / 1000:.2f} s), compiled {c['seconds']:.2f} s (model {c['model_ms'] / 1000:.2f} s): "
            f"**{cr['model_speedup']:.2f}x on the model stage**, {cr['speedup']:.2f}x per volume; "
            f"{cr['mask_voxels_differing']} mask voxels differ of {cr['foreground_voxels']} foreground. "
            f"Warm-up {cr['warmup_s']['eager']:.1f} s eager, {cr['warmup_s']['compiled']:.0f} s compiled (inductor's "
            "cache was warm from the row above).",
        ]
    else:
        md += ["", "torch.compile: not measured (it needs native bf16 and a C++ compiler; `auto` is off without them)."]
    if not a.no_docs:
        update_section(ROOT / "docs" / "benchmarks.md", md[0].split(" (")[0] + " (", "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
