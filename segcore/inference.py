"""The inference engine: one model over a whole volume, the same code for the service and the CLIs.

Memory stays bounded by the batch: each batch of slices is resampled to the model grid,
normalised, run, its logits resampled back to the native in-plane size, and reduced at once to
a uint8 argmax written into a preallocated canonical mask. Full-volume float logits never exist.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch

from segcore.checkpoint import CheckpointMeta, load_checkpoint
from segcore.io import Volume
from segcore.postprocess import keep_largest_components
from segcore.preprocessing import (
    canonical_info,
    canonical_view,
    context_indices,
    model_grid,
    normalize,
    resample_slices,
)
from segcore.unet import UNet, fold_batch_norm

log = logging.getLogger(__name__)


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without CUDA is an error, not a fallback."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but torch.cuda.is_available() is False")
    return torch.device(requested)


@dataclass
class Prediction:
    """A segmentation on the input's voxel grid.

    Attributes:
        mask: ``(i, j, k)`` uint8 labels, the input's shape.
        confidence: label -> mean softmax probability of the pixels predicted as that label,
            on the model's grid.
        timings_ms: stage -> milliseconds.
    """

    mask: npt.NDArray[np.uint8]
    confidence: dict[int, float]
    timings_ms: dict[str, float] = field(default_factory=dict)


class Engine:
    """Runs a loaded :class:`UNet` over volumes with the checkpoint's own preprocessing.

    Args:
        model: the network, already on ``device``.
        meta: the checkpoint metadata (preprocessing, labels).
        device: where to run.
        batch_size: slices per forward; the memory bound.
        precision: ``auto`` (bf16 on CUDA, fp32 on CPU), ``fp32``,
            ``bf16`` or ``fp16`` (CUDA only).
        channels_last: use NHWC memory format (helps BatchNorm U-Nets on CPU and tensor cores).
    """

    def __init__(
        self,
        model: UNet,
        meta: CheckpointMeta,
        device: torch.device,
        batch_size: int = 8,
        precision: str = "auto",
        channels_last: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
        if precision == "fp16" and device.type != "cuda":
            raise ValueError("fp16 is only supported on CUDA; use bf16 or fp32 on CPU")
        self.meta = meta
        self.device = device
        self.batch_size = batch_size
        if precision == "auto":
            # bf16 on CUDA only: with torch 2.13's CPU build, bf16 autocast sends this U-Net's
            # convolutions to aten::_slow_conv2d_forward, about 7x slower than fp32 on our
            # AVX-512 CPU (docs/benchmarks.md). bf16 stays selectable.
            precision = "bf16" if device.type == "cuda" else "fp32"
        self.precision = precision
        self.channels_last = channels_last
        self.model = fold_batch_norm(copy.deepcopy(model).eval()).to(device)
        if channels_last:
            # The stubs of Module.to omit memory_format; torch supports it at runtime.
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload,unused-ignore]

    @classmethod
    def from_checkpoint(cls, path: str, device: str = "auto", **kwargs: object) -> Engine:
        dev = pick_device(device)
        model, meta = load_checkpoint(path, device=dev)
        return cls(model, meta, dev, **kwargs)  # type: ignore[arg-type]

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def warmup(self, size: tuple[int, int] = (128, 128)) -> None:
        """One forward at a realistic size so the first request pays no lazy-initialisation cost."""
        x = torch.zeros((min(2, self.batch_size), self.meta.model.in_slices, *size), device=self.device)
        with torch.inference_mode(), self._autocast():
            self.model(x.contiguous(memory_format=torch.channels_last) if self.channels_last else x)
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _batches(self, n: int, batch_size: int) -> Iterator[tuple[int, int]]:
        for k0 in range(0, n, batch_size):
            yield k0, min(n, k0 + batch_size)

    def predict(
        self,
        volume: Volume,
        progress: Callable[[int, int], None] | None = None,
        batch_size: int | None = None,
    ) -> Prediction:
        """Segment ``volume``; the mask comes back on the input's own grid.

        Args:
            volume: the CT, any orientation.
            progress: called with ``(slices_done, slices_total)`` after each batch.
            batch_size: overrides the engine's batch size for this call (OOM retries).
        """
        t0 = time.perf_counter()
        bs = batch_size or self.batch_size
        cfg = self.meta.preprocessing
        ctx = self.meta.model.context
        ncls = self.meta.model.num_classes
        canon = canonical_info(volume.affine, volume.shape)
        view = canonical_view(volume.stored, canon)  # (Z, Y, X), no copy
        z, y, x = view.shape
        grid = model_grid((y, x), (canon.spacing_zyx[1], canon.spacing_zyx[2]), cfg)
        # The mask is allocated once on the input's own grid; each batch's labels go in through a
        # canonical view of it, so there is no second mask and no copy back.
        mask = np.empty(volume.shape, dtype=np.uint8, order="F")
        mask_zyx = canonical_view(mask, canon)
        conf_sum = torch.zeros(ncls, dtype=torch.float64)
        conf_cnt = torch.zeros(ncls, dtype=torch.float64)
        t_pre = t_model = t_post = 0.0
        pin = self.device.type == "cuda"
        with torch.inference_mode():
            for k0, k1 in self._batches(z, bs):
                ta = time.perf_counter()
                # Each slice is read, converted, resampled and normalised once, then stacked into
                # its neighbours' 2.5D inputs: a batch of B with context k touches B + 2k slices,
                # not B * (2k + 1).
                lo, hi = max(0, k0 - ctx), min(z, k1 + ctx)
                slab = torch.from_numpy(volume.to_hu(view[lo:hi]))[:, None]  # (S, 1, Y, X) float32
                if pin:
                    slab = slab.pin_memory()
                slab = slab.to(self.device, non_blocking=True)
                slab = normalize(resample_slices(slab, grid), cfg)[:, 0]  # (S, h, w)
                idx = torch.from_numpy(context_indices(np.arange(k0, k1), ctx, z) - lo).to(self.device)
                t = slab[idx]  # (B, C, h, w)
                if self.channels_last:
                    t = t.contiguous(memory_format=torch.channels_last)
                tb = time.perf_counter()
                with self._autocast():
                    logits = self.model(t)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                tc = time.perf_counter()
                logits = logits.float()
                # Confidence is measured on the model's grid (4x fewer pixels than a 512x512
                # input at the demo model's spacing); labels come from logits resampled to the
                # input's grid. max(), not argmax(): the same indices, 10x faster on CPU here.
                prob, plab = torch.softmax(logits, dim=1).max(dim=1)
                conf_sum += torch.bincount(plab.flatten(), weights=prob.flatten().double(), minlength=ncls).cpu()
                conf_cnt += torch.bincount(plab.flatten(), minlength=ncls).double().cpu()
                lab8 = resample_slices(logits, (y, x)).max(dim=1).indices.to(torch.uint8)
                mask_zyx[k0:k1] = lab8.cpu().numpy()
                td = time.perf_counter()
                t_pre += tb - ta
                t_model += tc - tb
                t_post += td - tc
                if progress is not None:
                    progress(k1, z)
        ts = time.perf_counter()
        keep_largest_components(mask, self.meta.postprocessing)
        t_inv = time.perf_counter() - ts
        confidence = {c: float(conf_sum[c] / conf_cnt[c]) if conf_cnt[c] > 0 else 0.0 for c in range(ncls)}
        return Prediction(
            mask=mask,
            confidence=confidence,
            timings_ms={
                "preprocess": 1000 * t_pre,
                "model": 1000 * t_model,
                "postprocess": 1000 * (t_post + t_inv),
                "engine_total": 1000 * (time.perf_counter() - t0),
            },
        )
