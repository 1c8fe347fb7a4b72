import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segcore.io import load_labels, load_volume
from training.datasets import find_cases, write_kits_case
from training.synth import make_phantom, render_for_labels


def test_phantom_anatomy_and_labels() -> None:
    hu, seg, _ = make_phantom(np.random.default_rng(3), inplane=96)
    assert hu.dtype == np.int16 and seg.dtype == np.uint8 and hu.shape == seg.shape
    assert set(np.unique(seg)) <= {0, 1, 2}
    assert (seg == 1).any()
    kidney = hu[seg == 1].astype(float)
    assert 60 < kidney.mean() < 260, "kidney should be contrast-enhanced soft tissue"
    assert (hu < -900).mean() > 0.1, "air around the body"
    assert hu.max() > 300, "bone"
    # Two kidneys, one on each side of the midline (X axis of the canonical frame).
    xs = np.nonzero(seg > 0)[2]
    assert xs.min() < seg.shape[2] / 2 < xs.max()


def test_phantom_with_a_given_slice_count() -> None:
    # The same 15-22 cm of abdomen and in-plane grid, cut into the asked number of slices.
    hu, _, sp = make_phantom(np.random.default_rng(5), inplane=48)
    for n in (40, 120):
        hu_n, seg_n, sp_n = make_phantom(np.random.default_rng(5), inplane=48, slices=n)
        assert hu_n.shape == seg_n.shape == (n, 48, 48)
        assert sp_n[1:] == sp[1:]
        assert abs(n * sp_n[0] - hu.shape[0] * sp[0]) < sp[0]  # the same extent, to one thick slice
        assert 150 <= n * sp_n[0] <= 220
        kidney_ml = float((seg_n > 0).sum()) * float(np.prod(sp_n)) / 1000
        assert 100 < kidney_ml < 700, kidney_ml  # two kidneys with their masses, at any slice count
    with pytest.raises(ValueError, match="slices"):
        make_phantom(np.random.default_rng(5), inplane=48, slices=0)


def test_phantoms_vary_and_some_have_no_tumor() -> None:
    tumors = [int((make_phantom(np.random.default_rng(i), inplane=48)[1] == 2).sum()) for i in range(12)]
    assert len(set(tumors)) > 3
    assert any(t == 0 for t in tumors) and any(t > 0 for t in tumors)


def test_written_case_is_kits19_layout(tmp_path: Path) -> None:
    hu, seg, sp = make_phantom(np.random.default_rng(1), inplane=64)
    write_kits_case(tmp_path / "case_00007", hu, seg, sp)
    (case,) = find_cases(tmp_path)
    vol = load_volume(case.image)
    assert vol.shape == (hu.shape[0], 64, 64)  # (slices, H, W)
    assert vol.axcodes == ("I", "P", "L")
    assert vol.zooms == (sp[0], sp[1], sp[2])
    aff = vol.affine
    assert aff[0, 2] < 0 and aff[1, 1] < 0 and aff[2, 0] < 0 and abs(aff[0, 0]) < 1e-6
    lab, _ = load_labels(case.label)
    np.testing.assert_array_equal(lab, seg[::-1, ::-1, ::-1])


def test_render_for_labels_keeps_labels_and_paints_tissue() -> None:
    _, seg, sp = make_phantom(np.random.default_rng(5), inplane=80)
    hu = render_for_labels(seg, sp, np.random.default_rng(0))
    assert hu.shape == seg.shape and hu.dtype == np.int16
    assert hu[seg == 1].mean() > 60
    assert (hu[seg > 0] > -500).all(), "labelled voxels must be inside the body"


def test_synth_ct_cli_on_label_only_folder(tmp_path: Path) -> None:
    from training.cli import main

    _, seg, sp = make_phantom(np.random.default_rng(2), inplane=48)
    write_kits_case(tmp_path / "labels" / "case_00042", None, seg, sp)
    assert (
        main(["synth-ct", "--labels", str(tmp_path / "labels"), "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    )
    img = nib.load(str(tmp_path / "out" / "case_00042" / "imaging.nii.gz"))
    lab = nib.load(str(tmp_path / "out" / "case_00042" / "segmentation.nii.gz"))
    np.testing.assert_allclose(img.affine, lab.affine)
    assert img.shape == lab.shape == seg.shape


def test_synth_ct_reads_flat_label_files_and_nnunet_labels_alike(tmp_path: Path) -> None:
    # KiTS23's label-only download is flat case_XXXXX_segmentation.nii.gz files, and an nnU-Net
    # dataset keeps its labels in labelsTr/<case>.nii.gz: both render as the case folder does,
    # to OUT/<case>/, with the same CT for the same case (seeded by the case's name).
    from training.cli import main

    _, seg, sp = make_phantom(np.random.default_rng(2), inplane=48)
    write_kits_case(tmp_path / "folders" / "case_00042", None, seg, sp)
    src = tmp_path / "folders" / "case_00042" / "segmentation.nii.gz"
    (tmp_path / "flat").mkdir()
    shutil.copy(src, tmp_path / "flat" / "case_00042_segmentation.nii.gz")
    (tmp_path / "nnunet" / "labelsTr").mkdir(parents=True)
    shutil.copy(src, tmp_path / "nnunet" / "labelsTr" / "case_00042.nii.gz")
    images = []
    for layout in ("folders", "flat", "nnunet"):
        out = tmp_path / f"out-{layout}"
        assert main(["synth-ct", "--labels", str(tmp_path / layout), "--out", str(out), "--cases", "40:50"]) == 0
        assert sorted(p.name for p in out.iterdir()) == ["case_00042"]
        images.append(np.asanyarray(nib.load(out / "case_00042" / "imaging.nii.gz").dataobj))
    np.testing.assert_array_equal(images[0], images[1])
    np.testing.assert_array_equal(images[0], images[2])
