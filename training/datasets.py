"""Datasets: the KiTS19 and KiTS21/23 folder layouts, a preprocessed memory-mapped cache, and the
2D/2.5D slice sampler used for training.

KiTS19: ``case_XXXXX/imaging.nii.gz`` + ``segmentation.nii.gz``, arrays ``(slices, H, W)``, IPL.
The official download also holds the 90 test cases (210-299) with imaging only.
KiTS21: the same folders, with the annotators' majority vote ``aggregated_MAJ_seg.nii.gz`` (and
the ``AND`` / ``OR`` aggregates) instead of ``segmentation.nii.gz``; labels add 3 = cyst.
KiTS23: ``case_XXXXX/imaging.nii.gz`` + ``segmentation.nii.gz``, with the cyst label. A flat
``case_XXXXX_segmentation.nii.gz`` is accepted for labels only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from segcore.io import GZIP_MAGIC, decompress_to, load_labels, load_volume, save_image
from segcore.preprocessing import PreprocessConfig, preprocess_case

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset that can't be trained or evaluated on as asked; the message says why."""


@dataclass(frozen=True)
class Case:
    case_id: str
    image: Path | None
    label: Path | None


#: label files of a case folder, in order of preference when none is named: KiTS19's and KiTS23's,
#: then KiTS21's majority vote of its annotators
LABEL_FILES = ("segmentation.nii.gz", "aggregated_MAJ_seg.nii.gz")


def find_cases(root: str | Path, need_image: bool = True, label_file: str | None = None) -> list[Case]:
    """All cases under ``root`` in KiTS19/21/23 layout, or in nnU-Net's raw layout
    (:func:`nnunet_cases`), sorted by id.

    ``label`` is the case folder's ``label_file`` when given (KiTS21's ``aggregated_OR_seg.nii.gz``,
    say), else the first of :data:`LABEL_FILES` that exists, and None when there is none (KiTS19's
    test cases): callers that need labels keep the cases that have them (:func:`labelled`).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    if (nnunet := nnunet_split(root)) is not None:
        root, split = nnunet
        if label_file is not None:
            raise DatasetError(f"{root} is an nnU-Net dataset, whose labels are labels{split}/<case>: no label_file")
        return nnunet_cases(root, need_image, split)
    if label_file is not None and (not label_file or Path(label_file).name != label_file):
        raise DatasetError(f"label_file must be a file name inside each case folder, got {label_file!r}")
    names = (label_file,) if label_file else LABEL_FILES
    cases: list[Case] = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("case_")):
        img = d / "imaging.nii.gz"
        if need_image and not img.exists():
            continue
        seg = next((d / n for n in names if (d / n).exists()), None)
        cases.append(Case(d.name, img if img.exists() else None, seg))
    if not need_image and label_file is None:
        for f in sorted(root.glob("case_*_segmentation.nii.gz")):
            cases.append(Case(f.name.removesuffix("_segmentation.nii.gz"), None, f))
    return cases


#: an nnU-Net raw dataset's folders; given as ``--data``, one selects its split
NNUNET_FOLDERS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs")


def is_nnunet_dataset(root: str | Path, split: str = "Tr") -> bool:
    """Whether ``root`` is laid out as an nnU-Net raw dataset (``imagesTr/``, ``labelsTr/``; with
    ``split`` "Ts", its test cases' ``imagesTs/``, ``labelsTs/``)."""
    return (Path(root) / f"images{split}").is_dir() or (Path(root) / f"labels{split}").is_dir()


def nnunet_split(root: str | Path) -> tuple[Path, str] | None:
    """``(dataset, split)`` when ``root`` is an nnU-Net raw dataset (its training split, "Tr") or
    one of its folders, as nnUNetv2_predict and _evaluate_folder take them (``imagesTs/`` or
    ``labelsTs/``: the test split, "Ts"); None for any other folder."""
    root = Path(root)
    if root.name in NNUNET_FOLDERS and is_nnunet_dataset(root.parent, root.name[-2:]):
        return root.parent, root.name[-2:]
    return (root, "Tr") if is_nnunet_dataset(root) else None


def nnunet_cases(root: Path, need_image: bool = True, split: str = "Tr") -> list[Case]:
    """The training cases of an nnU-Net raw dataset (``nnUNet_raw/DatasetXXX_Name``), or with
    ``split`` "Ts" its test cases: ``imagesTr/<case>_0000<ending>`` with ``labelsTr/<case><ending>``,
    the ending from its ``dataset.json`` (``file_ending``, NIfTI only). nnU-Net's KiTS conversions
    copy the challenge's files, so the geometry and label values are KiTS's own. CT is one channel:
    a dataset with a second (``_0001``) is refused."""
    ending = ".nii.gz"
    if (meta := root / "dataset.json").is_file():
        try:
            ending = str(json.loads(meta.read_text()).get("file_ending", ending))
        except ValueError as e:
            raise DatasetError(f"cannot read {meta}: {e}") from e
    if ending not in (".nii.gz", ".nii"):
        raise DatasetError(f"{root}: nnU-Net dataset of {ending} files; kitseg reads NIfTI (.nii.gz, .nii)")
    images, labels = root / f"images{split}", root / f"labels{split}"
    if more := sorted(images.glob(f"*_0001{ending}")):
        raise DatasetError(f"{root} has more than one input channel ({more[0].name}): kitseg segments one CT channel")
    ids = {f.name.removesuffix(f"_0000{ending}") for f in images.glob(f"*_0000{ending}")}
    if not need_image:
        ids |= {f.name.removesuffix(ending) for f in labels.glob(f"*{ending}")}
    cases = []
    for case_id in sorted(ids):
        img, seg = images / f"{case_id}_0000{ending}", labels / f"{case_id}{ending}"
        cases.append(Case(case_id, img if img.exists() else None, seg if seg.exists() else None))
    return cases


def labelled(cases: list[Case], root: str | Path, label_file: str | None = None) -> list[Case]:
    """The cases that have both imaging and labels, logging how many were left out (KiTS19's
    download holds 90 test cases with imaging only). An error when none is left."""
    keep = [c for c in cases if c.image is not None and c.label is not None]
    nnunet = nnunet_split(root) is not None
    names = "an image and a label" if nnunet else label_file or " or ".join(LABEL_FILES)
    if left := [c.case_id for c in cases if c.image is None or c.label is None]:
        log.info(
            "%d case(s) without %s left out: %s",
            len(left),
            names,
            ", ".join(left[:5]) + (" ..." if len(left) > 5 else ""),
        )
    if not keep:
        hint = ""
        if not cases:  # the challenge's repository rather than its data folder, perhaps
            sub = [Path(root) / d for d in ("data", "dataset") if any(Path(root, d).glob("case_*/imaging.nii.gz"))]
            hint = f" (the KiTS repositories keep their cases in data/ or dataset/: try {sub[0]})" if sub else ""
        if nnunet:
            raise DatasetError(
                f"no case of the nnU-Net dataset {root} has both images*/<case>_0000 and labels*/<case> "
                "(imagesTr/ and labelsTr/, or given imagesTs/: imagesTs/ and labelsTs/)"
            )
        raise DatasetError(f"no case_XXXXX/ folder under {root} has both imaging.nii.gz and {names}{hint}")
    return keep


def select_cases(cases: list[Case], ids: list[str], root: str | Path, what: str = "case(s)") -> list[Case]:
    """The cases named ``ids``, in ``cases``' order; an error naming those not among them (no
    imaging or labels, or a wrong id), rather than a silent skip."""
    wanted = set(ids)
    if missing := wanted - {c.case_id for c in cases}:
        raise DatasetError(f"{what} not found with imaging and labels in {root}: {', '.join(sorted(missing))}")
    return [c for c in cases if c.case_id in wanted]


#: nnU-Net's cross-validation: its case ids sorted, shuffled with this seed and cut into 5 folds
#: (nnunetv2.utilities.crossval_split, through scikit-learn's ``KFold(shuffle=True)``).
NNUNET_FOLDS, NNUNET_SPLIT_SEED = 5, 12345


def kfold_splits(
    case_ids: list[str], folds: int = NNUNET_FOLDS, seed: int = NNUNET_SPLIT_SEED
) -> list[dict[str, list[str]]]:
    """Cross-validation folds as nnU-Net makes them, in its ``splits_final.json`` format: one
    ``{"train": [...], "val": [...]}`` per fold. The ids are sorted and permuted by numpy's legacy
    generator seeded with ``seed``; the first ``len % folds`` folds take one case more. For the same
    ids this gives nnU-Net's own folds, so a kitseg fold and an nnU-Net fold hold the same patients."""
    ids = sorted(case_ids)
    if not 2 <= folds <= len(ids):
        raise DatasetError(f"{folds}-fold cross-validation needs 2-{len(ids)} folds for {len(ids)} cases")
    order = np.random.RandomState(seed).permutation(len(ids))
    splits, start = [], 0
    for k in range(folds):
        size = len(ids) // folds + (k < len(ids) % folds)
        val = set(order[start : start + size].tolist())
        start += size
        splits.append(
            {"train": [x for i, x in enumerate(ids) if i not in val], "val": [x for i, x in enumerate(ids) if i in val]}
        )
    return splits


def read_splits(path: str | Path) -> list[dict[str, list[str]]]:
    """A ``splits_final.json`` as nnU-Net writes it (a list of ``{"train": [...], "val": [...]}``)."""
    try:
        splits = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read the splits file {path}: {e}") from e
    if not (
        isinstance(splits, list)
        and splits
        and all(
            isinstance(s, dict)
            and all(isinstance(s.get(k), list) and all(isinstance(x, str) for x in s[k]) for k in ("train", "val"))
            for s in splits
        )
    ):
        raise DatasetError(
            f"{path} is not a splits file: it must hold a list of folds, each "
            '{"train": [case ids], "val": [case ids]}, as nnU-Net\'s splits_final.json'
        )
    return splits


def fold_cases(
    cases: list[Case], splits: list[dict[str, list[str]]], fold: int, root: str | Path
) -> tuple[list[Case], list[Case]]:
    """Fold ``fold``'s training and validation cases among ``cases``; every id the fold names must
    be there, and no case may be in both."""
    if not 0 <= fold < len(splits):
        raise DatasetError(f"fold {fold} does not exist: the splits have folds 0-{len(splits) - 1}")
    if both := set(splits[fold]["train"]) & set(splits[fold]["val"]):
        raise DatasetError(f"fold {fold} has case(s) in both training and validation: {', '.join(sorted(both))}")
    train = select_cases(cases, splits[fold]["train"], root, f"fold {fold}'s training case(s)")
    val = select_cases(cases, splits[fold]["val"], root, f"fold {fold}'s validation case(s)")
    if not train or not val:
        raise DatasetError(f"fold {fold} needs training and validation cases, has {len(train)} and {len(val)}")
    return train, val


def kits_affine(spacing_zyx: tuple[float, float, float], shape_zyx: tuple[int, int, int]) -> npt.NDArray[np.float64]:
    """The KiTS19 IPL affine ``[[0,0,-pw],[0,-pw,0],[-st,0,0]]`` for an image centred on the origin."""
    st, py, px = spacing_zyx
    nz, ny, nx = shape_zyx
    aff = np.array([[0, 0, -px, 0], [0, -py, 0, 0], [-st, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
    # Canonical voxel (0,0,0) sits at -extent/2 on each axis; IPL voxel (0,0,0) is its opposite corner.
    aff[:3, 3] = [(nx - 1) * px / 2, (ny - 1) * py / 2, (nz - 1) * st / 2]
    return aff


def write_kits_case(
    folder: Path,
    hu_zyx: npt.NDArray[np.int16] | None,
    seg_zyx: npt.NDArray[np.uint8] | None,
    spacing_zyx: tuple[float, float, float],
) -> None:
    """Write canonical ``(Z, Y, X)`` RAS arrays as a KiTS19-layout case (IPL, ``(slices, H, W)``)."""
    folder.mkdir(parents=True, exist_ok=True)
    ref = hu_zyx if hu_zyx is not None else seg_zyx
    assert ref is not None
    aff = kits_affine(spacing_zyx, ref.shape)  # type: ignore[arg-type]
    if hu_zyx is not None:
        save_image(np.ascontiguousarray(hu_zyx[::-1, ::-1, ::-1]), aff, folder / "imaging.nii.gz")
    if seg_zyx is not None:
        save_image(np.ascontiguousarray(seg_zyx[::-1, ::-1, ::-1]), aff, folder / "segmentation.nii.gz")


class CaseCache:
    """Preprocessed cases as ``.npy`` files opened with ``mmap_mode='r'``.

    The cache key covers the preprocessing config and the source files' sizes and mtimes, so a
    changed config or file is preprocessed again instead of silently reused.
    """

    def __init__(self, root: str | Path, cfg: PreprocessConfig, num_classes: int) -> None:
        self.cfg = cfg
        self.num_classes = num_classes
        key = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
        self.root = Path(root) / f"pp-{key}"
        self.root.mkdir(parents=True, exist_ok=True)

    def _stamp(self, case: Case) -> str:
        parts = []
        for p in (case.image, case.label):
            if p is not None:
                st = p.stat()
                parts.append(f"{p.name}:{st.st_size}:{int(st.st_mtime)}")
        return "|".join(parts)

    def _paths(self, case: Case) -> tuple[Path, Path, Path]:
        return (
            self.root / f"{case.case_id}_img.npy",
            self.root / f"{case.case_id}_seg.npy",
            self.root / f"{case.case_id}.stamp",
        )

    def cached(self, case: Case) -> bool:
        """Whether ``case`` is in the cache, made from its files as they are now."""
        img_p, lab_p, stamp_p = self._paths(case)
        return img_p.exists() and lab_p.exists() and stamp_p.exists() and stamp_p.read_text() == self._stamp(case)

    def build(self, case: Case) -> None:
        """Preprocess ``case`` into the cache (the stamp is written last, so a build cut short is
        made again)."""
        if case.image is None or case.label is None:
            raise FileNotFoundError(f"case {case.case_id} needs both imaging and segmentation")
        img_p, lab_p, stamp_p = self._paths(case)
        vol = load_volume(case.image)
        lab, lab_affine = load_labels(case.label)
        check_grid(f"{case.case_id}: {case.label.name}", lab.shape, lab_affine, case.image.name, vol.shape, vol.affine)
        check_labels(lab, self.num_classes, case)
        pc = preprocess_case(vol.data, vol.affine, lab, self.cfg, self.num_classes)
        assert pc.label is not None
        np.save(img_p, pc.image)
        np.save(lab_p, pc.label)
        stamp_p.write_text(self._stamp(case))

    def fill(self, cases: list[Case], workers: int | None = None, progress: bool = False) -> int:
        """Build every case of ``cases`` that isn't cached; returns how many were built.

        A KiTS19 case of 600 slices takes a few seconds (most of it reading the gzip and
        resampling), so a whole dataset takes minutes: ``workers`` processes build cases side by
        side, each with its share of the cores' threads. None: :func:`default_cache_workers`.
        """
        todo = [c for c in cases if not self.cached(c)]
        if workers is None:
            workers = default_cache_workers(todo)
        workers = min(workers, len(todo))
        t0 = time.perf_counter()
        bar = tqdm(total=len(todo), desc="preprocess", disable=not progress)
        if workers > 1:
            threads = max(1, available_cores() // workers)
            with ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=torch.set_num_threads,
                initargs=(threads,),
            ) as ex:
                try:
                    for _ in ex.map(self.build, todo):
                        bar.update()
                except BaseException:  # a case that can't be built: stop, rather than build the rest first
                    ex.shutdown(cancel_futures=True)
                    raise
        else:
            for c in todo:
                self.build(c)
                bar.update()
        bar.close()
        if todo:
            log.info(
                "preprocessed %d of %d case(s) into %s in %.1f s (%d process%s)",
                len(todo),
                len(cases),
                self.root,
                time.perf_counter() - t0,
                max(1, workers),
                "es" if workers > 1 else "",
            )
        return len(todo)

    def get(self, case: Case) -> tuple[npt.NDArray[np.float16], npt.NDArray[np.uint8]]:
        """``(Z, h, w)`` float16 image and uint8 labels on the model grid, memory-mapped (built first
        when the case isn't cached)."""
        img_p, lab_p, _ = self._paths(case)
        built = not self.cached(case)
        if built:
            self.build(case)  # checks its labels as it goes
        lab = np.load(lab_p, mmap_mode="r")
        if not built:  # made by a run with more classes, perhaps (the key is the preprocessing's only)
            check_labels(lab, self.num_classes, case)
        return np.load(img_p, mmap_mode="r"), lab


class DecodedCopies:
    """Uncompressed copies of cases' files under ``root``, made once and again when a source
    changes: validation reads the same cases every epoch, and maps these instead of gunzipping
    them each time (about 1 s for the image and labels of a 600-slice KiTS19 case on the
    development CPU, more than a GPU takes to segment it). They take the uncompressed size on
    disk (KiTS19's 42-case validation set, float32 images: about 12 GB); files that aren't gzip
    are used as they are."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def get(self, case: Case) -> Case:
        if case.image is None or case.label is None:
            raise FileNotFoundError(f"case {case.case_id} needs both imaging and segmentation")
        return Case(case.case_id, self._copy(case.case_id, case.image), self._copy(case.case_id, case.label))

    def _copy(self, case_id: str, src: Path) -> Path:
        with open(src, "rb") as f:
            if f.read(2) != GZIP_MAGIC:
                return src
        folder = self.root / case_id
        dst = folder / src.name.removesuffix(".gz")
        if dst.name == src.name:
            dst = dst.with_name(dst.name + ".nii")  # a gzip file not named .gz
        stamp, st = folder / f"{dst.name}.stamp", src.stat()
        want = f"{src.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if not (dst.exists() and stamp.exists() and stamp.read_text() == want):
            folder.mkdir(parents=True, exist_ok=True)
            decompress_to(src, dst)
            stamp.write_text(want)
        return dst


def available_cores() -> int:
    """The cores this process may run on, shared among the node's DDP ranks (``LOCAL_WORLD_SIZE``)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def case_bytes(case: Case) -> int:
    """A case's image size on disk: what the cache pool and the DDP ranks' shares weigh it by."""
    return case.image.stat().st_size if case.image is not None else 0


#: image bytes (compressed, on disk) below which the cache is built in the calling process: a pool
#: of fresh processes takes seconds to start (each imports torch), more than small cases take
CACHE_POOL_MIN_BYTES = 64 * 2**20


def default_cache_workers(todo: list[Case]) -> int:
    """Processes that build the cache: one per available core, at most 8 (each holds a whole
    volume in float32, about 1 GB for 1000 slices of 512x512); none for a small job, or with
    under 4 cores (on 2, two processes built 4 KiTS-sized cases 0.9-1.15x as fast as one
    process with 2 threads, docs/benchmarks.md)."""
    cores = available_cores()
    size = sum(map(case_bytes, todo))
    return 0 if size < CACHE_POOL_MIN_BYTES or cores < 4 else min(8, cores)


def check_grid(
    what: str,
    shape: tuple[int, ...],
    affine: npt.NDArray[np.float64],
    ref_name: str,
    ref_shape: tuple[int, ...],
    ref_affine: npt.NDArray[np.float64],
) -> None:
    """Refuse a label map (or a prediction) that is not on its image's voxel grid: the same shape
    and the same affine to 1e-3 mm. Training on one with another orientation or origin would
    teach the network labels that lie elsewhere, and scoring one would compare other voxels, both
    without an error (nnU-Net's dataset check refuses these too)."""
    if tuple(shape) == tuple(ref_shape) and np.allclose(affine, ref_affine, rtol=1e-5, atol=1e-3):
        return
    codes, ref_codes = ("".join(nib.aff2axcodes(a)) for a in (affine, ref_affine))
    detail = (
        f"shape {tuple(shape)} against {tuple(ref_shape)}"
        if tuple(shape) != tuple(ref_shape)
        else f"affine differs by up to {float(np.abs(np.asarray(affine) - ref_affine).max()):.4g} mm "
        f"(orientation {codes} against {ref_codes})"
    )
    raise DatasetError(f"{what} is not on {ref_name}'s voxel grid ({detail}): it must be on its image's voxel grid")


def check_labels(lab: npt.NDArray[np.uint8], num_classes: int, case: Case) -> None:
    """Refuse label values the model has no class for, instead of training on them: resampling
    would fold them into the last class (a cyst would become tumor) and a native-grid cache would
    hand the loss a target it can't index."""
    top = int(lab.max()) if lab.size else 0
    if top < num_classes:
        return
    hint = ""
    if top == 3 and num_classes == 3:
        hint = " (3 is cyst in KiTS21/23: train with --kits23 for background, kidney, tumor and cyst)"
    name = case.label.name if case.label is not None else "labels"
    raise DatasetError(
        f"{case.case_id}: {name} holds label {top}, but a {num_classes}-class model has labels 0-{num_classes - 1}{hint}"
    )


@dataclass
class Augment:
    """Random flips, small rotations and scales, and intensity changes, applied per slice stack."""

    flip: bool = True
    max_rotate_deg: float = 12.0
    scale: tuple[float, float] = (0.85, 1.15)
    intensity: float = 0.1

    def __call__(
        self, img: torch.Tensor, lab: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``img`` ``(C, H, W)`` float, ``lab`` ``(H, W)`` long."""
        import torch.nn.functional as F

        if self.max_rotate_deg > 0 or self.scale != (1.0, 1.0):
            ang = np.deg2rad(rng.uniform(-self.max_rotate_deg, self.max_rotate_deg))
            s = rng.uniform(*self.scale)
            theta = torch.tensor(
                [[np.cos(ang) / s, -np.sin(ang) / s, 0.0], [np.sin(ang) / s, np.cos(ang) / s, 0.0]],
                dtype=torch.float32,
            )[None]
            grid = F.affine_grid(theta, [1, 1, *img.shape[-2:]], align_corners=False)
            img = F.grid_sample(img[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
            lab = F.grid_sample(
                lab[None, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
            )[0, 0].long()
        # Left-right flips only: anterior-posterior anatomy (spine behind) is not symmetric.
        if self.flip and rng.random() < 0.5:
            img, lab = img.flip(-1), lab.flip(-1)
        if self.intensity > 0:
            img = img * (1.0 + rng.uniform(-self.intensity, self.intensity)) + rng.uniform(
                -self.intensity, self.intensity
            )
            if rng.random() < 0.3:
                img = img + torch.randn_like(img) * rng.uniform(0, self.intensity)
        return img, lab


def tumor_components(lab: npt.ArrayLike, seed: int = 0, per_component: int = 4096) -> list[npt.NDArray[np.int32]]:
    """Voxel coordinates ``(k, y, x)`` of each tumor (label 2, 26-connected in 3D), at most
    ``per_component`` of them per tumor (a fixed random subset), for sampling patch centres."""
    import cc3d

    tumor = np.asarray(lab) == 2
    cc, n = cc3d.connected_components(tumor, connectivity=26, return_N=True)
    if n == 0:
        return []
    coords = np.stack(np.nonzero(tumor), axis=1).astype(np.int32)
    ids = cc[tuple(coords.T)]
    order = np.argsort(ids, kind="stable")
    bounds = np.cumsum(np.bincount(ids, minlength=n + 1))
    rng = np.random.default_rng(seed)
    out = []
    for c in range(1, n + 1):
        pts = coords[order[bounds[c - 1] : bounds[c]]]
        if len(pts) > per_component:
            pts = pts[np.sort(rng.choice(len(pts), size=per_component, replace=False))]
        out.append(pts)
    return out


class SliceDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Random 2D/2.5D patches from cached cases, oversampling slices with kidney or tumor.

    Each item is ``(C, P, P)`` float32 and ``(P, P)`` int64, ``C = 2k+1``, ``P = patch``. Patches are
    centred on foreground with probability ``fg_fraction`` (half of those on tumor when present).
    With ``tumor_sampling="component"`` a tumor patch first picks one of the case's tumors (3D
    connected components) uniformly, so that a 2 mL tumor next to a 200 mL one is trained on as
    often; ``"slice"`` picks one of the case's tumor slices uniformly and then a tumor pixel in it,
    which favours the tumors that span many slices.
    """

    def __init__(
        self,
        cases: list[tuple[npt.NDArray[np.float16], npt.NDArray[np.uint8]]],
        context: int,
        patch: int,
        length: int,
        fg_fraction: float = 0.67,
        augment: Augment | None = None,
        seed: int = 0,
        tumor_sampling: str = "slice",
    ) -> None:
        if tumor_sampling not in ("component", "slice"):
            raise ValueError(f"tumor_sampling must be 'component' or 'slice', got {tumor_sampling!r}")
        self.cases = cases
        self.context = context
        self.patch = patch
        self.length = length
        self.fg_fraction = fg_fraction
        self.augment = augment
        self.seed = seed
        # In shared memory: DataLoader workers hold copies of the dataset, and persistent ones
        # keep theirs across epochs, so a plain attribute set in the main process would leave
        # them drawing epoch 0's patches every epoch.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.fg_slices = [np.nonzero(np.asarray(lab).reshape(lab.shape[0], -1).any(1))[0] for _, lab in cases]
        self.tumor_slices = [np.nonzero((np.asarray(lab) == 2).reshape(lab.shape[0], -1).any(1))[0] for _, lab in cases]
        self.tumor_sampling = tumor_sampling
        # Only the component sampler needs them (a labelling pass over every case).
        self.tumors = (
            [tumor_components(lab, seed=i) for i, (_, lab) in enumerate(cases)] if tumor_sampling == "component" else []
        )

    def __len__(self) -> int:
        return self.length

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Draw epoch ``epoch``'s patches from now on, in this process and in every DataLoader
        worker (call it between epochs, when no batch is in flight)."""
        self._epoch.fill_(epoch)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.seed, self.epoch, i))
        ci = int(rng.integers(len(self.cases)))
        img, lab = self.cases[ci]
        z, h, w = img.shape
        centre: tuple[int, int] | None = None
        if rng.random() < self.fg_fraction and len(self.fg_slices[ci]):
            use_tumor = len(self.tumor_slices[ci]) and rng.random() < 0.5
            if use_tumor and self.tumor_sampling == "component":
                comps = self.tumors[ci]
                pts = comps[int(rng.integers(len(comps)))]
                k, cy, cx = (int(v) for v in pts[int(rng.integers(len(pts)))])
                centre = (cy, cx)
            else:
                pool = self.tumor_slices[ci] if use_tumor else self.fg_slices[ci]
                k = int(rng.choice(pool))
                target = (np.asarray(lab[k]) == 2) if use_tumor else (np.asarray(lab[k]) > 0)
                ys, xs = np.nonzero(target)
                j = int(rng.integers(len(ys)))
                centre = (int(ys[j]), int(xs[j]))
        else:
            k = int(rng.integers(z))
        idx = np.clip(np.arange(k - self.context, k + self.context + 1), 0, z - 1)
        stack = np.asarray(img[idx], dtype=np.float32)  # (C, h, w)
        sl = np.asarray(lab[k], dtype=np.int64)
        p = self.patch
        # Pad to at least the patch size (edge value for the image, background for labels).
        ph, pw = max(0, p - h), max(0, p - w)
        if ph or pw:
            stack = np.pad(stack, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)), mode="edge")
            sl = np.pad(sl, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))
            if centre is not None:
                centre = (centre[0] + ph // 2, centre[1] + pw // 2)
        hh, ww = sl.shape
        if centre is None:
            y0 = int(rng.integers(0, hh - p + 1))
            x0 = int(rng.integers(0, ww - p + 1))
        else:
            jitter = p // 3
            y0 = int(np.clip(centre[0] - p // 2 + rng.integers(-jitter, jitter + 1), 0, hh - p))
            x0 = int(np.clip(centre[1] - p // 2 + rng.integers(-jitter, jitter + 1), 0, ww - p))
        x = torch.from_numpy(np.ascontiguousarray(stack[:, y0 : y0 + p, x0 : x0 + p]))
        y = torch.from_numpy(np.ascontiguousarray(sl[y0 : y0 + p, x0 : x0 + p]))
        if self.augment is not None:
            x, y = self.augment(x, y, rng)
        return x, y


def split_cases(cases: list[Case], val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Split by patient (case), never by slice; deterministic for a seed."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(cases))
    n_val = max(1, round(len(cases) * val_fraction)) if len(cases) > 1 else 0
    val = sorted((cases[i] for i in order[:n_val]), key=lambda c: c.case_id)
    train = sorted((cases[i] for i in order[n_val:]), key=lambda c: c.case_id)
    return train, val


def _axes(affine: npt.NDArray[np.float64]) -> tuple[int, list[int]]:
    """The voxel axis that runs head to foot (its code is S or I), and the other two."""
    codes = nib.aff2axcodes(affine)
    z = next((i for i, c in enumerate(codes) if c in ("S", "I")), 2)
    return z, [i for i in range(3) if i != z]


def _spread(values: list[float]) -> dict[str, float] | None:
    return (
        {"min": float(np.min(values)), "median": float(np.median(values)), "max": float(np.max(values))}
        if values
        else None
    )


def check_dataset(
    root: str | Path,
    num_classes: int = 3,
    label_file: str | None = None,
    progress: bool = False,
    read_images: bool = False,
) -> dict[str, Any]:
    """Every case under ``root`` checked as training and evaluation will read it, and the dataset
    described (as nnU-Net's ``--verify_dataset_integrity`` and its fingerprint do, from the label
    maps and the images' headers; with ``read_images``, every image is decoded as training reads
    it, which finds a truncated file or NaN voxels, and the kidney region's HU is described).

    A case has a problem when a file can't be read, an image isn't 3D, its label map is not on
    the image's voxel grid (shape and affine) or holds a value the model has no class for. It
    gets a warning for a label map without kidney or a voxel size outside 0.3-10 mm. Returns
    ``{"cases": [...], "summary": {...}, "problems": [...], "warnings": [...]}``.
    """
    from segcore.metrics import tumor_sizes

    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    warnings: list[str] = []
    for c in tqdm(find_cases(root, need_image=False, label_file=label_file), desc="check", disable=not progress):
        row: dict[str, Any] = {"case": c.case_id, "image": c.image is not None, "label": c.label is not None}
        rows.append(row)
        try:
            shape: tuple[int, ...] | None = None
            affine: npt.NDArray[np.float64] | None = None
            vol = None
            if c.image is not None and read_images:
                vol = load_volume(c.image)  # every voxel decoded and checked, as training reads it
                shape, affine = vol.shape, vol.affine
            elif c.image is not None:
                img = nib.load(c.image)  # the header only: the voxels are read lazily, and never here
                shape, affine = tuple(int(n) for n in img.shape), np.asarray(img.affine, dtype=np.float64)
                if len(shape) != 3:
                    raise DatasetError(f"{c.image.name} has shape {shape}; a CT volume is 3D")
            if c.label is not None:
                lab, lab_affine = load_labels(c.label)
                if shape is not None and affine is not None:
                    check_grid(c.label.name, lab.shape, lab_affine, c.image.name if c.image else "", shape, affine)
                shape, affine = lab.shape, lab_affine
            assert shape is not None and affine is not None
            zooms = [float(z) for z in nib.affines.voxel_sizes(affine)]
            z, plane = _axes(affine)
            row.update(
                shape=list(shape),
                orientation="".join(nib.aff2axcodes(affine)),
                slices=shape[z],
                in_plane=f"{shape[plane[0]]}x{shape[plane[1]]}",
                slice_mm=zooms[z],
                in_plane_mm=[zooms[plane[0]], zooms[plane[1]]],
            )
            if not all(0.3 <= v <= 10.0 for v in zooms):
                warnings.append(f"{c.case_id}: voxel size {tuple(round(v, 3) for v in zooms)} mm")
            if c.label is not None:
                counts = np.bincount(lab.ravel(), minlength=num_classes)
                row["labels"] = {str(v): int(n) for v, n in enumerate(counts) if n}
                check_labels(lab, num_classes, c)
                voxel_ml = float(np.prod(zooms)) / 1000.0
                row["kidney_ml"] = float(counts[1:].sum()) * voxel_ml
                row["cyst_ml"] = float(counts[3]) * voxel_ml if len(counts) > 3 else 0.0
                row.update(tumor_sizes(lab, zooms))
                if vol is not None and counts[1:].any():
                    p5, p50, p95 = np.percentile(vol.data[lab > 0], [5, 50, 95])
                    row["kidney_hu"] = {"p5": float(p5), "median": float(p50), "p95": float(p95)}
                if not counts[1:].any():
                    warnings.append(f"{c.case_id}: {c.label.name} has no kidney (every voxel is 0)")
        except Exception as e:  # the point is to report every unreadable or inconsistent case, not to stop at one
            row["problem"] = str(e) if isinstance(e, DatasetError) else f"{type(e).__name__}: {e}"
            problems.append(
                row["problem"] if row["problem"].startswith(c.case_id) else f"{c.case_id}: {row['problem']}"
            )
    ok = [r for r in rows if "problem" not in r]
    labelled_ok = [r for r in ok if r["label"]]
    orientations: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for r in ok:
        orientations[r["orientation"]] = orientations.get(r["orientation"], 0) + 1
        sizes[r["in_plane"]] = sizes.get(r["in_plane"], 0) + 1
    summary = {
        "cases": len(rows),
        "labelled": sum(r["label"] for r in rows),
        "imaging_only": sum(r["image"] and not r["label"] for r in rows),
        "labels_only": sum(r["label"] and not r["image"] for r in rows),
        "with_problems": len(problems),
        "orientations": orientations,
        "in_plane_sizes": sizes,
        "slices": _spread([r["slices"] for r in ok]),
        "slice_mm": _spread([r["slice_mm"] for r in ok]),
        "in_plane_mm": _spread([v for r in ok for v in r["in_plane_mm"]]),
        "kidney_ml": _spread([r["kidney_ml"] for r in labelled_ok]),
        "tumor_free": sum(r["ref_tumors"] == 0 for r in labelled_ok),
        "with_a_tumor_under_10_ml": sum(0 < r["ref_smallest_tumor_ml"] < 10.0 for r in labelled_ok),
        "tumor_ml": _spread([r["ref_tumor_ml"] for r in labelled_ok if r["ref_tumors"]]),
        "with_cysts": sum(r["cyst_ml"] > 0 for r in labelled_ok),
        "kidney_hu_median": _spread([r["kidney_hu"]["median"] for r in labelled_ok if "kidney_hu" in r]),
    }
    return {"cases": rows, "summary": summary, "problems": problems, "warnings": warnings}
