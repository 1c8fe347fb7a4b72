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
from segcore.postprocess import foreground_bbox
from segcore.preprocessing import canonical_info, canonical_view


def _world(affine: npt.NDArray[np.float64], ijk: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def max_axial_diameter_mm(mask: npt.NDArray[np.bool_], volume: Volume) -> float:
    """Largest in-plane (axial, canonical Z slices) Feret diameter of ``mask`` in mm.

    ``mask`` may be any box cut out of ``volume``'s grid: only the axes' directions and spacing matter.
    """
    canon = canonical_info(volume.affine, (int(mask.shape[0]), int(mask.shape[1]), int(mask.shape[2])))
    view = canonical_view(mask, canon)  # (Z, Y, X)
    _, sy, sx = canon.spacing_zyx
    best = 0.0
    for k in np.nonzero(view.reshape(view.shape[0], -1).any(1))[0]:
        ys, xs = np.nonzero(view[k])
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
) -> dict[str, Any]:
    """Statistics of ``label`` (or of the union ``region``) in ``mask`` on ``volume``'s grid.

    ``box``: a box of ``mask`` known to hold every voxel of the label; only it is read.
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
        return out
    crop = np.ascontiguousarray(sel[bb])
    cc, ncomp = cc3d.connected_components(crop, connectivity=26, return_N=True)
    sizes = np.bincount(cc.ravel())[1:]
    out["components"] = int(ncomp)
    out["largest_component_ml"] = float(sizes.max()) * voxel_ml if sizes.size else 0.0
    # From here on in the whole mask's voxel indices.
    bb = tuple(slice(s.start + b.start, s.stop + b.start) for s, b in zip(bb, box, strict=True))  # type: ignore[assignment]
    lo = [s.start for s in bb]
    hi = [s.stop - 1 for s in bb]
    out["bbox_voxels"] = {"min": lo, "max": hi}
    out["bbox_size_mm"] = [float((h - l + 1) * z) for l, h, z in zip(lo, hi, volume.zooms, strict=True)]
    idx = np.nonzero(crop)
    centroid_ijk = np.array([float(i.mean()) + o for i, o in zip(idx, lo, strict=True)])
    out["centroid_mm"] = [float(v) for v in _world(volume.affine, centroid_ijk[None])[0]]
    vals = volume.to_hu(volume.stored[bb][crop])
    out["hu"] = {
        "mean": float(vals.mean()),
        "std": float(vals.std()),
        "min": float(vals.min()),
        "max": float(vals.max()),
    }
    shape = mask.shape
    out["touches_border"] = any(l == 0 for l in lo) or any(h == s - 1 for h, s in zip(hi, shape, strict=True))
    return out


def kidney_sides(
    mask: npt.NDArray[np.uint8],
    volume: Volume,
    tumor_label: int = 2,
    box: tuple[slice, slice, slice] | None = None,
) -> dict[str, Any]:
    """Left/right split of the kidney region (labels > 0) with the tumor volume in each side.

    The midline is halfway between the two largest components' centroids when there are two,
    else the centre of the field of view; each voxel goes to the side of the midline it lies on.
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
    crop = np.ascontiguousarray(region[bb])
    lo = np.array([s.start + b.start for s, b in zip(bb, box, strict=True)], dtype=np.float64)
    cc, n = cc3d.connected_components(crop, connectivity=26, return_N=True)
    idx = np.nonzero(crop)
    world_x = _world(volume.affine, np.stack(idx, axis=1).astype(np.float64) + lo)[:, 0]
    if n >= 2:
        comp = cc[idx]
        sizes = np.bincount(comp)
        top2 = np.argsort(sizes[1:])[-2:] + 1
        cx = [float(world_x[comp == c].mean()) for c in top2]
        midline = 0.5 * (cx[0] + cx[1])
    else:
        centre = (np.array(volume.shape, dtype=np.float64) - 1) / 2
        midline = float(_world(volume.affine, centre[None])[0, 0])
    labels = part[bb][idx]
    out: dict[str, Any] = {"midline_x_mm": midline}
    for side, sel in (("right", world_x > midline), ("left", world_x <= midline)):  # RAS+: +x is patient right
        tumor_n = int(np.count_nonzero(labels[sel] == tumor_label))
        total_n = int(np.count_nonzero(sel))
        out[side] = {
            "present": total_n > 0,
            "total_ml": total_n * voxel_ml,
            "kidney_ml": int(np.count_nonzero(labels[sel] == 1)) * voxel_ml,
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
    part = mask[box]
    out = []
    for lab, name in sorted(labels.items()):
        if lab == 0:
            continue
        entry = class_statistics(mask, volume, lab, name, conf.get(lab), box=box)
        if name == "kidney":
            entry["sides"] = kidney_sides(mask, volume, box=box)
        if name == "tumor":
            diameter = 0.0
            if entry["present"]:
                sel = part == lab
                bb = foreground_bbox(sel)
                assert bb is not None
                largest = np.ascontiguousarray(sel[bb])
                del sel
                if entry["components"] > 1:
                    cc = cc3d.connected_components(largest, connectivity=26)
                    largest = cc == np.argmax(np.bincount(cc.ravel())[1:]) + 1
                diameter = max_axial_diameter_mm(largest, volume)
            entry["max_axial_diameter_mm"] = diameter
        out.append(entry)
    return out
