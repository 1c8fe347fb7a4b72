import nibabel as nib
import numpy as np
import pytest

from segcore.io import Volume
from segcore.postprocess import PostprocessConfig, foreground_bbox, keep_largest_components, relabel_small_tumors
from segcore.stats import class_statistics, compute_statistics, kidney_sides, max_axial_diameter_mm

LABELS = {0: "background", 1: "kidney", 2: "tumor"}


def _vol(shape=(40, 30, 20), zooms=(1.0, 2.0, 2.5), hu=100.0) -> Volume:
    aff = np.diag([*zooms, 1.0])  # RAS: axis 0 is x (patient right = +x)
    return Volume(np.full(shape, hu, np.float32), aff, nib.Nifti1Header(), zooms)


def test_volumes_components_bbox_centroid_hu() -> None:
    vol = _vol()
    vol.stored[2:6, 3:5, 4:6] = 200.0
    mask = np.zeros(vol.shape, np.uint8)
    mask[2:6, 3:5, 4:6] = 1  # 4*2*2 = 16 voxels of 5 mm^3
    mask[30:32, 10:11, 10:11] = 1  # 2 voxels, second component
    (kid, tum) = compute_statistics(mask, vol, LABELS, {1: 0.9, 2: 0.0})
    assert kid["voxels"] == 18 and kid["volume_ml"] == pytest.approx(18 * 5.0 / 1000)
    assert kid["components"] == 2 and kid["largest_component_ml"] == pytest.approx(16 * 5.0 / 1000)
    assert kid["bbox_voxels"] == {"min": [2, 3, 4], "max": [31, 10, 10]}
    assert kid["bbox_size_mm"] == [30.0, 16.0, 17.5]
    centroid_ijk = np.argwhere(mask == 1).mean(0)
    assert kid["centroid_mm"] == pytest.approx(list(centroid_ijk * [1.0, 2.0, 2.5]))
    assert kid["hu"]["max"] == 200.0 and kid["hu"]["min"] == 100.0
    assert kid["mean_confidence"] == 0.9 and kid["touches_border"] is False
    assert tum["present"] is False and tum["voxels"] == 0 and tum["max_axial_diameter_mm"] == 0.0


def test_touches_border() -> None:
    vol = _vol()
    mask = np.zeros(vol.shape, np.uint8)
    mask[0:3, 5:8, 5:8] = 2
    (_, tum) = compute_statistics(mask, vol, LABELS)
    assert tum["touches_border"] is True


def test_left_right_split_with_tumor_per_side() -> None:
    vol = _vol(shape=(60, 20, 20), zooms=(1.0, 1.0, 1.0))
    mask = np.zeros(vol.shape, np.uint8)
    mask[5:15, 5:15, 5:15] = 1  # low x: patient left in RAS+
    mask[45:55, 5:15, 5:15] = 1  # high x: patient right
    mask[50:55, 5:10, 5:10] = 2  # tumor in the right kidney: 125 voxels
    sides = kidney_sides(mask, vol)
    assert sides["left"]["tumor_ml"] == 0.0 and sides["left"]["total_ml"] == pytest.approx(1.0)
    assert sides["right"]["tumor_ml"] == pytest.approx(0.125)
    assert sides["right"]["kidney_ml"] == pytest.approx(1.0 - 0.125)


def test_max_axial_diameter_of_a_disc() -> None:
    vol = _vol(shape=(64, 64, 5), zooms=(0.5, 0.5, 3.0))
    yy, xx = np.mgrid[:64, :64]
    disc = ((yy - 32) ** 2 + (xx - 32) ** 2) <= 20**2  # radius 20 voxels = 10 mm
    mask = np.zeros(vol.shape, bool)
    mask[:, :, 2] = disc
    assert max_axial_diameter_mm(mask, vol) == pytest.approx(20.5, abs=0.6)


def test_keep_largest_components_drops_far_blobs() -> None:
    mask = np.zeros((40, 40, 40), np.uint8)
    mask[5:15, 5:15, 5:15] = 1
    mask[25:35, 25:35, 25:35] = 1
    mask[27:30, 27:30, 27:30] = 2  # tumor inside a kept kidney
    mask[0:2, 38:40, 0:2] = 2  # a stray false positive
    out = keep_largest_components(mask.copy(), PostprocessConfig())
    assert out[0:2, 38:40, 0:2].max() == 0
    assert (out == 2).sum() == 27 and (out == 1).sum() == 2000 - 27
    assert keep_largest_components(mask.copy(), PostprocessConfig(keep_largest=False))[0, 39, 0] == 2
    with pytest.raises(ValueError):
        PostprocessConfig(max_components=0)


@pytest.mark.parametrize("layout", ["C", "F", "F flipped", "C transposed and flipped"])
def test_keep_largest_components_is_the_same_for_every_memory_layout(layout: str) -> None:
    # Components are labelled in memory order (the engine hands over a flipped, transposed view
    # of an F-ordered mask); which of equally large components survive must still follow the
    # caller's scan order, not the memory's.
    canon = np.zeros((12, 14, 16), np.uint8)
    canon[1:3, 1:3, 1:3] = 1  # three 8-voxel cubes: a tie at max_components = 2
    canon[6:8, 10:12, 2:4] = 2
    canon[9:11, 4:6, 12:14] = 1
    canon[5:9, 5:9, 5:9] = 1  # 64 voxels, the largest
    cfg = PostprocessConfig(max_components=2, min_fraction=0.0)
    want = keep_largest_components(canon.copy(), cfg)
    assert want[5:9, 5:9, 5:9].all() and want[1:3, 1:3, 1:3].all() and want.sum() == 64 + 8
    store = np.asfortranarray(canon) if layout.startswith("F") else canon.copy()
    if layout == "F flipped":
        view = store[::-1, :, ::-1]
        keep_largest_components(view, cfg)
        np.testing.assert_array_equal(store[::-1, :, ::-1], keep_largest_components(canon[::-1, :, ::-1].copy(), cfg))
    elif layout == "C transposed and flipped":
        store = np.ascontiguousarray(canon.transpose(2, 0, 1)[::-1])  # memory (X, Z, Y), X reversed
        view = store[::-1].transpose(1, 2, 0)  # the caller sees (Z, Y, X) again
        keep_largest_components(view, cfg)
        np.testing.assert_array_equal(view, want)
    else:
        keep_largest_components(store, cfg)
        np.testing.assert_array_equal(store, want)
    # Without a tie the memory order doesn't matter at all: 2 of 4 components, none equal.
    canon[9:11, 4:6, 12:15] = 1
    fwd = keep_largest_components(np.asfortranarray(canon)[:, ::-1].copy(order="F")[:, ::-1], cfg)
    np.testing.assert_array_equal(fwd, keep_largest_components(canon.copy(), cfg))
    assert fwd[9:11, 4:6, 12:15].all() and fwd.sum() == 64 + 12


def test_relabel_small_tumors_by_volume_with_26_connectivity() -> None:
    mask = np.zeros((20, 20, 20), np.uint8)
    mask[2:18, 2:18, 2:18] = 1
    mask[4, 4, 4] = mask[5, 5, 5] = mask[6, 6, 6] = 2  # 3 voxels, corner to corner: one 26-component
    mask[10, 10, 10:14] = 2  # 4 voxels
    mask[14:16, 14:16, 14:16] = 2  # 8 voxels
    before = mask.copy()
    # 0.125 mL a voxel, 0.5 mL = 4 voxels: components of fewer than 4 voxels become kidney.
    out = relabel_small_tumors(mask, 0.5, voxel_ml=0.125)
    assert out is mask
    assert (mask[4, 4, 4], mask[5, 5, 5], mask[6, 6, 6]) == (1, 1, 1)
    assert (mask[10, 10, 10:14] == 2).all() and (mask[14:16, 14:16, 14:16] == 2).all()
    np.testing.assert_array_equal(mask > 0, before > 0)
    assert (mask == 2).sum() == 12
    # Just above 4 voxels' volume, the 4-voxel one goes too; 0 turns it off; a view is written through.
    assert (relabel_small_tumors(before.copy(), 0.51, voxel_ml=0.125) == 2).sum() == 8
    np.testing.assert_array_equal(relabel_small_tumors(before.copy(), 0.0, voxel_ml=0.125), before)
    view = before.copy()
    relabel_small_tumors(view[::-1, :, ::-1].transpose(2, 0, 1), 0.5, voxel_ml=0.125)
    np.testing.assert_array_equal(view, mask)
    with pytest.raises(ValueError, match="voxel volume"):
        relabel_small_tumors(before.copy(), 0.5, voxel_ml=0.0)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="min_tumor_ml"):
            PostprocessConfig(min_tumor_ml=bad)


@pytest.mark.parametrize("layout", ["C", "F", "flipped", "transposed"])
def test_foreground_bbox_matches_argwhere_in_any_memory_layout(layout: str) -> None:
    rng = np.random.default_rng(3)
    base = np.zeros((30, 41, 52), np.uint8)
    base[7:19, 12:14, 30:45] = rng.integers(0, 3, size=(12, 2, 15))
    base[25, 40, 3] = 2
    arr = {
        "C": base,
        "F": np.asfortranarray(base),
        "flipped": np.asfortranarray(base[::-1, :, ::-1])[::-1, :, ::-1],
        "transposed": np.ascontiguousarray(base.transpose(2, 0, 1)).transpose(1, 2, 0),
    }[layout]
    np.testing.assert_array_equal(arr, base)
    pts = np.argwhere(base)
    want = tuple(slice(int(a), int(b) + 1) for a, b in zip(pts.min(0), pts.max(0), strict=True))
    assert foreground_bbox(arr) == want
    assert foreground_bbox(arr > 0) == want
    assert foreground_bbox(np.zeros_like(arr)) is None


def test_statistics_inside_the_foreground_box_equal_the_whole_mask_scan() -> None:
    vol = _vol(shape=(50, 40, 30), zooms=(0.8, 0.8, 3.0))
    rng = np.random.default_rng(5)
    vol.stored[:] = rng.normal(80, 30, vol.shape).astype(np.float32)
    mask = np.zeros(vol.shape, np.uint8)
    mask[4:14, 20:30, 5:12] = 1
    mask[35:46, 18:31, 8:20] = 1
    mask[37:41, 20:24, 10:13] = 2
    mask[9, 33, 25] = 2  # a stray tumor voxel: two components, a wider box
    got = compute_statistics(mask, vol, LABELS, {1: 0.8, 2: 0.6})
    # A box handed in (the engine's, which may be loose) gives the same numbers.
    assert compute_statistics(mask, vol, LABELS, {1: 0.8, 2: 0.6}, (slice(2, 50), slice(15, 36), slice(3, 27))) == got
    for entry in got:
        lab, name = entry["label"], entry["name"]
        whole = class_statistics(mask, vol, lab, name, entry["mean_confidence"])[0]  # box=None: the whole mask
        assert {k: v for k, v in entry.items() if k not in ("sides", "max_axial_diameter_mm")} == whole
    assert got[0]["sides"] == kidney_sides(mask, vol)
    assert got[1]["components"] == 2 and got[1]["bbox_voxels"] == {"min": [9, 20, 10], "max": [40, 33, 25]}
    assert got[1]["max_axial_diameter_mm"] == pytest.approx(max_axial_diameter_mm(mask[37:41, 20:24, 10:13] == 2, vol))


def test_kidney_sides_put_a_plane_on_the_midline_left_and_break_ties_by_first_voxel() -> None:
    vol = _vol(shape=(21, 6, 6), zooms=(1.0, 1.0, 1.0))
    mask = np.zeros(vol.shape, np.uint8)
    mask[0:5, 0:3, 0:3] = 1  # 45 voxels, centroid x = 2
    mask[16:21, 0:3, 0:3] = 1  # 45 voxels, centroid x = 18: the midline is x = 10
    mask[10, 5, 5] = 2  # one tumor voxel exactly on it
    sides = kidney_sides(mask, vol)
    assert sides["midline_x_mm"] == 10.0
    assert sides["left"]["tumor_ml"] == pytest.approx(0.001) and sides["right"]["tumor_ml"] == 0.0
    assert sides["left"]["total_ml"] == pytest.approx(0.046) and sides["right"]["total_ml"] == pytest.approx(0.045)
    # Second place tied between two 18-voxel components: the one whose first voxel comes first
    # in the mask's index order wins, in either memory layout (a C-order scan meets T1 first, a
    # scan of the Fortran-ordered memory meets T2 first).
    mask[:] = 0
    mask[0:7, 0:6, 0:2] = 1  # the largest, 84 voxels, centroid x = 3
    mask[0:3, 0:3, 4:6] = 1  # T1: 18 voxels, centroid x = 1, first voxel (0, 0, 4)
    mask[14:17, 0:3, 3:5] = 1  # T2: 18 voxels, centroid x = 15, first voxel (14, 0, 3)
    for order in "CF":
        assert kidney_sides(np.asarray(mask, order=order), vol)["midline_x_mm"] == 2.0, order


@pytest.mark.parametrize("oblique", [False, True])
def test_statistics_are_the_same_for_every_memory_layout(oblique: bool) -> None:
    rng = np.random.default_rng(11)
    shape = (30, 24, 18)
    mask = np.zeros(shape, np.uint8)
    mask[2:9, 3:10, 2:8] = 1
    mask[20:27, 3:10, 9:15] = 1  # the same size: mirror-image kidneys
    mask[5:7, 5:7, 3:5] = 2
    mask[12, 20, 10] = 1  # a third, small component
    mask[rng.random(shape) < 0.003] = 2
    aff = np.diag([0.8, 0.8, 2.5, 1.0])[:, [2, 0, 1, 3]]  # axis 0 -> z, 1 -> x, 2 -> y
    aff[:3, 3] = (-40.0, 12.0, 7.0)
    if oblique:
        th = 0.3
        rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
        aff[:3, :3] = rot @ aff[:3, :3]
    zooms = tuple(float(np.linalg.norm(aff[:3, i])) for i in range(3))
    hu = rng.normal(60, 40, shape).astype(np.float32)
    want = None
    for m_order, h_order in (("C", "C"), ("F", "F"), ("F", "C"), ("C", "F")):
        vol = Volume(np.asarray(hu, order=h_order), aff, nib.Nifti1Header(), zooms)
        got = compute_statistics(np.asarray(mask, order=m_order), vol, LABELS, {1: 0.9, 2: 0.8})
        # A strided view of a larger array too.
        big = np.zeros((shape[0] * 2, *shape[1:]), np.uint8, order=m_order)
        big[::2] = mask
        assert compute_statistics(big[::2], vol, LABELS, {1: 0.9, 2: 0.8}) == got
        if want is None:
            want = got
        # HU mean and std are float sums taken in the mask's memory order: equal to rounding.
        for g, w in zip(got, want, strict=True):
            assert g["hu"] == pytest.approx(w["hu"], rel=1e-12)
        strip = [[{k: v for k, v in e.items() if k != "hu"} for e in r] for r in (got, want)]
        assert strip[0] == strip[1], (m_order, h_order)
    assert want is not None and want[0]["components"] == 3 and want[0]["sides"]["left"]["present"]


def test_tumor_diameter_measures_the_largest_component_with_ties_by_first_voxel() -> None:
    vol = _vol(shape=(20, 12, 6), zooms=(1.0, 1.0, 1.0))
    mask = np.zeros(vol.shape, np.uint8)
    mask[0:12, 0:12, 0:6] = 1
    # Diameters are measured between pixel corners.
    mask[2:4, 2:4, 0] = 2  # 4 voxels, one slice: sqrt(8) mm across
    mask[10:18, 8, 3] = 2  # 8 voxels in a row: sqrt(65) mm across, but not the largest ...
    mask[3:6, 8:11, 4] = 2  # ... this 9-voxel square is: sqrt(18) mm
    got = compute_statistics(mask, vol, LABELS)[1]
    assert got["components"] == 3 and got["voxels"] == 21
    assert got["max_axial_diameter_mm"] == pytest.approx(np.sqrt(18.0))
    # Tied for largest: a row of 9 (first voxel (10, 8, 3)) against the square (first voxel
    # (3, 8, 4)): the square comes first in the mask's index order, in either memory layout,
    # although a scan of Fortran-ordered memory meets the row first.
    mask[18, 8, 3] = 2
    for order in "CF":
        got = compute_statistics(np.asarray(mask, order=order), vol, LABELS)[1]
        assert got["largest_component_ml"] == pytest.approx(0.009)
        assert got["max_axial_diameter_mm"] == pytest.approx(np.sqrt(18.0)), order
    # One voxel less in the square: the row is the largest, sqrt(82) mm across.
    mask[5, 10, 4] = 1
    assert compute_statistics(mask, vol, LABELS)[1]["max_axial_diameter_mm"] == pytest.approx(np.sqrt(82.0))
