"""Reads every real KiTS19 label map in ../shared/data/kits19-labels (optional: a fresh clone
has no ../shared, and then these tests are skipped with that reason)."""

import nibabel as nib
import numpy as np
import pytest

from segcore.io import load_labels
from tests.conftest import KITS19_LABELS_DIR, KITS23_LABELS_DIR
from training.datasets import find_cases

pytestmark = [
    pytest.mark.kits_labels,
    pytest.mark.skipif(not KITS19_LABELS_DIR.is_dir(), reason=f"{KITS19_LABELS_DIR} not present (fresh clone)"),
]


def test_every_kits19_label_file_has_kits_geometry() -> None:
    cases = find_cases(KITS19_LABELS_DIR, need_image=False)
    assert len(cases) == 180
    problems = []
    for c in cases:
        assert c.label is not None
        img = nib.load(str(c.label))
        lab, aff = load_labels(c.label)
        _, h, w = lab.shape
        codes = nib.orientations.aff2axcodes(aff)
        st, pw = img.header.get_zooms()[0], img.header.get_zooms()[1]
        counts = np.bincount(lab.ravel(), minlength=256)  # much faster than np.unique on ~1e8 voxels
        ok = (
            lab.dtype == np.uint8
            and codes == ("I", "P", "L")
            and h == 512
            and w in (512, 796)
            and 0.4 < pw < 1.1
            and 0.4 < st <= 5.0
            and counts[3:].sum() == 0
            and counts[1] > 0
        )
        if not ok:
            problems.append((c.case_id, lab.shape, codes, lab.dtype, float(st), float(pw)))
    assert not problems, problems
    case160 = load_labels(KITS19_LABELS_DIR / "case_00160" / "segmentation.nii.gz")[0]
    assert case160.shape[1:] == (512, 796)


def test_kits23_cyst_labels() -> None:
    labs = [load_labels(p)[0] for p in sorted(KITS23_LABELS_DIR.glob("case_*_segmentation.nii.gz"))]
    assert len(labs) == 2
    assert any((lab == 3).any() for lab in labs)
    assert all(set(np.unique(lab)) <= {0, 1, 2, 3} for lab in labs)
