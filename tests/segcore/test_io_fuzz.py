"""Property tests over every NIfTI header field the loader reads.

Whatever hypothesis writes into those fields, :func:`load_volume` either returns a volume that
the engine can use (3D, big enough, finite invertible affine, sane spacing, finite intensities,
within the size limits) or raises one of the domain errors the service maps to 413/415/422.
Nothing else: no nibabel exception, no MemoryError, no crash.
"""

from __future__ import annotations

import gzip
import io
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segcore.errors import KitsegError
from segcore.io import MAX_ABS_SPACING_MM, MIN_INPLANE, MIN_SPACING_MM, load_volume

LIMIT_BYTES = 4 << 20
LIMIT_VOXELS = 1 << 20


def _base() -> bytes:
    data = np.arange(24 * 24 * 6, dtype=np.int16).reshape(24, 24, 6) % 400 - 200
    return bytes(nib.Nifti1Image(data, np.diag([0.8, 0.8, 3.0, 1.0]), dtype=np.int16).to_bytes())


BASE = _base()

floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, -1.0, 1.0, 1e-9, 1e9, 0.8, 3.0]),
)
ints16 = st.integers(-(2**15), 2**15 - 1)
FIELDS = {
    "sizeof_hdr": st.sampled_from([348, 540, 0, -348, 1 << 20]),
    "dim": st.lists(st.one_of(ints16, st.sampled_from([0, 1, 6, 24, 32767])), min_size=8, max_size=8),
    "datatype": st.sampled_from(
        [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 9999]
    ),
    "bitpix": st.sampled_from([0, 1, 8, 16, 24, 32, 64, 128, 255]),
    "vox_offset": st.one_of(floats, st.sampled_from([0.0, 100.0, 348.0, 352.0, 356.0, 1e6])),
    "pixdim": st.lists(floats, min_size=8, max_size=8),
    "scl_slope": floats,
    "scl_inter": floats,
    "qform_code": st.integers(-2, 5),
    "sform_code": st.integers(-2, 5),
    "quatern_b": floats,
    "quatern_c": floats,
    "quatern_d": floats,
    "qoffset_x": floats,
    "srow_x": st.lists(floats, min_size=4, max_size=4),
    "srow_y": st.lists(floats, min_size=4, max_size=4),
    "srow_z": st.lists(floats, min_size=4, max_size=4),
    "magic": st.sampled_from([b"n+1", b"ni1", b"n+2", b"", b"xyz"]),
}


def _mutated(fields: dict[str, object]) -> bytes:
    raw = bytearray(BASE)
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw[:352])), check=False)
    for k, v in fields.items():
        hdr[k] = v
    raw[:348] = hdr.binaryblock
    return bytes(raw)


# CI: 300 examples, derandomized so a red build always means a regression. A campaign
# (random, as many as you like): KITSEG_FUZZ_EXAMPLES=5000 pytest tests/segcore/test_io_fuzz.py
@settings(
    max_examples=int(os.environ.get("KITSEG_FUZZ_EXAMPLES", "300")),
    derandomize="KITSEG_FUZZ_EXAMPLES" not in os.environ,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    fields=st.dictionaries(st.sampled_from(sorted(FIELDS)), st.just(None), min_size=1, max_size=5).flatmap(
        lambda keys: st.fixed_dictionaries({k: FIELDS[k] for k in keys})
    ),
    compress=st.booleans(),
    tail=st.sampled_from([b"", b"\0" * 1000, b"junk"]),
)
def test_any_header_either_loads_sanely_or_raises_a_domain_error(
    tmp_path: Path, fields: dict[str, object], compress: bool, tail: bytes
) -> None:
    raw = _mutated(fields) + tail
    p = tmp_path / "fuzz.nii"
    p.write_bytes(gzip.compress(raw, compresslevel=1) if compress else raw)
    try:
        vol = load_volume(p, max_decompressed_bytes=LIMIT_BYTES, max_voxels=LIMIT_VOXELS)
    except KitsegError:
        return
    assert vol.stored.ndim == 3 and sorted(vol.shape)[1] >= MIN_INPLANE
    assert vol.stored.size <= LIMIT_VOXELS and vol.stored.nbytes <= LIMIT_BYTES
    assert np.all(np.isfinite(vol.affine)) and abs(np.linalg.det(vol.affine[:3, :3])) > 1e-9
    assert all(MIN_SPACING_MM <= z <= MAX_ABS_SPACING_MM for z in vol.zooms)
    assert np.isfinite(vol.data).all()
    lo, hi = vol.intensity_range()
    assert np.isfinite(lo) and np.isfinite(hi) and lo <= hi


@pytest.mark.parametrize("compress", [False, True])
def test_the_unmutated_base_loads(tmp_path: Path, compress: bool) -> None:
    # The property above would pass vacuously if the base itself failed to load.
    p = tmp_path / "base.nii"
    p.write_bytes(gzip.compress(BASE) if compress else BASE)
    vol = load_volume(p, max_decompressed_bytes=LIMIT_BYTES, max_voxels=LIMIT_VOXELS)
    assert vol.shape == (24, 24, 6) and vol.data.min() == -200
