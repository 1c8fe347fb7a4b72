"""Post-processing of a whole-volume mask, recorded in the checkpoint and applied by the engine.

A 2D network sees one slice at a time and can fire on bowel or spleen far from any kidney. In
KiTS, tumors and cysts are part of the kidney region (labels > 0), so, as nnU-Net does, we keep
only the largest connected components of that region: at most ``max_components`` (two kidneys),
and only those at least ``min_fraction`` of the largest.

A checkpoint may also set ``min_tumor_ml``: tumor components smaller than that many millilitres
become kidney. The network leaves specks of a few voxels of "tumor" on the kidney, and under the
KiTS19 definition one such speck in a tumor-free case costs that case's whole tumor Dice (it
scores 0 instead of 1). The value is chosen on development data after training, as nnU-Net
chooses its post-processing; docs/training.md records how the phantom recipes' 0.5 mL was.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import cc3d
import numpy as np
import numpy.typing as npt

from segcore.preprocessing import unflipped


@dataclass(frozen=True)
class PostprocessConfig:
    """Attributes:
    keep_largest: apply the component filter at all.
    max_components: how many foreground components may survive (2 kidneys).
    min_fraction: smallest surviving component, as a fraction of the largest.
    min_tumor_ml: tumor components (26-connected) smaller than this become kidney; 0 turns it off.
    """

    keep_largest: bool = True
    max_components: int = 2
    min_fraction: float = 0.1
    min_tumor_ml: float = 0.0

    def __post_init__(self) -> None:
        if self.max_components < 1:
            raise ValueError(f"max_components must be >= 1, got {self.max_components}")
        if not 0.0 <= self.min_fraction <= 1.0:
            raise ValueError(f"min_fraction must be in [0, 1], got {self.min_fraction}")
        if not (math.isfinite(self.min_tumor_ml) and self.min_tumor_ml >= 0.0):
            raise ValueError(f"min_tumor_ml must be a finite volume >= 0 mL, got {self.min_tumor_ml}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PostprocessConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown PostprocessConfig fields {sorted(unknown)}")
        return cls(**d)


def keep_largest_components(mask: npt.NDArray[np.uint8], cfg: PostprocessConfig) -> npt.NDArray[np.uint8]:
    """Zero every foreground component that is not among the kept ones (in place; returns ``mask``).

    ``mask`` may be any 3D view, such as a box known to hold all the foreground (26-connectivity
    doesn't depend on axis order or flips).
    """
    if not cfg.keep_largest:
        return mask
    # Everything works with the axes in memory order: the engine's box is a flipped, transposed
    # view of an F-ordered mask, whose copy in the view's own order cost 8x more, and whose
    # components (26-connected) are the same either way.
    view, axes, flipped = _memory_order(mask)
    bb = foreground_bbox(view)
    if bb is None:
        return mask
    # Components are labelled inside the foreground's bounding box only: cc3d's uint32 labels
    # for a whole 512x512x600 volume would cost 4 bytes per voxel.
    crop = view[bb]
    fg = np.ascontiguousarray(crop > 0)
    cc, n = cc3d.connected_components(fg, connectivity=26, return_N=True)
    if n <= 1:
        return mask
    labels = cc[fg]  # the foreground's labels only: a bincount over the whole box converts
    sizes = np.bincount(labels, minlength=n + 1)  # every label to int64 first (4x the labelling)
    sizes[0] = 0
    k = cfg.max_components

    def voxels() -> tuple[npt.NDArray[np.integer], npt.NDArray[np.intp]]:
        coords = np.nonzero(fg)  # in the order of ``labels``
        caller = [np.empty(0, dtype=np.intp)] * 3
        for i, a in enumerate(axes):
            c = coords[i] + bb[i].start  # along the memory-ordered axis i of the whole view
            caller[a] = mask.shape[a] - 1 - c if flipped[a] else c
        return labels, np.ravel_multi_index(tuple(caller), mask.shape)

    order = components_by_size(sizes, k, voxels)
    largest = sizes[order[0]]
    keep = [c for c in order[:k] if sizes[c] >= cfg.min_fraction * largest and sizes[c] > 0]
    if len(keep) == n:
        return mask  # every component survives
    drop_lut = np.ones(n + 1, dtype=bool)
    drop_lut[0] = False
    drop_lut[keep] = False
    # Only the dropped voxels are written, found among the foreground's (in the order of
    # ``labels``): looking every voxel of the box up in the table cost 1.6x more on a
    # 200-slice case, though the dropped components are usually a few specks.
    gone = np.flatnonzero(fg)[drop_lut[labels]]
    crop[np.unravel_index(gone, crop.shape)] = 0  # crop is a view of mask's: this writes into mask
    return mask


def components_by_size(
    sizes: npt.NDArray[np.integer],
    k: int,
    voxels: Callable[[], tuple[npt.NDArray[np.integer], npt.NDArray[np.intp]]],
) -> npt.NDArray[np.intp]:
    """Component labels, largest first, for keeping the first ``k`` (``sizes[label]``, with
    ``sizes[0] = 0`` for the background).

    Where the k-th and the next are equal in size, which are kept must not depend on the file's
    layout: as if labelled in the caller's scan order, the tied component whose first voxel comes
    first in that order wins. ``voxels()`` gives each foreground voxel's label and its index in
    that order; it is called only then.
    """
    order = np.argsort(-sizes, kind="stable")
    if len(sizes) - 1 > k and sizes[order[k - 1]] == sizes[order[k]]:
        labels, scan = voxels()
        tied = sizes == sizes[order[k - 1]]
        first = np.full(len(sizes), np.iinfo(np.intp).max, dtype=np.intp)
        sel = tied[labels]
        np.minimum.at(first, labels[sel], scan[sel])
        order = np.lexsort((first, -sizes))
    return order


def memory_axes(a: npt.NDArray[Any]) -> list[int]:
    """``a``'s axes from the largest stride to the smallest (flipped or not): ``a.transpose`` by
    them is walked in memory order by C-order loops and copies."""
    return [int(d) for d in np.argsort([-abs(s) for s in a.strides], kind="stable")]


def _memory_order(view: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], list[int], list[bool]]:
    """The same voxels as a view with non-negative strides, largest first, so that a C-order
    copy of it (or an elementwise result) reads memory in order; for 3D operations that don't
    depend on axis order or flips, such as 26-connected components. Also, for each of its axes,
    the caller's axis it is, and for each of the caller's axes, whether it was flipped."""
    view, flips = unflipped(view)
    axes = memory_axes(view)
    return view.transpose(axes), axes, [a in flips for a in range(view.ndim)]


def foreground_bbox(mask: npt.NDArray[np.generic]) -> tuple[slice, slice, slice] | None:
    """Bounding box of the non-zero voxels as slices, or None when there are none.

    One pass over the whole array finds the range along the axis with the largest stride; the
    other two ranges are found inside that slab only, which for a small foreground is a small
    part of the array. No volume-sized temporary is made.
    """
    order = sorted(range(3), key=lambda a: -abs(mask.strides[a]))
    box = [slice(0, n) for n in mask.shape]
    for axis in order:
        other = tuple(a for a in range(3) if a != axis)
        # any() straight on the mask: ``mask != 0`` would first fill a volume-sized boolean map,
        # whose fresh pages cost 5-15x the scan itself in a new process.
        idx = np.flatnonzero(mask[tuple(box)].any(axis=other))
        if idx.size == 0:
            return None
        box[axis] = slice(int(idx[0]), int(idx[-1]) + 1)  # each axis is narrowed once, from 0
    return (box[0], box[1], box[2])


def relabel_small_tumors(
    mask: npt.NDArray[np.uint8], min_ml: float, voxel_ml: float, tumor: int = 2, kidney: int = 1
) -> npt.NDArray[np.uint8]:
    """Turn every ``tumor`` component smaller than ``min_ml`` into ``kidney`` (in place; returns ``mask``).

    ``mask`` may be any 3D view (a box holding all the foreground); ``voxel_ml`` is one voxel's
    volume in millilitres. The kidney region (labels > 0) doesn't change, so neither does kidney Dice.
    """
    if min_ml <= 0.0:
        return mask
    if voxel_ml <= 0.0:
        raise ValueError(f"voxel volume must be > 0 mL, got {voxel_ml}")
    view = _memory_order(mask)[0]  # components don't depend on axis order: read memory in order
    is_tumor = np.ascontiguousarray(view == tumor)
    if not is_tumor.any():
        return mask
    # A component of n voxels is below min_ml exactly when n < ceil(min_ml / voxel_ml).
    min_voxels = math.ceil(min_ml / voxel_ml)
    kept = cc3d.dust(is_tumor, threshold=min_voxels, connectivity=26).astype(bool, copy=False)
    view[is_tumor & ~kept] = kidney
    return mask
