"""KiTS challenge metrics, computed as the challenges define them.

* KiTS19: kidney Dice over labels > 0 (kidney + tumor), tumor Dice over label 2, composite = mean.
* KiTS21/23: nested regions kidney+masses (1, 2, 3), masses (2, 3) and tumor (2), each with Dice
  and Surface Dice at the challenge's tolerance in mm.
* Pixel accuracy next to the all-background baseline, to show why pixel accuracy misleads.
* Tumor Dice by the size of the reference's tumors, because a mean over cases hides that small
  tumors (under 10 mL: 37 % of KiTS19 cases have one) score far lower than large ones.

Both-empty is a perfect score (1.0), as in the KiTS21/23 evaluation code.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import cc3d
import numpy as np
import numpy.typing as npt

KITS19_REGIONS: dict[str, tuple[int, ...]] = {"kidney": (1, 2), "tumor": (2,)}
KITS23_REGIONS: dict[str, tuple[int, ...]] = {
    "kidney_and_masses": (1, 2, 3),
    "masses": (2, 3),
    "tumor": (2,),
}
# KiTS21/23 evaluation (labels.py: HEC_SD_TOLERANCES_MM), determined from inter-rater variability.
KITS23_SD_TOLERANCE_MM: dict[str, float] = {
    "kidney_and_masses": 1.0330772532390826,
    "masses": 1.1328796488598762,
    "tumor": 1.1498198361434828,
}


def region(labels: npt.NDArray[np.integer], values: Sequence[int]) -> npt.NDArray[np.bool_]:
    return np.isin(labels, np.asarray(values, dtype=labels.dtype))


def dice(pred: npt.NDArray[np.bool_], ref: npt.NDArray[np.bool_]) -> float:
    """2|A∩B| / (|A|+|B|); 1.0 when both are empty."""
    if pred.shape != ref.shape:
        raise ValueError(f"shape mismatch: prediction {pred.shape} vs reference {ref.shape}")
    a = int(np.count_nonzero(pred))
    b = int(np.count_nonzero(ref))
    if a + b == 0:
        return 1.0
    inter = int(np.count_nonzero(pred & ref))
    return 2.0 * inter / (a + b)


def kits19(pred: npt.NDArray[np.integer], ref: npt.NDArray[np.integer]) -> dict[str, float]:
    """KiTS19 case metrics: ``kidney_dice`` (labels > 0), ``tumor_dice`` (label 2), ``composite``."""
    k = dice(pred > 0, ref > 0)
    t = dice(pred == 2, ref == 2)
    return {"kidney_dice": k, "tumor_dice": t, "composite": (k + t) / 2.0}


def pixel_accuracy(pred: npt.NDArray[np.integer], ref: npt.NDArray[np.integer]) -> dict[str, float]:
    """Accuracy of ``pred`` and of predicting background everywhere, on the same voxels."""
    n = ref.size
    return {
        "pixel_accuracy": float(np.count_nonzero(pred == ref)) / n,
        "all_background_accuracy": float(np.count_nonzero(ref == 0)) / n,
    }


def surface_dice(
    pred: npt.NDArray[np.bool_],
    ref: npt.NDArray[np.bool_],
    spacing_mm: Sequence[float],
    tolerance_mm: float,
) -> float:
    """Normalised Surface Dice at ``tolerance_mm`` (Nikolov et al.), via MONAI.

    1.0 when both masks are empty, 0.0 when exactly one is.
    """
    a, b = bool(pred.any()), bool(ref.any())
    if not a and not b:
        return 1.0
    if a != b:
        return 0.0
    import torch
    from monai.metrics import compute_surface_dice

    # Crop to the union's bounding box (+1 voxel) so the distance transforms stay small.
    union = pred | ref
    sl = tuple(slice(max(0, int(idx.min()) - 1), int(idx.max()) + 2) for idx in np.nonzero(union))
    p = torch.from_numpy(np.ascontiguousarray(pred[sl]))[None, None].float()
    r = torch.from_numpy(np.ascontiguousarray(ref[sl]))[None, None].float()
    p = torch.cat([1 - p, p], dim=1)
    r = torch.cat([1 - r, r], dim=1)
    with warnings.catch_warnings():
        # MONAI 1.5-1.6 passes its own deprecated get_mask_edges(always_return_as_numpy=...) inside
        # compute_surface_dice: a FutureWarning on every `evaluate --kits23` that no caller can act on.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        val = compute_surface_dice(
            p, r, class_thresholds=[tolerance_mm], include_background=False, spacing=list(spacing_mm)
        )
    return float(val.item())


def kits23(
    pred: npt.NDArray[np.integer],
    ref: npt.NDArray[np.integer],
    spacing_mm: Sequence[float],
    with_surface: bool = True,
) -> dict[str, float]:
    """KiTS21/23 case metrics: ``<region>_dice`` and ``<region>_sd`` for the three nested regions."""
    out: dict[str, float] = {}
    for name, values in KITS23_REGIONS.items():
        p, r = region(pred, values), region(ref, values)
        out[f"{name}_dice"] = dice(p, r)
        if with_surface:
            out[f"{name}_sd"] = surface_dice(p, r, spacing_mm, KITS23_SD_TOLERANCE_MM[name])
    out["mean_dice"] = float(np.mean([out[f"{n}_dice"] for n in KITS23_REGIONS]))
    if with_surface:
        out["mean_sd"] = float(np.mean([out[f"{n}_sd"] for n in KITS23_REGIONS]))
    return out


def tumor_sizes(ref: npt.NDArray[np.integer], zooms: Sequence[float]) -> dict[str, float]:
    """The reference's tumors (label 2, 26-connected components): how many, their total volume
    and the smallest one's, in mL (0 when there is none)."""
    tumor = ref == 2
    if not tumor.any():
        return {"ref_tumors": 0, "ref_tumor_ml": 0.0, "ref_smallest_tumor_ml": 0.0}
    # Label inside the tumors' bounding box only (cc3d's labels cost 4 bytes per voxel).
    box = tuple(
        slice(int(nz[0]), int(nz[-1]) + 1)
        for nz in (np.flatnonzero(tumor.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    )
    cc, n = cc3d.connected_components(np.ascontiguousarray(tumor[box]), connectivity=26, return_N=True)
    sizes = np.bincount(cc.ravel(), minlength=n + 1)[1:] * (float(np.prod(zooms)) / 1000.0)
    return {"ref_tumors": int(n), "ref_tumor_ml": float(sizes.sum()), "ref_smallest_tumor_ml": float(sizes.min())}


def tumor_dice_by_size(rows: Sequence[dict[str, float]], small_ml: float = 10.0) -> dict[str, dict[str, float | None]]:
    """Mean tumor Dice over three groups of cases, from rows holding :func:`tumor_sizes`' keys:
    ``small`` (some tumor under ``small_ml``), ``large`` (every tumor at least that) and
    ``tumor_free`` (where Dice is 1 or 0: any false positive fails the case). An empty group's
    Dice is None."""
    groups: dict[str, list[float]] = {"small": [], "large": [], "tumor_free": []}
    for r in rows:
        key = "tumor_free" if not r["ref_tumors"] else "small" if r["ref_smallest_tumor_ml"] < small_ml else "large"
        groups[key].append(r["tumor_dice"])
    return {k: {"n": len(v), "tumor_dice": float(np.mean(v)) if v else None} for k, v in groups.items()}


def summarize(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean over cases of every numeric key (the KiTS leaderboards average per case), except the
    descriptions of the reference (``ref_*``)."""
    if not rows:
        return {}
    keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float)) and not k.startswith("ref_")]
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}
