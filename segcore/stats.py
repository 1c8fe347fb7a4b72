"""Per-class statistics of a mask, the numbers a clinician asks for.

Volumes come from the header's voxel size (mL = mm^3 / 1000); positions are world (RAS+) mm from
the affine. Connected components use ``connected-components-3d`` (26-connectivity) inside each
class's bounding box. Kidney gets a left/right split (patient left = world -x in RAS+), with the
tumor volume inside each side; tumor gets its largest axial diameter.

:func:`compute_statistics` works inside the box that holds all the foreground (every class lies
in it): the engine's, or one scan of the whole mask finds it.
"""

from __future__ import annotations

import contextlib
from typing import Any

import cc3d
import numpy as np
import numpy.typing as npt
from scipy.spatial import ConvexHull, QhullError

from segcore.io import Volume
from segcore.postprocess import components_by_size, foreground_bbox, memory_axes
from segcore.preprocessing import canonical_info, canonical_view

#: voxels this close to the kidneys' midline count as left (see :func:`kidney_sides`)
MIDLINE_TOL_MM = 1e-6


def _world(affine: npt.NDArray[np.float64], ijk: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _mean_index(sel: npt.NDArray[np.bool_], p: list[int], n: int) -> npt.NDArray[np.float64]:
    """Mean voxel index (in the caller's axes) of the ``n`` voxels of ``sel``, a memory-ordered
    array whose axis ``a`` is the caller's axis ``p[a]``. From the counts per index along each
    axis: integer sums, so the result is the same in any layout (and equals ``argwhere().mean()``)."""
    # Two passes over the bytes instead of one per axis: counts per (axis 0, axis 1) pair summed
    # along the fastest axis, then per index of the fastest axis (rows added elementwise).
    u = np.ascontiguousarray(sel).view(np.uint8)
    plane = np.add.reduce(u, axis=2, dtype=np.int64)
    last = np.add.reduce(u.reshape(-1, u.shape[2]), axis=0, dtype=np.int64)
    out = np.empty(3)
    for a, per_index in enumerate((plane.sum(axis=1), plane.sum(axis=0), last)):
        out[p[a]] = float(np.arange(sel.shape[a], dtype=np.int64) @ per_index) / n
    return out


def _component_sizes(cc: npt.NDArray[np.integer], sel: npt.NDArray[np.bool_], n: int) -> npt.NDArray[np.intp]:
    """Voxels per label of ``cc``, a labelling of ``sel`` with labels ``1..n`` (``sizes[0] = 0``).
    Counted over the labelled voxels only: a bincount of the whole box converts every label to
    int64 first, about 3x the time on a 200-slice case's kidney box."""
    return np.bincount(cc[sel], minlength=n + 1)


def max_axial_diameter_mm(mask: npt.NDArray[np.bool_], volume: Volume) -> float:
    """Largest in-plane (axial, canonical Z slices) Feret diameter of ``mask`` in mm.

    ``mask`` may be any box cut out of ``volume``'s grid: only the axes' directions and spacing matter.
    """
    canon = canonical_info(volume.affine, (int(mask.shape[0]), int(mask.shape[1]), int(mask.shape[2])))
    view = canonical_view(mask, canon)  # (Z, Y, X)
    _, sy, sx = canon.spacing_zyx
    best = 0.0
    for k in np.nonzero(view.reshape(view.shape[0], -1).any(1))[0]:
        plane = np.ascontiguousarray(view[k])
        # Each row's first and last pixel: the corners of the pixels between them lie on the
        # segments joining theirs, so the hull (and its diameter) is the same with them alone.
        rows = np.flatnonzero(plane.any(1))
        first = plane[rows].argmax(1)
        last = plane.shape[1] - 1 - plane[rows, ::-1].argmax(1)
        ys, xs = np.concatenate([rows, rows]), np.concatenate([first, last])
        pts = np.stack([ys * sy, xs * sx], axis=1).astype(np.float64)
        # Use the pixel corners so a single pixel measures its own width, not 0.
        corners = np.concatenate([pts + np.array([dy, dx]) for dy in (-sy / 2, sy / 2) for dx in (-sx / 2, sx / 2)])
        if len(corners) > 4:
            with contextlib.suppress(QhullError):
                corners = corners[ConvexHull(corners).vertices]
        d = np.sqrt(((corners[:, None, :] - corners[None, :, :]) ** 2).sum(-1)).max()
        best = max(best, float(d))
    return best


def _box_of(mask: npt.NDArray[np.generic], box: tuple[slice, slice, slice] | None) -> tuple[slice, slice, slice]:
    if box is None:
        return (slice(0, mask.shape[0]), slice(0, mask.shape[1]), slice(0, mask.shape[2]))
    return box


def class_statistics(
    mask: npt.NDArray[np.uint8],
    volume: Volume,
    label: int,
    name: str,
    confidence: float | None,
    region: tuple[int, ...] | None = None,
    box: tuple[slice, slice, slice] | None = None,
    want_largest: bool = False,
) -> tuple[dict[str, Any], npt.NDArray[np.bool_] | None]:
    """Statistics of ``label`` (or of the union ``region``) in ``mask`` on ``volume``'s grid, and
    with ``want_largest`` its largest component from the same labelling (else None).

    ``box``: a box of ``mask`` known to hold every voxel of the label; only it is read.
    The largest component comes as a boolean box in ``mask``'s axes (any box of the grid will do
    for its axial diameter); ties go to the component whose first voxel comes first in the
    mask's index order, as in :func:`segcore.postprocess.components_by_size`.
    """
    voxel_ml = volume.voxel_ml
    box = _box_of(mask, box)
    part = mask[box]
    sel = np.isin(part, region) if region else part == label
    n = int(np.count_nonzero(sel))
    out: dict[str, Any] = {
        "label": label,
        "name": name,
        "present": n > 0,
        "voxels": n,
        "volume_ml": n * voxel_ml,
        "components": 0,
        "largest_component_ml": 0.0,
        "bbox_voxels": None,
        "bbox_size_mm": None,
        "centroid_mm": None,
        "hu": None,
        "mean_confidence": confidence,
        "touches_border": False,
    }
    if region:
        out["labels"] = list(region)
    bb = foreground_bbox(sel) if n else None
    if bb is None:
        return out, None
    # Components, sizes and centroid from the class's box read in memory order (components and
    # means don't depend on axis order); its axis a is the mask's axis p[a].
    crop = sel[bb]
    p = memory_axes(crop)
    cm = np.ascontiguousarray(crop.transpose(p))
    cc, ncomp = cc3d.connected_components(cm, connectivity=26, return_N=True)
    sizes = _component_sizes(cc, cm, ncomp)
    out["components"] = int(ncomp)
    out["largest_component_ml"] = float(sizes.max()) * voxel_ml
    largest = None
    if want_largest:
        if ncomp > 1:

            def voxels() -> tuple[npt.NDArray[np.integer], npt.NDArray[np.intp]]:
                idx = np.nonzero(cc)  # in memory order; the mask's own index order breaks ties
                return cc[idx], np.ravel_multi_index([idx[p.index(a)] for a in range(3)], crop.shape)

            top = components_by_size(sizes, 1, voxels)[0]
            largest = (cc == top).transpose(np.argsort(p))
        else:
            largest = crop
    # From here on in the whole mask's voxel indices.
    bb = tuple(slice(s.start + b.start, s.stop + b.start) for s, b in zip(bb, box, strict=True))  # type: ignore[assignment]
    lo = [s.start for s in bb]
    hi = [s.stop - 1 for s in bb]
    out["bbox_voxels"] = {"min": lo, "max": hi}
    out["bbox_size_mm"] = [float((h - l + 1) * z) for l, h, z in zip(lo, hi, volume.zooms, strict=True)]
    centroid_ijk = _mean_index(cm, p, n) + np.asarray(lo, dtype=np.float64)
    out["centroid_mm"] = [float(v) for v in _world(volume.affine, centroid_ijk[None])[0]]
    vals = volume.to_hu(volume.stored[bb].transpose(p)[crop.transpose(p)])
    out["hu"] = {  # accumulated in float64: the same to rounding in any voxel order
        "mean": float(vals.mean(dtype=np.float64)),
        "std": float(vals.std(dtype=np.float64)),
        "min": float(vals.min()),
        "max": float(vals.max()),
    }
    shape = mask.shape
    out["touches_border"] = any(l == 0 for l in lo) or any(h == s - 1 for h, s in zip(hi, shape, strict=True))
    return out, largest


def _label_counts(labels: npt.NDArray[Any], tumor_label: int) -> npt.NDArray[np.int64]:
    """Voxels of ``labels`` that are foreground (> 0), kidney (1) and ``tumor_label``."""
    return np.array(
        [np.count_nonzero(labels), np.count_nonzero(labels == 1), np.count_nonzero(labels == tumor_label)],
        dtype=np.int64,
    )


def kidney_sides(
    mask: npt.NDArray[np.uint8],
    volume: Volume,
    tumor_label: int = 2,
    box: tuple[slice, slice, slice] | None = None,
) -> dict[str, Any]:
    """Left/right split of the kidney region (labels > 0) with the tumor volume in each side.

    The midline is halfway between the two largest components' centroids when there are two,
    else the centre of the field of view; each voxel goes to the side of the midline it lies on
    (within :data:`MIDLINE_TOL_MM` of it: left). Equal sizes at the second place go to the
    component whose first voxel comes first in the mask's index order (as in
    :func:`segcore.postprocess.components_by_size`).
    ``box``: a box of ``mask`` known to hold all its foreground; only it is read.
    """
    voxel_ml = volume.voxel_ml
    box = _box_of(mask, box)
    part = mask[box]
    region = part > 0
    empty = {"kidney_ml": 0.0, "tumor_ml": 0.0, "total_ml": 0.0, "present": False}
    bb = foreground_bbox(region)
    if bb is None:
        return {"left": dict(empty), "right": dict(empty), "midline_x_mm": None}
    # One labelling of the region's box, read in memory order; its axis a is the mask's p[a].
    crop = region[bb]
    p = memory_axes(crop)
    lo = np.array([s.start + b.start for s, b in zip(bb, box, strict=True)], dtype=np.float64)
    cm = np.ascontiguousarray(crop.transpose(p))
    cc, n = cc3d.connected_components(cm, connectivity=26, return_N=True)
    ax, x0 = volume.affine[0, :3], float(volume.affine[0, 3])
    if n >= 2:
        sizes = _component_sizes(cc, cm, n)

        def voxels() -> tuple[npt.NDArray[np.integer], npt.NDArray[np.intp]]:
            idx = np.nonzero(cc)  # in memory order; the mask's own index order breaks ties
            return cc[idx], np.ravel_multi_index([idx[p.index(a)] for a in range(3)], crop.shape)

        top2 = components_by_size(sizes, 2, voxels)[:2]
        # World x is linear in the voxel index: a component's mean world x is its mean voxel's.
        cx = [float(ax @ (_mean_index(cc == c, p, int(sizes[c])) + lo)) + x0 for c in top2]
        midline = 0.5 * (cx[0] + cx[1])
    else:
        centre = (np.array(volume.shape, dtype=np.float64) - 1) / 2
        midline = float(_world(volume.affine, centre[None])[0, 0])
    # Voxels within MIDLINE_TOL_MM of the midline go left: a plane of voxels can lie exactly on
    # it (two mirror-image kidneys), and float rounding must not decide their side.
    labels = part[bb]  # the mask's axes
    along = np.flatnonzero(ax)
    if along.size == 1:
        # World x follows one voxel axis (no obliquity in x): the right side is a slab of the box.
        k = int(along[0])
        x = ax[k] * (np.arange(labels.shape[k]) + lo[k]) + x0
        right_idx = np.flatnonzero(x > midline + MIDLINE_TOL_MM)  # one run, at one end of the axis
        cut: list[slice] = [slice(None)] * 3
        cut[k] = slice(int(right_idx[0]), int(right_idx[-1]) + 1) if right_idx.size else slice(0, 0)
        slab = labels[tuple(cut)]
        counts_r = _label_counts(slab, tumor_label)
        counts_all = _label_counts(labels, tumor_label)
        counts = {"right": counts_r, "left": counts_all - counts_r}
    else:
        idx = np.nonzero(cm)
        world_x = sum(float(ax[p[a]]) * (idx[a] + lo[p[a]]) for a in range(3)) + x0
        right = world_x > midline + MIDLINE_TOL_MM
        vals = labels.transpose(p)[idx]
        counts_r = _label_counts(vals[right], tumor_label)
        counts = {"right": counts_r, "left": _label_counts(vals, tumor_label) - counts_r}
    out: dict[str, Any] = {"midline_x_mm": midline}
    for side in ("right", "left"):  # RAS+: +x is the patient's right
        total_n, kidney_n, tumor_n = (int(v) for v in counts[side])
        out[side] = {
            "present": total_n > 0,
            "total_ml": total_n * voxel_ml,
            "kidney_ml": kidney_n * voxel_ml,
            "tumor_ml": tumor_n * voxel_ml,
        }
    return out


def compute_statistics(
    mask: npt.NDArray[np.uint8],
    volume: Volume,
    labels: dict[int, str],
    confidence: dict[int, float] | None = None,
    box: tuple[slice, slice, slice] | None = None,
) -> list[dict[str, Any]]:
    """One entry per non-background class of the model, in label order.

    ``box``: slices known to hold all the foreground (the engine's ``Prediction.box``); without
    it, one pass over the whole mask finds them.
    """
    conf = confidence or {}
    # Every class lies inside the foreground's box.
    if box is None:
        box = foreground_bbox(mask) or (slice(0, 0), slice(0, 0), slice(0, 0))
    out = []
    for lab, name in sorted(labels.items()):
        if lab == 0:
            continue
        tumor = name == "tumor"
        entry, largest = class_statistics(mask, volume, lab, name, conf.get(lab), box=box, want_largest=tumor)
        if name == "kidney":
            entry["sides"] = kidney_sides(mask, volume, box=box)
        if tumor:
            entry["max_axial_diameter_mm"] = 0.0 if largest is None else max_axial_diameter_mm(largest, volume)
        out.append(entry)
    return out
