"""The training loop: CE + Dice over >= 3 logits, Adam, AMP and channels_last on CUDA, a CPU
fallback, DDP under ``torchrun`` (NCCL on CUDA, gloo on CPU), whole-volume validation with the KiTS
metrics every epoch through the same inference engine the service uses, best/last checkpoints,
resume, a JSONL metrics log and a PNG of the learning curves.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import random
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar, cast

import nibabel as nib
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm import tqdm

import segcore
from segcore.checkpoint import KITS19_LABELS, KITS23_LABELS, CheckpointMeta, save_checkpoint, unwrap
from segcore.inference import Engine, cpu_bf16_fast, pick_device
from segcore.io import Volume, load_labels, load_volume
from segcore.metrics import kits19, kits23, pixel_accuracy, summarize, tumor_sizes
from segcore.postprocess import PostprocessConfig, keep_largest_components, relabel_small_tumors
from segcore.preprocessing import PreprocessConfig
from segcore.unet import UNet, UNetConfig
from training.datasets import (
    NNUNET_FOLDS,
    NNUNET_SPLIT_SEED,
    Augment,
    Case,
    CaseCache,
    DatasetError,
    DecodedCopies,
    SliceDataset,
    available_cores,
    case_bytes,
    check_grid,
    find_cases,
    fold_cases,
    kfold_splits,
    labelled,
    read_splits,
    select_cases,
    split_cases,
)

T = TypeVar("T")

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """Training options that don't go together, or a --resume state that doesn't match them; the
    command line reports the message (status 2). Raised before the first training step."""


@dataclass
class TrainConfig:
    data: str
    out: str
    cache: str | None = None
    epochs: int = 20
    iters_per_epoch: int = 100
    batch_size: int = 8
    patch: int = 160
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    val_fraction: float = 0.2
    val_cases: list[str] | None = None
    #: cross-validation: train on this fold's training cases and validate on its validation cases,
    #: from ``splits`` (nnU-Net's splits_final.json) or else from :func:`kfold_splits` over ``folds``.
    fold: int | None = None
    folds: int = NNUNET_FOLDS
    splits: str | None = None
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    #: DataLoader worker processes; None: :func:`default_workers` (0 on a CPU, several on CUDA).
    workers: int | None = None
    #: processes that build the preprocessed cache; None: :func:`training.datasets.default_cache_workers`.
    cache_workers: int | None = None
    max_minutes: float | None = None
    #: with ``max_minutes``: the LR schedule's length becomes the epochs that fit in it, measured as
    #: training goes (see :func:`epochs_that_fit`), so that a run the budget ends has annealed. A
    #: resumed run starts from the planned length again and fits it to its own ``max_minutes``.
    fit_schedule: bool = False
    resume: str | None = None
    kits23: bool = False
    #: each case folder's label file; None: segmentation.nii.gz, else KiTS21's aggregated_MAJ_seg.nii.gz
    label_file: str | None = None
    base_width: int = 16
    depth: int = 4
    in_slices: int = 3
    norm: str = "batch"
    #: the encoder levels' block: ``plain`` or ``residual`` (segcore.unet.UNetConfig.block).
    block: str = "plain"
    target_spacing_mm: float | None = 1.6
    #: antialiased in-plane resampling, recorded in the checkpoint's preprocessing.
    antialias: bool = False
    intensity: str = "auto"
    fg_fraction: float = 0.67
    #: how a tumor patch picks its centre: ``component`` (each tumor equally often) or ``slice``.
    tumor_sampling: str = "slice"
    #: Dice term of the loss: ``batch`` (one Dice per class over the batch), ``sample`` or ``both``.
    dice: str = "batch"
    #: extra decoder levels trained with their own 1x1 heads (0: off; see DeepSupervision).
    deep_supervision: int = 0
    #: recorded in the checkpoint's post-processing: tumor components below this become kidney.
    min_tumor_ml: float = 0.0
    #: decay of an exponential moving average of the weights (and BatchNorm statistics), updated
    #: after every optimizer step; validation and both checkpoints then use the average. 0: off.
    ema: float = 0.0
    #: validate (and write last/best.safetensors) after every this many epochs, and after the last
    val_every: int = 1
    #: validate from uncompressed copies of the validation cases under the cache (gunzipped once)
    #: instead of gunzipping each case every epoch; they take the uncompressed size on disk.
    val_copies: bool = True
    #: under torchrun, how long a rank waits in a collective for the others before the run fails
    #: (torch's NCCL default is 10 minutes).
    dist_timeout_minutes: float = 30.0
    val_batch_size: int = 16
    val_precision: str = "fp32"
    max_train_cases: int | None = None
    data_description: str = ""
    progress: bool = True
    #: ``auto``: channels_last on CUDA; on CPU, timed on the first batch (see choose_memory_format).
    memory_format: str = "auto"
    #: On CPU with glibc, keep large freed buffers for reuse (see tune_cpu_malloc).
    tune_malloc: bool = True
    #: On CUDA, let cuDNN time its convolution algorithms for each new shape and keep the fastest
    #: (``torch.backends.cudnn.benchmark``, as nnU-Net trains): training patches have one shape.
    cudnn_benchmark: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


#: ``dice_ce_loss``'s Dice modes: the axes each Dice term sums over (one Dice per class over the
#: batch, one per patch and class, or both terms averaged).
DICE_DIMS: dict[str, tuple[tuple[int, ...], ...]] = {
    "batch": ((0, 2, 3),),
    "sample": ((2, 3),),
    "both": ((2, 3), (0, 2, 3)),
}


def dice_ce_loss(
    logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5, dice: str = "batch"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy + soft Dice over the foreground classes.

    Args:
        logits: ``(B, K, H, W)``, K >= 2.
        target: ``(B, H, W)`` int64 labels.
        smooth: added to the numerator and denominator of each Dice.
        dice: ``batch`` pools the whole batch into one Dice per class (large structures dominate);
            ``sample`` takes one Dice per patch and class and averages them (nnU-Net's
            ``batch_dice=False``), so a patch with a small tumor weighs as much as one with a
            large tumor, and a foreground prediction on a patch without that class costs a full
            Dice of 0. ``both`` averages the two terms.

    Returns:
        (total loss, Dice term).
    """
    if logits.shape[1] < 2:
        raise ValueError("need >= 2 logits: cross-entropy over one channel is identically zero")
    logits = logits.float()
    ce = F.cross_entropy(logits, target)
    prob = logits.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(prob.dtype)
    if dice not in DICE_DIMS:
        raise ValueError(f"dice must be one of {sorted(DICE_DIMS)}, not {dice!r} (e.g. 'batch')")
    inter = prob * onehot
    terms = []
    for dims in DICE_DIMS[dice]:
        d = (2 * inter.sum(dims) + smooth) / (prob.sum(dims) + onehot.sum(dims) + smooth)
        terms.append(1 - d[..., 1:].mean())  # classes are the last axis: (K,) or (B, K)
    dice_loss = sum(terms) / len(terms)
    return ce + dice_loss, dice_loss


class DeepSupervision(nn.Module):
    """A U-Net with extra 1x1 heads on the ``levels`` decoder outputs next to the full-resolution
    one (at 1/2, 1/4, ...), as nnU-Net trains; the coarsest decoder output is never supervised,
    as in nnU-Net.

    The heads exist only during training: checkpoints hold :attr:`net` alone, so inference, the
    service and the checkpoint format don't change. ``forward`` returns the logits at full,
    1/2, 1/4, ... resolution; inputs must already be a multiple of ``2**(depth-1)`` (training
    patches are).
    """

    @staticmethod
    def check(levels: int, depth: int, patch: int | None = None) -> None:
        """Raise ConfigError unless ``levels`` (and ``patch``, when given) suit a U-Net of ``depth``."""
        if not 1 <= levels <= depth - 2:
            raise ConfigError(f"deep supervision levels must be 0 or 1..depth-2 = {depth - 2}, got {levels}")
        if patch is not None and patch % 2 ** (depth - 1):
            raise ConfigError(f"deep supervision needs a patch that is a multiple of {2 ** (depth - 1)}, got {patch}")

    def __init__(self, net: UNet, levels: int) -> None:
        super().__init__()
        depth = net.config.depth
        self.check(levels, depth)
        self.net = net
        widths = [net.config.base_width * 2**i for i in range(depth - 1)]  # decoder widths, finest first
        self.aux = nn.ModuleList(nn.Conv2d(widths[k], net.config.num_classes, 1) for k in range(1, levels + 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        m = self.net.config.multiple
        if x.shape[-2] % m or x.shape[-1] % m:
            raise ValueError(f"deep supervision needs patches that are a multiple of {m}, got {tuple(x.shape[-2:])}")
        feats = self.net.decoder_features(x)  # coarsest first
        out = [self.net.head(feats[-1])]
        for k, head in enumerate(self.aux, start=1):
            out.append(head(feats[-1 - k]))
        return out


def deep_supervision_loss(
    outputs: list[torch.Tensor], target: torch.Tensor, dice: str = "batch"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice + CE at every resolution of :class:`DeepSupervision`'s outputs, weighted 1, 1/2,
    1/4, ... and normalised to sum to 1 (nnU-Net's weights). The labels at 1/s are the label at
    the centre of each s x s block. Returns (total loss, full-resolution Dice term)."""
    weights = [0.5**k for k in range(len(outputs))]
    terms = []
    for k, logits in enumerate(outputs):
        s = 2**k
        y = target[:, s // 2 :: s, s // 2 :: s]  # the whole target for s = 1
        if y.shape[-2:] != logits.shape[-2:]:
            raise ValueError(f"output {k} has shape {tuple(logits.shape[-2:])}, labels at 1/{s} {tuple(y.shape[-2:])}")
        terms.append(dice_ce_loss(logits, y, dice=dice))
    loss = torch.stack([w * lk for w, (lk, _) in zip(weights, terms, strict=True)]).sum() / sum(weights)
    return loss, terms[0][1]


def plain_unet(model: nn.Module) -> UNet:
    """The U-Net a checkpoint holds, under DDP, ``torch.compile`` and :class:`DeepSupervision`."""
    m = unwrap(model)
    if isinstance(m, DeepSupervision):
        m = m.net
    assert isinstance(m, UNet)
    return m


#: Training memory formats by name: ``--memory-format`` values and what provenance records.
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def memory_format_name(fmt: torch.memory_format) -> str:
    return next(name for name, f in MEMORY_FORMATS.items() if f == fmt)


#: mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_cpu_malloc() -> bool:
    """Stop glibc from unmapping large freed buffers, for a CPU training process (process-wide).

    A training step allocates and frees the same few dozen activation and gradient tensors of
    16-64 MB. glibc serves every allocation above its mmap threshold (dynamic, at most 32 MiB)
    with a fresh ``mmap`` and unmaps it on free, and trims the heap top, so each step page-faults
    and zeroes all its big tensors again. With the thresholds at 1 GiB and 2 GiB they stay in the
    heap and are reused: a 4 x 512 x 512 step of the base-16 U-Net went from 5.3-5.8 s to
    2.9-3.3 s on the 2-core development CPU. Same as ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=
    ...:glibc.malloc.trim_threshold=...``, but applied by the trainer itself, however it is
    launched. The cost: memory freed by training is kept by the process until it exits.

    Returns whether it was applied (glibc only; a no-op elsewhere).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_autocast(device: torch.device, amp_dtype: torch.dtype | None) -> torch.autocast:
    """The training forward's autocast: ``amp_dtype`` (from :data:`AMP_DTYPES`), or none for fp32."""
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


def resolve_amp(amp: str, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA, ``off`` (fp32) on a CPU.

    bf16 on a CPU is opt-in: on a CPU with native bf16 (:func:`segcore.inference.cpu_bf16_fast`:
    AVX-512 BF16 or AMX) a step runs 1.7-2.3x faster, but both phantom recipes trained that way
    scored lower on the development sets than in fp32 (docs/training.md, session 19). Elsewhere
    bf16 convolutions are emulated or take a slow path, so asking for it there logs a warning.
    """
    if amp not in ("auto", "off", *AMP_DTYPES):
        raise ValueError(f"amp must be auto, off, bf16 or fp16, got {amp!r}")
    if amp == "auto":
        return "bf16" if device.type == "cuda" else "off"
    if amp == "bf16" and device.type == "cpu" and not cpu_bf16_fast():
        log.warning("--amp bf16 on a CPU without native bf16 (AVX-512 BF16 or AMX): expect it to be slower than fp32")
    elif amp == "fp16" and device.type == "cpu":
        log.warning("--amp fp16 on a CPU: a test path (with the gradient scaler), not a fast one")
    return amp


def choose_memory_format(
    model: nn.Module,
    batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    requested: str = "auto",
    margin: float = 0.1,
    reps: int = 2,
    amp_dtype: torch.dtype | None = None,
) -> tuple[torch.memory_format, dict[str, float]]:
    """The memory format to train in: channels_last or contiguous (NCHW).

    channels_last suits tensor cores, so CUDA always gets it under ``auto``. On a CPU it depends
    on the shape: on the 2-core AVX2 development CPU, channels_last was 5-10 % faster for
    16 x 96 x 96 patches and 12-30 % slower for 4 x 512 x 512 slices (on session 19's AMX CPU it
    was faster for both). So ``auto`` on a CPU times forward + backward of a throw-away copy of
    the model on one real batch (``batch()``, called only then) in each format, under the run's
    autocast (``amp_dtype``: oneDNN's bf16 kernels favour channels_last), one warm-up each and
    then best of ``reps`` in alternating rounds, and takes NCHW only when it is faster by more
    than ``margin``: timing noise cannot flip the choice between formats that are about as fast,
    which keeps runs reproducible. The torch RNG state is restored afterwards.

    Returns:
        (format, seconds per step for each format timed; empty when nothing was timed).
    """
    if requested != "auto" and requested not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be auto, channels_last or contiguous, got {requested!r}")
    if requested != "auto":
        return MEMORY_FORMATS[requested], {}
    if device.type == "cuda":
        return torch.channels_last, {}
    times = dict.fromkeys(MEMORY_FORMATS, math.inf)
    with torch.random.fork_rng(devices=[]):
        x, y = batch()
        y = y.to(device)
        runs = {}
        for name, fmt in MEMORY_FORMATS.items():
            m = copy.deepcopy(model).to(device)
            runs[name] = (m.to(memory_format=fmt).train(), x.to(device).contiguous(memory_format=fmt))  # type: ignore[call-overload]
        # A warm-up each, then the formats alternate, so that neither gains from going second (a
        # heap already grown, caches warm) and a burst of load on a shared machine hits both.
        for i in range(reps + 1):
            for name, (m, xx) in runs.items():
                t0 = time.perf_counter()
                with amp_autocast(device, amp_dtype):
                    logits = m(xx)
                loss, _ = dice_ce_loss(logits, y)
                loss.backward()
                if i:
                    times[name] = min(times[name], time.perf_counter() - t0)
        del runs
    if times["contiguous"] < (1 - margin) * times["channels_last"]:
        return torch.contiguous_format, times
    return torch.channels_last, times


def first_batch(ds: SliceDataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The loader's first batch, read from the dataset directly (items are pure functions of their index)."""
    items = [ds[i] for i in range(min(batch_size, len(ds)))]
    return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])


def git_version() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip()
    except Exception:
        return "unknown"


def intensity_stats(cases: list[Case], cache_dir: Path, seed: int) -> tuple[tuple[float, float], float, float]:
    """nnU-Net's CT scheme: clip to the 0.5/99.5 percentiles of foreground HU, z-score with its mean/std."""
    key = hashlib.sha256("|".join(c.case_id for c in cases).encode()).hexdigest()[:12]
    f = cache_dir / f"intensity-{len(cases)}-{key}.json"
    if f.exists():
        d = json.loads(f.read_text())
        return (d["lo"], d["hi"]), d["mean"], d["std"]
    rng = np.random.default_rng(seed)
    samples = []
    # 30 cases give stable percentiles; loading all 150+ KiTS volumes twice would double preprocessing.
    pick = sorted(rng.choice(len(cases), size=min(30, len(cases)), replace=False))
    for c in (cases[i] for i in pick):
        assert c.image is not None and c.label is not None
        vol = load_volume(c.image)
        lab, _ = load_labels(c.label)
        fg = vol.data[lab > 0]
        if fg.size:
            samples.append(rng.choice(fg, size=min(fg.size, 20000), replace=False))
    allv = np.concatenate(samples) if samples else np.array([-100.0, 300.0])
    lo, hi = (float(v) for v in np.percentile(allv, [0.5, 99.5]))
    clipped = np.clip(allv, lo, hi)
    out = {"lo": lo, "hi": hi, "mean": float(clipped.mean()), "std": float(max(clipped.std(), 1.0))}
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(out))
    return (lo, hi), out["mean"], out["std"]


def case_metrics(
    case_id: str,
    pred: np.ndarray,
    ref: np.ndarray,
    zooms: Sequence[float],
    kits23_metrics: bool,
    seconds: float,
) -> dict[str, Any]:
    """One case's row: the KiTS19 metrics, pixel accuracy, the reference's tumor sizes, and the
    KiTS21/23 regions when asked."""
    row: dict[str, Any] = {"case": case_id, **kits19(pred, ref), **pixel_accuracy(pred, ref)}
    row.update(tumor_sizes(ref, zooms))
    if kits23_metrics:
        row.update({f"kits23_{k}": v for k, v in kits23(pred, ref, zooms).items()})
    row["seconds"] = seconds
    return row


def evaluate_cases(
    engine: Engine, cases: list[Case], kits23_metrics: bool = False, progress: bool = False
) -> list[dict[str, Any]]:
    """Whole-volume predictions on the input grid, scored with the KiTS metrics."""
    rows: list[dict[str, Any]] = []
    for c in tqdm(cases, desc="evaluate", disable=not progress, leave=False):
        vol, ref = _image_and_labels(c)
        t0 = time.perf_counter()
        pred = engine.predict(vol)
        secs = time.perf_counter() - t0
        rows.append(case_metrics(c.case_id, pred.mask, ref, vol.zooms, kits23_metrics, secs))
    return rows


def _image_and_labels(c: Case) -> tuple[Volume, np.ndarray]:
    """A case's image and its label map, which must lie on the image's voxel grid."""
    assert c.image is not None and c.label is not None
    vol = load_volume(c.image, mmap=True)  # mapped when uncompressed (DecodedCopies)
    ref, ref_affine = load_labels(c.label)
    check_grid(f"{c.case_id}: {c.label.name}", ref.shape, ref_affine, c.image.name, vol.shape, vol.affine)
    return vol, ref


#: a post-processing candidate: (the kidney-region component filter on, ``min_tumor_ml``)
Candidate = tuple[bool, float]


def sweep_postprocessing(
    engine: Engine,
    cases: list[Case],
    candidates: Sequence[float],
    filters: Sequence[bool] = (False, True),
    kits23_metrics: bool = False,
    progress: bool = False,
) -> dict[Candidate, list[dict[str, Any]]]:
    """Each candidate post-processing's rows on ``cases``, from one network run per case: the
    kidney-region component filter off or on (``filters``), then each ``min_tumor_ml`` of
    ``candidates``.

    The engine runs with both steps off and the rest of its checkpoint's post-processing; each
    candidate is then applied to a copy of that mask, in the engine's order (the filter, then the
    relabelling), with the checkpoint's ``max_components`` and ``min_fraction``. That is the mask
    the engine gives with the candidate in its checkpoint. ``seconds`` is the network's time, the
    same in every candidate's row.
    """
    meta = engine.meta
    tumor, kidney = meta.label_value("tumor"), meta.label_value("kidney")
    raw = dataclasses.replace(meta.postprocessing, keep_largest=False, min_tumor_ml=0.0)
    engine.meta = dataclasses.replace(meta, postprocessing=raw)
    filtered = dataclasses.replace(raw, keep_largest=True)
    fs, vs = sorted(set(filters)), sorted(set(candidates))
    rows: dict[Candidate, list[dict[str, Any]]] = {(f, v): [] for f in fs for v in vs}
    try:
        for c in tqdm(cases, desc="sweep", disable=not progress, leave=False):
            vol, ref = _image_and_labels(c)
            t0 = time.perf_counter()
            pred = engine.predict(vol)
            secs = time.perf_counter() - t0
            # Both steps change only the box that holds the foreground (pred.box), so one copy
            # serves every candidate: its box is reset before each.
            mask, box = pred.mask.copy(), pred.box or (slice(None),) * 3
            for f in fs:
                part = pred.mask[box].copy()
                if f:
                    keep_largest_components(part, filtered)
                for v in vs:
                    mask[box] = part
                    relabel_small_tumors(mask[box], v, vol.voxel_ml, tumor=tumor, kidney=kidney)
                    rows[f, v].append(case_metrics(c.case_id, mask, ref, vol.zooms, kits23_metrics, secs))
    finally:
        engine.meta = meta
    return rows


def choice_score(row: dict[str, Any]) -> float:
    """What ``postprocess --choose`` ranks a case by: the KiTS19 composite, or for a row with the
    KiTS21/23 regions, the mean of their mean Dice and mean Surface Dice, as KiTS23 ranks."""
    if "kits23_mean_sd" in row:
        return (float(row["kits23_mean_dice"]) + float(row["kits23_mean_sd"])) / 2.0
    return float(row["composite"])


def best_postprocessing(rows: dict[Candidate, list[dict[str, Any]]], min_gain: float = 0.0) -> Candidate:
    """The post-processing to keep, decided step by step as nnU-Net decides its own on the
    cross-validation: a step is kept only where it raises the mean :func:`choice_score` by more
    than ``min_gain`` over leaving it out.

    1. The component filter, both without relabelling: on only if it beats off (where only one
       setting was tried, that one).
    2. ``min_tumor_ml`` with that filter: the highest mean, of equal ones the smallest, and 0 (no
       relabelling) unless that one beats 0.
    """
    means = {k: float(np.mean([choice_score(r) for r in got])) for k, got in rows.items()}
    if not means:
        raise ValueError("no candidates")
    filters = sorted({f for f, _ in means})
    if filters == [False, True]:
        if (False, 0.0) not in means or (True, 0.0) not in means:
            raise ValueError("the filter is decided without relabelling: 0 mL must be a candidate")
        keep = means[True, 0.0] > means[False, 0.0] + min_gain
    else:
        keep = filters[0]
    mine = {v: m for (f, v), m in means.items() if f == keep}
    best = max(mine, key=lambda v: (mine[v], -v))  # the highest, then the smallest
    if 0.0 in mine and best != 0.0 and not mine[best] > mine[0.0] + min_gain:
        best = 0.0
    return keep, best


#: where a case's mask may be under a predictions folder, in this order: the flat
#: ``case_XXXXX.nii.gz`` that nnU-Net and MONAI write, and kitseg-predict's own layout
PREDICTION_NAMES = ("{case}.nii.gz", "{case}.nii", "{case}/imaging_mask.nii.gz")


def prediction_file(folder: str | Path, case_id: str) -> Path | None:
    """The mask for ``case_id`` under ``folder`` (:data:`PREDICTION_NAMES`), or None."""
    return next((f for n in PREDICTION_NAMES if (f := Path(folder) / n.format(case=case_id)).is_file()), None)


def score_predictions(
    cases: list[Case], folder: str | Path, kits23_metrics: bool = False, progress: bool = False
) -> list[dict[str, Any]]:
    """Another tool's masks (nnU-Net's, MONAI's, an earlier kitseg-predict run's) scored with
    the same KiTS metrics as :func:`evaluate_cases`. Each must be on its case's voxel grid (the
    labels' shape and affine), as segmentation tools write them; ``seconds`` is the scoring's."""
    paths = {c.case_id: prediction_file(folder, c.case_id) for c in cases}
    if missing := [case_id for case_id, path in paths.items() if path is None]:
        names = " or ".join(n.format(case="<case>") for n in PREDICTION_NAMES)
        raise DatasetError(f"no prediction ({names}) in {folder} for: {', '.join(missing)}")
    rows: list[dict[str, Any]] = []
    for c in tqdm(cases, desc="score", disable=not progress, leave=False):
        path = paths[c.case_id]
        assert c.label is not None and path is not None
        t0 = time.perf_counter()
        pred, pred_affine = load_labels(path)
        ref, affine = load_labels(c.label)
        check_grid(str(path), pred.shape, pred_affine, c.label.name, ref.shape, affine)
        zooms = nib.affines.voxel_sizes(affine).tolist()
        rows.append(case_metrics(c.case_id, pred, ref, zooms, kits23_metrics, time.perf_counter() - t0))
    return rows


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].plot(ep, [h["train_loss"] for h in history], label="train CE+Dice")
    ax[0].set_xlabel("epoch")
    ax[0].set_ylabel("loss")
    ax[0].legend()
    validated = [h for h in history if "val_composite" in h]  # every --val-every epochs
    for key, lbl in (
        ("val_kidney_dice", "kidney Dice"),
        ("val_tumor_dice", "tumor Dice"),
        ("val_composite", "composite"),
    ):
        ax[1].plot([h["epoch"] for h in validated], [h[key] for h in validated], marker="o", label=lbl)
    ax[1].set_xlabel("epoch")
    ax[1].set_ylabel("validation (whole volumes)")
    ax[1].set_ylim(0, 1)
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def collective_device(backend: str, local_rank: int) -> torch.device:
    """Where a rank's small control tensors (the memory format, the stop flag, the schedule's
    length) must be for ``backend``: NCCL broadcasts only CUDA tensors, and a CPU one fails with
    "No backend type associated with device type cpu"; gloo takes CPU tensors."""
    return torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")


class Distributed:
    """Rank/world size from ``torchrun``'s environment; a no-op when not launched by it.

    On CUDA each rank is bound to its GPU (``LOCAL_RANK``) before NCCL starts, and NCCL is told
    which one (``device_id``), so that it never has to guess; elsewhere the backend is gloo.
    ``timeout`` is how long a rank waits in a collective (a barrier, a broadcast) for the others:
    NCCL's default, 10 minutes, is short for a first KiTS run's preprocessing on a slow disk."""

    def __init__(self, device: torch.device, timeout: timedelta | None = None) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        backend = "nccl" if device.type == "cuda" else "gloo"
        if self.enabled and not dist.is_initialized():
            if backend == "nccl":
                torch.cuda.set_device(self.local_rank)
                dist.init_process_group(
                    backend="nccl", device_id=torch.device("cuda", self.local_rank), timeout=timeout
                )
            else:
                dist.init_process_group(backend="gloo", timeout=timeout)
        if self.enabled:  # the group's own backend, also where it was started before
            backend = str(dist.get_backend())
        self.control_device = collective_device(backend, self.local_rank)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_flag(self, flag: bool) -> bool:
        return bool(self.broadcast_int(1 if flag else 0))

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""
        if not self.enabled:
            return value
        t = torch.tensor([value], device=self.control_device)
        dist.broadcast(t, src=0)
        return int(t.item())

    def share(self, costs: Sequence[float]) -> list[int]:
        """The indices of the items this rank takes, given each item's cost (:func:`balanced_shares`)."""
        return balanced_shares(costs, self.world)[self.rank]

    def gather(self, mine: list[tuple[int, T]]) -> list[T]:
        """Every rank's ``(index, result)`` pairs, as one list in index order, on every rank."""
        pairs: list[list[tuple[int, T]]] = [mine]
        if self.enabled:
            pairs = [[] for _ in range(self.world)]
            dist.all_gather_object(pairs, mine)
        return [r for _, r in sorted((p for ps in pairs for p in ps), key=lambda p: p[0])]

    def sync_module(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank. Under DDP the parameters agree already,
        but each rank's BatchNorm running statistics (and a weight average's) last moved with its
        own batch, so without this the ranks would validate slightly different networks."""
        if self.enabled:
            for t in module.state_dict().values():
                dist.broadcast(t, src=0)

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def balanced_shares(costs: Sequence[float], world: int) -> list[list[int]]:
    """Item indices for each of ``world`` ranks, with about equal total cost: the costliest item
    first, each to the rank with the least so far (ties to the lower rank), so every rank computes
    the same answer. KiTS cases range from 29 to 1059 slices, so taking every ``world``-th case
    could leave one rank with several times another's work while the others wait for it."""
    shares: list[list[int]] = [[] for _ in range(world)]
    loads = [0.0] * world
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        shares[r].append(i)
        loads[r] += costs[i]
    return [sorted(s) for s in shares]


def epochs_that_fit(done: int, durations: list[float], elapsed_s: float, budget_s: float, planned: int) -> int:
    """How many epochs a run of ``planned`` can have when ``budget_s`` of wall time bounds it.

    ``done`` epochs are finished, ``elapsed_s`` into the budget, and ``durations`` are this
    process's epoch times so far (training and validation). The answer is ``done`` plus as many
    more as the rest of the budget holds at their median, counting the one that crosses the
    budget, as the ``max_minutes`` guard does (it stops after that one); never below ``done`` nor
    above ``planned``. Time-bounded runs do better annealed to the budget than cut off mid-schedule
    (Li et al., "Budgeted training", ICLR 2020), which is what the guard alone does on a slow CPU.
    """
    if not durations:
        return planned
    per = float(np.median(durations))
    more = math.ceil((budget_s - elapsed_s) / per) if per > 0 else planned
    return max(done, min(planned, done + max(0, more)))


def default_workers(device: torch.device) -> int:
    """DataLoader workers when ``--workers`` is not given.

    0 on a CPU: the training step already uses every core, and workers would take them from it.
    On CUDA the GPU waits for the patches, so one worker per core this rank can spare (the cores
    the process may run on, shared among the node's ranks, less one for the training loop
    itself), at most 12. One worker cuts about 60 whole 512x512 training slices a second on the
    development CPU (17 ms each, augmentation included), and a GPU trains on 400-500 a second.
    """
    if device.type != "cuda":
        return 0
    return max(1, min(12, available_cores() - 1))


def _infinite(loader: DataLoader[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from loader


def checkpoint_metrics(row: dict[str, Any], val_cases: int) -> dict[str, Any]:
    """What a checkpoint records of a validated epoch's metrics.jsonl row (and what a run reports
    as its best): the epoch, its KiTS19 scores and how many cases they average."""
    return {
        "epoch": row["epoch"],
        **{k: row[k] for k in ("val_kidney_dice", "val_tumor_dice", "val_composite")},
        "val_cases": val_cases,
    }


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train and return the best validation metrics. Writes into ``cfg.out``:
    ``best.safetensors``, ``last.safetensors``, ``last.state.pt``, ``metrics.jsonl``, ``curves.png``.
    """
    t_start = time.perf_counter()
    if not 0.0 <= cfg.ema < 1.0:
        raise ConfigError(f"ema decay must be in [0, 1), got {cfg.ema}")
    if cfg.fold is not None and cfg.val_cases:
        raise ConfigError("a fold names its validation cases; give --fold or --val-cases, not both")
    if cfg.splits and cfg.fold is None:
        raise ConfigError("a splits file holds folds; say which with --fold")
    if cfg.fit_schedule and cfg.max_minutes is None:
        raise ConfigError("fit_schedule fits the LR schedule to max_minutes; set max_minutes too")
    if cfg.val_every < 1:
        raise ConfigError(f"val_every must be >= 1, got {cfg.val_every}")
    if cfg.fit_schedule and cfg.val_every > 1:
        # The schedule's end is known only after an epoch, when it may already be the last.
        raise ConfigError("fit_schedule decides the last epoch after it ends; validate every epoch with it")
    if cfg.deep_supervision:
        # Checked before any preprocessing, so a wrong flag fails at once.
        DeepSupervision.check(cfg.deep_supervision, cfg.depth, cfg.patch)
    device = pick_device(cfg.device)  # cuda without CUDA: an error, not a fallback
    ddp = Distributed(device, timeout=timedelta(minutes=cfg.dist_timeout_minutes))
    if device.type == "cuda" and ddp.enabled:
        device = torch.device("cuda", ddp.local_rank)  # Distributed bound the rank to it
    seed_everything(cfg.seed + ddp.rank)
    malloc_tuned = device.type == "cpu" and cfg.tune_malloc and tune_cpu_malloc()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cfg.cache) if cfg.cache else out / "cache"

    all_cases = labelled(find_cases(cfg.data, label_file=cfg.label_file), cfg.data, cfg.label_file)
    if len(all_cases) < 2:
        raise DatasetError(f"need at least 2 cases with imaging and labels in {cfg.data}, found {len(all_cases)}")
    splits: list[dict[str, list[str]]] | None = None
    stats_cases: list[Case] | None = None  # whose intensities set the normalisation: the training cases
    if cfg.fold is not None:
        splits = read_splits(cfg.splits) if cfg.splits else kfold_splits([c.case_id for c in all_cases], cfg.folds)
        train_cases, val_cases = fold_cases(all_cases, splits, cfg.fold, cfg.data)
        # Every fold normalises as one, from all the folds' cases, as nnU-Net's dataset fingerprint
        # does: then the folds share one preprocessed cache, and their checkpoints can be ensembled.
        in_splits = {x for s in splits for x in s["train"] + s["val"]}
        stats_cases = [c for c in all_cases if c.case_id in in_splits]
        if ddp.main and (rest := len(all_cases) - len(train_cases) - len(val_cases)):
            log.info("fold %d of %s leaves out %d case(s) of %s", cfg.fold, cfg.splits, rest, cfg.data)
    elif cfg.val_cases:
        val_cases = select_cases(all_cases, cfg.val_cases, cfg.data, "validation case(s)")
        train_cases = [c for c in all_cases if c not in val_cases]
    else:
        train_cases, val_cases = split_cases(all_cases, cfg.val_fraction, cfg.seed)
    if cfg.max_train_cases:
        train_cases = train_cases[: cfg.max_train_cases]
    overlap = {c.case_id for c in train_cases} & {c.case_id for c in val_cases}
    assert not overlap, f"train/val overlap: {overlap}"
    if ddp.main:
        # The split in nnU-Net's format: copied into nnUNet_preprocessed/DatasetXXX/, it makes
        # nnU-Net train on the same patients (every fold when this run is one of them, else fold 0).
        used = splits or [{"train": [c.case_id for c in train_cases], "val": [c.case_id for c in val_cases]}]
        (out / "splits_final.json").write_text(json.dumps(used, indent=1) + "\n")

    num_classes = 4 if cfg.kits23 else 3
    labels = KITS23_LABELS if cfg.kits23 else KITS19_LABELS
    # Only rank 0 computes the intensity statistics; the others wait and then read them.
    stats_cases = stats_cases or train_cases
    # The folds pick the cases they sample intensities from alike, whatever their --seed.
    stats_seed = NNUNET_SPLIT_SEED if cfg.fold is not None else cfg.seed
    if ddp.main:
        clip, mean, std = (
            intensity_stats(stats_cases, cache_dir, stats_seed)
            if cfg.intensity == "auto"
            else ((-200.0, 300.0), 50.0, 80.0)
        )
    ddp.barrier()
    if not ddp.main:
        clip, mean, std = (
            intensity_stats(stats_cases, cache_dir, stats_seed)
            if cfg.intensity == "auto"
            else ((-200.0, 300.0), 50.0, 80.0)
        )
    spacing = (cfg.target_spacing_mm, cfg.target_spacing_mm) if cfg.target_spacing_mm else None
    pp = PreprocessConfig(target_spacing_mm=spacing, clip_hu=clip, mean=mean, std=std, antialias=cfg.antialias)
    mcfg = UNetConfig(
        in_slices=cfg.in_slices,
        num_classes=num_classes,
        base_width=cfg.base_width,
        depth=cfg.depth,
        norm=cfg.norm,
        block=cfg.block,
    )
    # Validation applies it too, so the best epoch is picked on what the checkpoint will produce.
    post = PostprocessConfig(min_tumor_ml=cfg.min_tumor_ml)
    cache = CaseCache(cache_dir, pp, num_classes)
    # Every rank builds its share of the cache (a first run's preprocessing: minutes for KiTS19),
    # so that no rank waits long at the barrier (--dist-timeout).
    my_cases = [train_cases[i] for i in ddp.share([case_bytes(c) for c in train_cases])]
    cache.fill(my_cases, workers=cfg.cache_workers, progress=cfg.progress and ddp.main)
    ddp.barrier()
    arrays = [cache.get(c) for c in train_cases]
    # Validation runs on whole volumes, each rank its share of the cases (rank 0 alone would keep
    # the others waiting), from uncompressed copies gunzipped once unless told otherwise.
    val_share = ddp.share([case_bytes(c) for c in val_cases])
    copies = DecodedCopies(cache_dir / "val")
    val_files = [copies.get(val_cases[i]) if cfg.val_copies else val_cases[i] for i in val_share]

    model: nn.Module = UNet(mcfg).to(device)
    ds = SliceDataset(
        arrays,
        context=mcfg.context,
        patch=cfg.patch,
        length=cfg.iters_per_epoch * cfg.batch_size,
        fg_fraction=cfg.fg_fraction,
        tumor_sampling=cfg.tumor_sampling,
        augment=Augment(),
        seed=cfg.seed * 1000 + ddp.rank,
    )
    workers = default_workers(device) if cfg.workers is None else cfg.workers
    loader = DataLoader(
        ds,
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=workers > 0,
    )
    amp = resolve_amp(cfg.amp, device)
    amp_dtype = AMP_DTYPES.get(amp)
    # Only rank 0 times the formats (the others would compete with it for the same cores); every
    # rank trains in its choice.
    fmt, fmt_times = (
        choose_memory_format(
            model, lambda: first_batch(ds, cfg.batch_size), device, cfg.memory_format, amp_dtype=amp_dtype
        )
        if ddp.main
        else (torch.channels_last, {})
    )
    if ddp.enabled:
        fmt = torch.channels_last if ddp.broadcast_flag(fmt == torch.channels_last) else torch.contiguous_format
    use_cl = fmt == torch.channels_last
    model = model.to(memory_format=fmt)  # type: ignore[call-overload]
    if cfg.deep_supervision:
        # After the format choice, which times the plain network: the heads are 1x1 convs.
        model = DeepSupervision(model, cfg.deep_supervision).to(device=device, memory_format=fmt)  # type: ignore[call-overload]
    if ddp.main:
        timed = ", ".join(f"{k} {v:.3f}s" for k, v in fmt_times.items())
        log.info(
            "training in %s, amp %s%s; glibc malloc tuning %s",
            "channels_last" if use_cl else "NCHW",
            amp,
            f" (one step: {timed})" if timed else "",
            "on" if malloc_tuned else "off",
        )
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # The average follows the plain U-Net (deep supervision's heads are never saved), with its
    # BatchNorm running statistics averaged alongside the weights (use_buffers).
    ema = (
        AveragedModel(plain_unet(model), multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
        if cfg.ema
        else None
    )
    schedule_epochs = cfg.epochs  # fit_schedule shortens it to the epochs that fit in max_minutes
    epoch_seconds: list[float] = []  # each epoch's wall time, training, validation and saving

    def lr_at(it: int) -> float:
        if cfg.lr_schedule == "constant":
            return cfg.lr
        total_iters = schedule_epochs * cfg.iters_per_epoch
        return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(it, total_iters) / total_iters)))

    start_epoch, history, best = 0, [], -1.0
    best_metrics: dict[str, Any] = {}
    if cfg.resume:
        state = torch.load(cfg.resume, map_location="cpu", weights_only=True)
        plain_unet(model).load_state_dict(state["model"])
        if cfg.deep_supervision:
            if "aux" not in state:
                raise ConfigError(
                    f"{cfg.resume} was trained without deep supervision; resume it without --deep-supervision"
                )
            unwrap(model).aux.load_state_dict(state["aux"])
        elif "aux" in state:
            raise ConfigError(
                f"{cfg.resume} was trained with deep supervision; resume it with the same --deep-supervision"
            )
        if ema is not None:
            if "ema" not in state:
                raise ConfigError(f"{cfg.resume} was trained without a weight average; resume it without --ema")
            ema.load_state_dict(state["ema"])
        elif "ema" in state:
            raise ConfigError(f"{cfg.resume} was trained with a weight average; resume it with the same --ema")
        opt.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"]) + 1
        history = json.loads(state["history"])
        best = float(state["best"])
        if validated := [h for h in history if "val_composite" in h]:
            # The first of the best, as best.safetensors holds it (a later tie doesn't replace it).
            h = max(validated, key=lambda h: h["val_composite"])
            best_metrics = checkpoint_metrics(h, len(val_cases))
        torch.set_rng_state(state["torch_rng"])
        # The run's clock goes on where it stopped: --max-minutes bounds the whole run, resumed
        # parts included, and --fit-schedule fits the schedule as it would have without the stop
        # (or to a new --epochs or --max-minutes). States from earlier versions of kitseg lack both.
        prior_s = float(state.get("elapsed_s", 0.0))
        t_start -= prior_s
        epoch_seconds = [float(d) for d in json.loads(state.get("epoch_seconds", "[]"))]
        if cfg.fit_schedule and cfg.max_minutes is not None:
            schedule_epochs = (
                epochs_that_fit(start_epoch, epoch_seconds, prior_s, 60 * cfg.max_minutes, cfg.epochs)
                if epoch_seconds
                else min(cfg.epochs, int(history[-1].get("schedule_epochs", cfg.epochs)))
                if history
                else cfg.epochs
            )
        if ddp.main:
            log.info(
                "resumed from %s after epoch %d, %.0fs into the run%s",
                cfg.resume,
                start_epoch,
                prior_s,
                f"; the LR schedule ends after epoch {schedule_epochs}" if cfg.fit_schedule else "",
            )
    if ddp.enabled:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    provenance = {
        "kitseg_version": segcore.__version__,
        "git": git_version(),
        "torch": torch.__version__,
        "device": str(device),
        "world_size": ddp.world,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": cfg.data_description or str(cfg.data),
        "train_cases": [c.case_id for c in train_cases],
        "val_cases": [c.case_id for c in val_cases],
        **(
            {"fold": cfg.fold, "splits": cfg.splits or f"{cfg.folds} folds as nnU-Net's (seed {NNUNET_SPLIT_SEED})"}
            if cfg.fold is not None
            else {}
        ),
        "train_config": {k: v for k, v in asdict(cfg).items() if k not in ("extra",)},
        "memory_format": memory_format_name(fmt),
        "amp": amp,
        "malloc_tuned": malloc_tuned,
        "workers": workers,
        "cudnn_benchmark": device.type == "cuda" and cfg.cudnn_benchmark,
    }
    log_path = out / "metrics.jsonl"
    if start_epoch == 0 and ddp.main and log_path.exists():
        log_path.unlink()
    stop = False
    for epoch in range(start_epoch, cfg.epochs):
        if epoch >= schedule_epochs:
            break
        ds.set_epoch(epoch)
        model.train()
        t_ep = time.perf_counter()
        losses: list[torch.Tensor] = []
        dices: list[torch.Tensor] = []
        it = _infinite(loader)
        bar = tqdm(
            range(cfg.iters_per_epoch),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not (cfg.progress and ddp.main),
            leave=False,
        )
        for i in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(epoch * cfg.iters_per_epoch + i)
            x, y = next(it)
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if use_cl:
                x = x.contiguous(memory_format=torch.channels_last)
            with amp_autocast(device, amp_dtype):
                logits = model(x)
            if cfg.deep_supervision:
                loss, dl = deep_supervision_loss(logits, y, dice=cfg.dice)
            else:
                loss, dl = dice_ce_loss(logits, y, dice=cfg.dice)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if ema is not None:
                ema.update_parameters(plain_unet(model))
            # Kept on the device: reading a loss back waits for the step to finish, and on a GPU
            # a wait per step leaves it idle while the next step is queued. Read once per epoch,
            # and every 5 steps for a progress bar that is shown.
            losses.append(loss.detach())
            dices.append(dl.detach())
            if i % 5 == 0 and not bar.disable:
                bar.set_postfix(loss=f"{float(torch.stack(losses[-20:]).mean()):.3f}")
        epoch_losses = torch.stack([torch.stack(losses), torch.stack(dices)]).float().mean(dim=1).tolist()
        train_secs = time.perf_counter() - t_ep
        slices_per_s = cfg.iters_per_epoch * cfg.batch_size * ddp.world / train_secs
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": epoch_losses[0],
            "train_dice_loss": epoch_losses[1],
            "lr": lr_at((epoch + 1) * cfg.iters_per_epoch),
            "schedule_epochs": schedule_epochs,
            "train_seconds": train_secs,
            "train_slices_per_s": slices_per_s,
        }
        # Every --val-every epochs, and always on the last: the run's own last epoch, or the one
        # the --max-minutes guard will stop after (it stops only after a validated epoch). Rank
        # 0's clock decides for all.
        over_budget = cfg.max_minutes is not None and (time.perf_counter() - t_start) / 60 > cfg.max_minutes
        validate = ddp.broadcast_flag((epoch + 1) % cfg.val_every == 0 or epoch + 1 >= schedule_epochs or over_budget)
        # What validation scores is what the checkpoints hold: the average when there is one.
        plain = cast(UNet, ema.module) if ema is not None else plain_unet(model)
        if validate:
            ddp.sync_module(plain)  # every rank validates the network rank 0 saves
            engine = Engine(
                plain,
                CheckpointMeta(mcfg, pp, labels, postprocessing=post),
                device,
                batch_size=cfg.val_batch_size,
                precision=cfg.val_precision,
                # The network changes every epoch; an ONNX export each time would buy little here.
                backend="torch",
                channels_last=use_cl,
            )
            t_val = time.perf_counter()
            my_rows = evaluate_cases(engine, val_files, kits23_metrics=False)
            if ddp.enabled:
                log.info(
                    "rank %d validated %d of %d case(s) in %.1fs",
                    ddp.rank,
                    len(my_rows),
                    len(val_cases),
                    time.perf_counter() - t_val,
                )
            rows = ddp.gather(list(zip(val_share, my_rows, strict=True)))
            plain.train()
            if ddp.main:
                summ = summarize([{k: v for k, v in r.items() if k != "case"} for r in rows])
                row.update({f"val_{k}": v for k, v in summ.items() if k != "seconds"})
                row["val_seconds"] = time.perf_counter() - t_val
        if ddp.main:
            row["elapsed_s"] = time.perf_counter() - t_start
            history.append(row)
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if validate:
                metrics = checkpoint_metrics(row, len(val_cases))
                meta = CheckpointMeta(
                    mcfg,
                    pp,
                    dict(labels),
                    metrics=metrics,
                    provenance=provenance,
                    name=cfg.extra.get("name", "kitseg-unet"),
                    postprocessing=post,
                )
                # last.safetensors is the last validated epoch's network; last.state.pt (for
                # --resume) is every epoch's.
                save_checkpoint(out / "last.safetensors", plain, meta)
                if row["val_composite"] > best:
                    best = row["val_composite"]
                    best_metrics = metrics
                    save_checkpoint(out / "best.safetensors", plain, meta)
            torch.save(
                {
                    "model": plain_unet(model).state_dict(),
                    "optimizer": opt.state_dict(),
                    "epoch": epoch,
                    "history": json.dumps(history),
                    "best": best,
                    "torch_rng": torch.get_rng_state(),
                    "elapsed_s": time.perf_counter() - t_start,
                    "epoch_seconds": json.dumps([*epoch_seconds, time.perf_counter() - t_ep]),
                    **({"aux": unwrap(model).aux.state_dict()} if cfg.deep_supervision else {}),
                    **({"ema": ema.state_dict()} if ema is not None else {}),
                },
                out / "last.state.pt",
            )
            plot_curves(history, out / "curves.png")
            msg = f"epoch {epoch + 1}: loss {row['train_loss']:.4f}  "
            if validate:
                msg += (
                    f"val kidney {row['val_kidney_dice']:.4f}  tumor {row['val_tumor_dice']:.4f}  "
                    f"composite {row['val_composite']:.4f}  "
                )
            msg += f"({slices_per_s:.1f} slices/s, {row['elapsed_s']:.0f}s elapsed)"
            log.info(msg)
            if cfg.progress:
                tqdm.write(msg)
            now = time.perf_counter()
            epoch_seconds.append(now - t_ep)
            if cfg.max_minutes is not None:
                stop = validate and (now - t_start) / 60 > cfg.max_minutes
                if cfg.fit_schedule:
                    fit = epochs_that_fit(epoch + 1, epoch_seconds, now - t_start, 60 * cfg.max_minutes, cfg.epochs)
                    if fit != schedule_epochs:
                        log.info("the LR schedule now ends after epoch %d (what fits in --max-minutes)", fit)
                    schedule_epochs = fit
        if cfg.fit_schedule:
            schedule_epochs = ddp.broadcast_int(schedule_epochs)
        if ddp.broadcast_flag(stop):
            break
    ddp.barrier()
    ddp.close()
    # Rank 0's alone: the other ranks keep no history of their own (a resumed one has the file's).
    return {"best": best_metrics if ddp.main else {}, "history": history, "elapsed_s": time.perf_counter() - t_start}
