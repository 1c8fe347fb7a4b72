import warnings

import numpy as np
import pytest

from segcore.metrics import (
    dice,
    kits19,
    kits23,
    pixel_accuracy,
    summarize,
    surface_dice,
    tumor_dice_by_size,
    tumor_sizes,
)


def test_dice_hand_computed() -> None:
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros((4, 4, 4), bool)
    a[0, 0, :4] = True  # 4 voxels
    b[0, 0, 2:4] = True  # 2 voxels, 2 shared
    assert dice(a, b) == pytest.approx(2 * 2 / (4 + 2))
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0


def test_kits19_kidney_counts_tumor_as_kidney() -> None:
    ref = np.array([0, 1, 1, 2, 2, 0])
    pred = np.array([0, 1, 2, 2, 0, 0])
    # kidney region: ref {1,2,3,4}, pred {1,2,3} -> 2*3/7; tumor: ref {3,4}, pred {2,3} -> 2*1/4
    m = kits19(pred, ref)
    assert m["kidney_dice"] == pytest.approx(6 / 7)
    assert m["tumor_dice"] == pytest.approx(0.5)
    assert m["composite"] == pytest.approx((6 / 7 + 0.5) / 2)


def test_pixel_accuracy_next_to_background_baseline() -> None:
    ref = np.zeros(1000, np.uint8)
    ref[:12] = 1
    all_bg = np.zeros_like(ref)
    pa = pixel_accuracy(all_bg, ref)
    assert pa["pixel_accuracy"] == pytest.approx(0.988) == pa["all_background_accuracy"]
    assert kits19(all_bg, ref)["kidney_dice"] == 0.0


def test_kits23_nested_regions() -> None:
    ref = np.array([0, 1, 2, 3, 3, 0])
    pred = np.array([0, 1, 2, 2, 0, 0])
    m = kits23(pred.reshape(1, 1, -1), ref.reshape(1, 1, -1), (1, 1, 1), with_surface=False)
    assert m["kidney_and_masses_dice"] == pytest.approx(2 * 3 / (3 + 4))
    assert m["masses_dice"] == pytest.approx(2 * 2 / (2 + 3))
    assert m["tumor_dice"] == pytest.approx(2 * 1 / (2 + 1))


def test_surface_dice_tolerance() -> None:
    ref = np.zeros((20, 20, 20), bool)
    ref[5:15, 5:15, 5:15] = True
    assert surface_dice(ref, ref, (1, 1, 1), 1.0) == pytest.approx(1.0)
    shifted = np.roll(ref, 3, axis=0)
    # A 3-voxel shift at 1 mm spacing: mostly outside a 1 mm tolerance, inside a 4 mm one.
    assert surface_dice(shifted, ref, (1, 1, 1), 1.0) < 0.8
    assert surface_dice(shifted, ref, (1, 1, 1), 4.0) == pytest.approx(1.0)
    # With 0.25 mm voxels the same shift is 0.75 mm: within 1 mm.
    assert surface_dice(shifted, ref, (0.25, 0.25, 0.25), 1.0) == pytest.approx(1.0)
    assert surface_dice(np.zeros_like(ref), np.zeros_like(ref), (1, 1, 1), 1.0) == 1.0
    assert surface_dice(ref, np.zeros_like(ref), (1, 1, 1), 1.0) == 0.0


def test_surface_dice_leaves_no_library_warning_behind() -> None:
    # MONAI warned about an argument its own compute_surface_dice passes; a user can't act on it.
    ref = np.zeros((12, 12, 12), bool)
    ref[3:9, 3:9, 3:9] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert surface_dice(np.roll(ref, 1, axis=0), ref, (1, 1, 1), 1.0) > 0.5
    # ... and other code's warnings are still shown afterwards.
    with pytest.warns(FutureWarning, match="always_return_as_numpy"):
        warnings.warn("always_return_as_numpy elsewhere", FutureWarning, stacklevel=1)


def test_summarize_means() -> None:
    assert summarize([{"a": 1.0}, {"a": 0.0}]) == {"a": 0.5}
    # The reference's descriptors are not scores: they stay out of the means.
    assert summarize([{"a": 1.0, "ref_tumor_ml": 3.0}]) == {"a": 1.0}


def test_tumor_sizes_count_components_in_ml() -> None:
    ref = np.zeros((20, 30, 40), dtype=np.uint8)
    ref[2:18, 2:28, 2:38] = 1
    ref[3:5, 3:5, 3:5] = 2  # 8 voxels
    ref[10:13, 10:20, 10:20] = 2  # 300 voxels
    ref[13, 20, 20] = 2  # touches the second one diagonally: same tumor (26-connectivity)
    got = tumor_sizes(ref, (2.0, 1.0, 0.5))  # 1 mm^3 per voxel
    assert got == {"ref_tumors": 2, "ref_tumor_ml": pytest.approx(0.309), "ref_smallest_tumor_ml": pytest.approx(0.008)}
    assert tumor_sizes(np.ones((4, 4, 4), np.uint8), (1, 1, 1)) == {
        "ref_tumors": 0,
        "ref_tumor_ml": 0.0,
        "ref_smallest_tumor_ml": 0.0,
    }


def test_tumor_dice_by_size_groups_cases() -> None:
    rows = [
        {"tumor_dice": 0.2, "ref_tumors": 2, "ref_smallest_tumor_ml": 3.0},  # has a small one
        {"tumor_dice": 0.4, "ref_tumors": 1, "ref_smallest_tumor_ml": 9.9},
        {"tumor_dice": 0.9, "ref_tumors": 1, "ref_smallest_tumor_ml": 10.0},
        {"tumor_dice": 0.0, "ref_tumors": 0, "ref_smallest_tumor_ml": 0.0},
    ]
    got = tumor_dice_by_size(rows)
    assert got["small"] == {"n": 2, "tumor_dice": pytest.approx(0.3)}
    assert got["large"] == {"n": 1, "tumor_dice": pytest.approx(0.9)}
    assert got["tumor_free"] == {"n": 1, "tumor_dice": 0.0}
    assert tumor_dice_by_size(rows[:1])["large"] == {"n": 0, "tumor_dice": None}
