"""Shared fixtures: seeded synthetic volumes in several orientations, and a tiny checkpoint."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from segcore.checkpoint import KITS19_LABELS, CheckpointMeta, save_checkpoint
from segcore.preprocessing import PreprocessConfig
from segcore.unet import UNet, UNetConfig

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
KITS19_LABELS_DIR = SHARED / "data" / "kits19-labels"
KITS23_LABELS_DIR = SHARED / "data" / "kits23-labels"

ORIENTATIONS = {
    "IPL": ("I", "P", "L"),  # KiTS19: (slices, H, W)
    "RAS": ("R", "A", "S"),
    "LPS": ("L", "P", "S"),  # DICOM-style
    "PSR": ("P", "S", "R"),
}

KIDNEY_HU, TUMOR_HU, BG_HU = 180.0, 320.0, -50.0


def world_truth(world: np.ndarray) -> np.ndarray:
    """Ground-truth labels as a function of world (RAS mm) position: an off-centre, asymmetric
    'kidney' ellipsoid with a 'tumor' ball on its upper-right-anterior side."""
    x, y, z = world[..., 0], world[..., 1], world[..., 2]
    kidney = ((x - 14) / 22) ** 2 + ((y + 6) / 14) ** 2 + ((z - 4) / 16) ** 2 <= 1
    tumor = (x - 26) ** 2 + (y + 2) ** 2 + (z - 10) ** 2 <= 8.0**2
    lab = np.zeros(x.shape, dtype=np.uint8)
    lab[kidney] = 1
    lab[tumor] = 2
    return lab


def voxel_world(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def make_volume(
    codes: tuple[str, str, str],
    spacing_ras: tuple[float, float, float] = (1.0, 1.2, 2.5),
    shape_ras: tuple[int, int, int] = (72, 60, 20),
    oblique_deg: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A volume whose intensities encode :func:`world_truth`, stored with axes ``codes``.

    Returns (HU array, affine, ground-truth labels), all on the stored voxel grid.
    """
    ras_aff = np.diag([*spacing_ras, 1.0])
    ras_aff[:3, 3] = -(np.array(shape_ras) - 1) * np.array(spacing_ras) / 2
    tr = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt(("R", "A", "S")), nib.orientations.axcodes2ornt(codes)
    )
    shape = tuple(int(v) for v in nib.orientations.apply_orientation(np.zeros(shape_ras), tr).shape)
    affine = ras_aff @ nib.orientations.inv_ornt_aff(tr, shape_ras)
    if oblique_deg:
        a = np.deg2rad(oblique_deg)
        rot = np.eye(4)
        rot[:3, :3] = [[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]
        b = np.deg2rad(oblique_deg / 2)
        rot2 = np.eye(4)
        rot2[:3, :3] = [[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]]
        affine = rot @ rot2 @ affine
    truth = world_truth(voxel_world(affine, shape))  # type: ignore[arg-type]
    hu = np.choose(truth, [BG_HU, KIDNEY_HU, TUMOR_HU]).astype(np.float32)
    assert nib.orientations.aff2axcodes(affine) == codes or oblique_deg
    return hu, affine, truth


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, dtype: type = np.int16) -> Path:
    """Write a NIfTI-1 file; an affine nibabel cannot store as a qform (singular, NaN) goes into
    the sform alone, which is how such files appear in the wild."""
    try:
        img = nib.Nifti1Image(data.astype(dtype), affine)
        img.set_data_dtype(dtype)
        nib.save(img, str(path))
    except nib.spatialimages.HeaderDataError:
        hdr = nib.Nifti1Header()
        hdr.set_data_dtype(dtype)
        hdr.set_sform(affine, code=2)
        hdr["qform_code"] = 0
        img = nib.Nifti1Image(data.astype(dtype), None, header=hdr)
        nib.save(img, str(path))
    return path


class IntensityModel(nn.Module):
    """A stand-in network that labels voxels by (normalised) intensity of the centre slice, so the
    engine's geometry can be tested independently of learning."""

    def __init__(self, config: UNetConfig, pp: PreprocessConfig) -> None:
        super().__init__()
        self.config = config
        self.t1 = (0.5 * (BG_HU + KIDNEY_HU) - pp.mean) / pp.std
        self.t2 = (0.5 * (KIDNEY_HU + TUMOR_HU) - pp.mean) / pp.std
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x[:, self.config.in_slices // 2 : self.config.in_slices // 2 + 1].float()
        k = 40.0
        l1 = k * (c - self.t1)
        return torch.cat([torch.zeros_like(c), l1, l1 + k * (c - self.t2)], dim=1)


GEOM_PP = PreprocessConfig(target_spacing_mm=None, clip_hu=(-200.0, 400.0), mean=100.0, std=150.0)


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    return make_tiny_checkpoint(tmp_path)


def make_tiny_checkpoint(folder: Path) -> Path:
    """An untrained 3-class 2.5D U-Net small enough for every request in the tests to be quick."""
    cfg = UNetConfig(in_slices=3, num_classes=3, base_width=4, depth=3)
    torch.manual_seed(0)
    model = UNet(cfg)
    meta = CheckpointMeta(
        cfg, PreprocessConfig(), dict(KITS19_LABELS), metrics={"val_composite": 0.0}, provenance={"data": "test"}
    )
    path = folder / "tiny.safetensors"
    save_checkpoint(path, model, meta)
    return path


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_under_pytest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Temporary files of the whole run, including child processes' (torchrun's rendezvous
    folders, chromium's profile), go under pytest's own temporary folder, which pytest prunes,
    instead of being left behind in /tmp."""
    folder = tmp_path_factory.mktemp("tmpdir")
    old_env, old_default = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = str(folder)
    tempfile.tempdir = str(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = old_default
        if old_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_env


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)"))


os.environ.setdefault("KITSEG_TEST", "1")
