"""Geometry: masks must come back on the input grid and line up in world space, whatever the
orientation (KiTS IPL, RAS, LPS, a permuted one, and oblique)."""

import nibabel as nib
import numpy as np
import pytest
import torch

from segcore.checkpoint import KITS19_LABELS, CheckpointMeta
from segcore.inference import Engine
from segcore.io import Volume
from segcore.metrics import dice
from segcore.preprocessing import (
    PreprocessConfig,
    canonical_info,
    canonical_view,
    from_canonical,
    model_grid,
    preprocess_case,
)
from segcore.unet import UNetConfig
from tests.conftest import GEOM_PP, ORIENTATIONS, IntensityModel, make_volume


@pytest.mark.parametrize("codes", list(ORIENTATIONS.values()))
def test_canonical_roundtrip_is_exact(codes: tuple[str, str, str]) -> None:
    hu, aff, _ = make_volume(codes)
    canon = canonical_info(aff, hu.shape)
    view = canonical_view(hu, canon)
    assert view.shape == canon.shape_zyx
    back = from_canonical(np.ascontiguousarray(view), canon)
    assert back.shape == hu.shape
    np.testing.assert_array_equal(back, hu)


@pytest.mark.parametrize("codes", list(ORIENTATIONS.values()))
def test_canonical_view_is_ras_ordered(codes: tuple[str, str, str]) -> None:
    hu, aff, _ = make_volume(codes)
    canon = canonical_info(aff, hu.shape)
    view = canonical_view(hu, canon)  # (Z, Y, X)
    ref_hu, _, _ = make_volume(("R", "A", "S"))
    np.testing.assert_array_equal(view, ref_hu.transpose(2, 1, 0))
    assert canon.spacing_zyx == pytest.approx((2.5, 1.2, 1.0))


def _engine(pp: PreprocessConfig) -> Engine:
    cfg = UNetConfig(in_slices=3, base_width=4, depth=3)
    meta = CheckpointMeta(cfg, pp, dict(KITS19_LABELS))
    return Engine(IntensityModel(cfg, pp), meta, torch.device("cpu"), batch_size=4, precision="fp32")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(ORIENTATIONS))
def test_engine_mask_is_exact_on_input_grid_native_spacing(name: str) -> None:
    hu, aff, truth = make_volume(ORIENTATIONS[name])
    vol = Volume(hu, aff, nib.Nifti1Header(), (1.0, 1.0, 1.0))
    pred = _engine(GEOM_PP).predict(vol)
    assert pred.mask.shape == hu.shape and pred.mask.dtype == np.uint8
    np.testing.assert_array_equal(pred.mask, truth)


@pytest.mark.parametrize(
    "name, oblique", [("IPL", 0.0), ("RAS", 0.0), ("LPS", 0.0), ("PSR", 0.0), ("LPS", 25.0), ("IPL", 33.0)]
)
def test_engine_mask_aligns_in_world_space_with_resampling(name: str, oblique: float) -> None:
    # The model grid differs from the input grid (1.6 mm in-plane), so labels travel through
    # resampling both ways; the truth is defined in world coordinates.
    hu, aff, truth = make_volume(ORIENTATIONS[name], oblique_deg=oblique)
    vol = Volume(hu, aff, nib.Nifti1Header(), (1.0, 1.0, 1.0))
    pp = PreprocessConfig(target_spacing_mm=(1.6, 1.6), clip_hu=GEOM_PP.clip_hu, mean=GEOM_PP.mean, std=GEOM_PP.std)
    pred = _engine(pp).predict(vol)
    assert pred.mask.shape == hu.shape
    assert dice(pred.mask > 0, truth > 0) > 0.95
    assert dice(pred.mask == 2, truth == 2) > 0.9
    # A mirrored mask (a classic orientation bug) must score far lower.
    assert dice(pred.mask[::-1, ::-1, ::-1] == 2, truth == 2) < 0.2


def test_model_grid_sizes() -> None:
    pp = PreprocessConfig(target_spacing_mm=(1.6, 1.6))
    assert model_grid((512, 512), (0.8, 0.8), pp) == (256, 256)
    assert model_grid((512, 796), (0.8, 0.8), pp) == (256, 398)
    assert model_grid((100, 100), (1.0, 1.0), PreprocessConfig(target_spacing_mm=None)) == (100, 100)


def test_preprocess_case_resamples_labels_and_normalises() -> None:
    hu, aff, truth = make_volume(ORIENTATIONS["IPL"])
    pp = PreprocessConfig(target_spacing_mm=(2.0, 2.0), clip_hu=(-100.0, 300.0), mean=100.0, std=100.0)
    pc = preprocess_case(hu, aff, truth, pp, num_classes=3)
    assert pc.label is not None
    assert pc.image.shape == pc.label.shape == (20, 36, 36)
    assert pc.image.dtype == np.float16 and pc.label.dtype == np.uint8
    assert float(pc.image.max()) <= 2.0 + 1e-3 and float(pc.image.min()) >= -2.0 - 1e-3
    # Label volume fractions survive resampling.
    for c in (1, 2):
        assert abs((pc.label == c).mean() - (truth == c).mean()) < 0.2 * (truth == c).mean()


@pytest.mark.parametrize(
    "kwargs", [{"orientation": "LPS"}, {"target_spacing_mm": (0.0, 1.0)}, {"clip_hu": (10.0, -10.0)}, {"std": 0.0}]
)
def test_bad_preprocess_config(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        PreprocessConfig(**kwargs)
