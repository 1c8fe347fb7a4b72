"""The README's Python example runs as written, on a KiTS-layout (IPL) volume."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import ORIENTATIONS, make_volume, write_nifti

ROOT = Path(__file__).resolve().parents[1]


def _python_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    (example,) = [b for b in blocks if "Engine.from_checkpoint" in b]
    return example


def test_the_readmes_python_example_runs(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    hu, affine, truth = make_volume(ORIENTATIONS["IPL"])
    case = tmp_path / "case_00001"
    case.mkdir()
    write_nifti(case / "imaging.nii.gz", hu, affine)
    write_nifti(case / "segmentation.nii.gz", truth, affine)
    code = _python_example()
    # Only the checkpoint is the test's own; the case paths are the README's, relative to the cwd.
    code, n = re.subn(r'^checkpoint = "[^"]+"', f'checkpoint = "{tiny_checkpoint}"', code, flags=re.M)
    assert n == 1, "the example no longer starts from `checkpoint = ...`"
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "'kidney_dice'" in out and "'tumor_dice'" in out and "kidney" in out and " mL" in out
    mask = nib.load(tmp_path / "case_00001_mask.nii.gz")
    image = nib.load(case / "imaging.nii.gz")
    assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
    assert nib.aff2axcodes(mask.affine) == ("I", "P", "L")
