"""Whole families of bad input, each sent as a real POST /segment, each checked for its status,
its error body and the after-state: the service still answers, the next valid request succeeds,
and no spooled upload or partial result is left behind.

Valid but unusual inputs (every scalar datatype, big-endian, NIfTI-2, scaling, trailing singleton
axes) must succeed and give the same mask as the plain int16 file with the same intensities.
"""

from __future__ import annotations

import gzip
import io
import os
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.app.conftest import make_settings
from tests.app.test_api import assert_error
from tests.conftest import make_tiny_checkpoint

SHAPE = (24, 24, 6)
AFFINE = np.diag([0.8, 0.8, 3.0, 1.0])


def _hu() -> np.ndarray:
    rng = np.random.default_rng(0)
    hu = rng.normal(0, 120, SHAPE)
    hu[6:18, 6:18, 1:5] += 180  # a bright blob so the model sees some structure
    hu[:2] = -1000  # air, as every CT field of view has
    return np.clip(np.rint(hu), -1024, 3000).astype(np.int16)


def _image(data: np.ndarray, klass: type = nib.Nifti1Image, affine: np.ndarray = AFFINE) -> bytes:
    img = klass(data, affine, dtype=data.dtype)
    img.set_data_dtype(data.dtype)
    return bytes(img.to_bytes())


def _patched(**fields: object) -> bytes:
    """A valid int16 .nii with header fields overwritten (no validation: the point is bad values)."""
    raw = bytearray(_image(_hu()))
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw[:352])), check=False)
    for k, v in fields.items():
        hdr[k] = v
    raw[:348] = hdr.binaryblock
    return bytes(raw)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Path]]:
    tmp = tmp_path_factory.mktemp("bad")
    ckpt = make_tiny_checkpoint(tmp)
    app = create_app(make_settings(tmp, checkpoint=ckpt, max_upload_bytes=4 << 20, max_decompressed_bytes=16 << 20))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c, tmp


def _after_state(c: TestClient, root: Path) -> None:
    """The service is up, holds no spooled upload or partial file, and serves the next request."""
    assert list((root / "results" / "spool").iterdir()) == []
    assert not [p for p in (root / "results" / "results").iterdir() if p.name.startswith(".")]
    assert c.get("/health").status_code == 200
    r = c.post("/segment", files={"file": ("ok.nii", _image(_hu()))})
    assert r.status_code == 200, r.text
    assert list((root / "results" / "spool").iterdir()) == []


def _post(c: TestClient, payload: bytes, name: str = "ct.nii.gz") -> object:
    return c.post("/segment", files={"file": (name, payload)})


# --- container -------------------------------------------------------------------------------


def _gz() -> bytes:
    return gzip.compress(_image(_hu()))


def _corrupt_deflate() -> bytes:
    raw = bytearray(_gz())
    mid = len(raw) // 2
    raw[mid : mid + 16] = bytes(b ^ 0x5A for b in raw[mid : mid + 16])
    return bytes(raw)


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("ct.nii", _image(_hu()))
    return buf.getvalue()


CONTAINER: dict[str, tuple[Callable[[], bytes], int, str]] = {
    "truncated-gzip": (lambda: _gz()[:-300], 422, "corrupt_data"),
    "bad-crc": (lambda: _gz()[:-8] + bytes([_gz()[-8] ^ 0xFF]) + _gz()[-7:], 422, "corrupt_data"),
    "corrupt-deflate": (_corrupt_deflate, 422, "corrupt_data"),
    "gzip-of-text": (lambda: gzip.compress(b"hello " * 1000), 415, "unsupported_media_type"),
    "png": (lambda: b"\x89PNG\r\n\x1a\n" + os.urandom(2000), 415, "unsupported_media_type"),
    "dicom": (lambda: bytes(128) + b"DICM" + os.urandom(2000), 415, "unsupported_media_type"),
    "zip": (_zip, 415, "unsupported_media_type"),
    "random": (lambda: os.urandom(5000), 415, "unsupported_media_type"),
    "tiny": (lambda: b"n+1", 415, "unsupported_media_type"),
    "analyze-pair": (lambda: _patched(magic=b"ni1"), 415, "unsupported_media_type"),
}


@pytest.mark.parametrize("case", list(CONTAINER))
def test_container_errors(env: tuple[TestClient, Path], case: str) -> None:
    c, root = env
    make, status, code = CONTAINER[case]
    assert_error(_post(c, make()), status, code)
    _after_state(c, root)


@pytest.mark.parametrize("name", ["ct.png", "ct", "ct.nii", "ct.nii.gz.exe", "série 1.NII.GZ"])
def test_names_and_extensions_do_not_matter(env: tuple[TestClient, Path], name: str) -> None:
    c, root = env
    for payload in (_gz(), _image(_hu())):
        r = _post(c, payload, name)
        assert r.status_code == 200, r.text
    _after_state(c, root)


# --- header ----------------------------------------------------------------------------------

HEADER: dict[str, tuple[Callable[[], bytes], int, str, str]] = {
    "huge-dims-tiny-file": (lambda: _patched(dim=[3, 2048, 2048, 2048, 1, 1, 1, 1]), 413, "payload_too_large", ""),
    "ndim-0": (lambda: _patched(dim=[0, 24, 24, 6, 1, 1, 1, 1]), 422, "invalid_volume", "dimensions"),
    "ndim-9": (lambda: _patched(dim=[9, 24, 24, 6, 1, 1, 1, 1]), 422, "invalid_volume", "dimensions"),
    "ndim-negative": (lambda: _patched(dim=[-3, 24, 24, 6, 1, 1, 1, 1]), 422, "invalid_volume", "dimensions"),
    "ndim-2": (lambda: _image(_hu()[:, :, 0]), 422, "invalid_volume", "3D"),
    "zero-length-axis": (lambda: _patched(dim=[3, 24, 0, 6, 1, 1, 1, 1]), 422, "invalid_volume", "empty axis"),
    "4d-t2": (lambda: _image(np.stack([_hu(), _hu()], -1)), 422, "invalid_volume", "3D"),
    "too-small": (lambda: _image(_hu()[:8, :8, :]), 422, "invalid_volume", "too small"),
    "rgb": (lambda: _patched(datatype=128, bitpix=24), 422, "invalid_volume", "datatype"),
    "complex": (lambda: _patched(datatype=32, bitpix=64), 422, "invalid_volume", "datatype"),
    "binary": (lambda: _patched(datatype=1, bitpix=1), 422, "invalid_volume", "binary"),
    "unknown-datatype": (lambda: _patched(datatype=9999), 422, "invalid_volume", "datatype"),
    "vox-offset-0": (lambda: _patched(vox_offset=0), 422, "invalid_volume", "vox_offset"),
    "vox-offset-inside-header": (lambda: _patched(vox_offset=100), 422, "invalid_volume", "vox_offset"),
    "vox-offset-past-end": (lambda: _patched(vox_offset=1_000_000), 422, "invalid_volume", "vox_offset"),
    # Found by tests/segcore/test_io_fuzz.py: nibabel's int(vox_offset) raised OverflowError (a 500).
    "vox-offset-inf": (lambda: _patched(vox_offset=np.inf), 422, "invalid_volume", "vox_offset"),
    "vox-offset-nan": (lambda: _patched(vox_offset=np.nan), 422, "invalid_volume", "vox_offset"),
    "quaternion-not-unit": (
        lambda: _patched(qform_code=1, sform_code=0, quatern_b=0.9, quatern_c=0.9, quatern_d=0.9),
        422,
        "invalid_volume",
        "orientation",
    ),
    "quaternion-nan": (lambda: _patched(qform_code=1, sform_code=0, quatern_b=np.nan), 422, "invalid_volume", "NaN"),
    "affine-singular": (lambda: _patched(sform_code=1, srow_x=[0, 0, 0, 0]), 422, "invalid_volume", "singular"),
    "affine-degenerate": (
        lambda: _patched(sform_code=1, srow_x=[0.8, 0, 0, 0], srow_y=[0.8, 0, 0, 0]),
        422,
        "invalid_volume",
        "singular",
    ),
    "affine-nan": (lambda: _patched(sform_code=1, srow_x=[np.nan, 0, 0, 0]), 422, "invalid_volume", "NaN"),
    "pixdim-zero": (lambda: _patched(pixdim=[1, 0, 0.8, 3, 1, 1, 1, 1]), 422, "invalid_volume", "pixdim"),
    "pixdim-negative": (lambda: _patched(pixdim=[1, -0.8, 0.8, 3, 1, 1, 1, 1]), 422, "invalid_volume", "pixdim"),
    "spacing-absurd": (
        lambda: _patched(sform_code=1, srow_x=[1000, 0, 0, 0], pixdim=[1, 1000, 0.8, 3, 1, 1, 1, 1]),
        422,
        "invalid_volume",
        "spacing",
    ),
    "spacing-tiny": (
        lambda: _patched(sform_code=1, srow_x=[0.001, 0, 0, 0], pixdim=[1, 0.001, 0.8, 3, 1, 1, 1, 1]),
        422,
        "invalid_volume",
        "spacing",
    ),
    "sizeof-hdr": (lambda: _patched(sizeof_hdr=1000), 415, "unsupported_media_type", ""),
    "magic": (lambda: _patched(magic=b"abc"), 415, "unsupported_media_type", ""),
}


@pytest.mark.parametrize("case", list(HEADER))
def test_header_errors(env: tuple[TestClient, Path], case: str) -> None:
    c, root = env
    make, status, code, words = HEADER[case]
    for payload in (make(), gzip.compress(make())):
        body = assert_error(_post(c, payload), status, code)
        assert words in body["message"], body
    _after_state(c, root)


def test_qform_sform_disagreement_is_a_warning_and_the_mask_keeps_both(env: tuple[TestClient, Path]) -> None:
    c, root = env
    r = _post(c, _patched(qform_code=1, sform_code=1, srow_x=[0.8, 0, 0, 50]))
    assert r.status_code == 200, r.text
    assert any("sform and qform disagree" in w for w in r.json()["warnings"])
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(c.get(r.json()["mask_url"]).content))
    assert int(mask.header["sform_code"]) == 1 and int(mask.header["qform_code"]) == 1
    assert mask.header.get_sform()[0, 3] == 50  # the sform as sent, not replaced by the qform
    _after_state(c, root)


# --- voxels ----------------------------------------------------------------------------------


def _float_with(value: float) -> bytes:
    hu = _hu().astype(np.float32)
    hu[3, 4, 2] = value
    return _image(hu)


VOXELS: dict[str, tuple[Callable[[], bytes], str]] = {
    "nan": (lambda: _float_with(np.nan), "NaN"),
    "inf": (lambda: _float_with(np.inf), "NaN or Inf"),
    "minus-inf": (lambda: _float_with(-np.inf), "NaN or Inf"),
    "slope-overflows": (lambda: _patched(scl_slope=1e38), "out of float32"),
    "intercept-inf": (lambda: _patched(scl_slope=1.0, scl_inter=np.inf), "scaling"),
}


@pytest.mark.parametrize("case", list(VOXELS))
def test_voxel_errors(env: tuple[TestClient, Path], case: str) -> None:
    c, root = env
    make, words = VOXELS[case]
    body = assert_error(_post(c, make()), 422, "invalid_volume")
    assert words in body["message"], body
    _after_state(c, root)


@pytest.mark.parametrize(
    "data",
    [
        np.random.default_rng(1).random(SHAPE).astype(np.float32),  # MRI-like, normalised to [0, 1]
        (np.random.default_rng(2).random(SHAPE) * 255).astype(np.uint8),  # an 8-bit screenshot
        np.full(SHAPE, 40, np.int16),  # constant
    ],
    ids=["unit-range", "8-bit", "constant"],
)
def test_non_ct_intensities_are_segmented_with_a_warning(env: tuple[TestClient, Path], data: np.ndarray) -> None:
    c, _ = env
    r = _post(c, _image(data))
    assert r.status_code == 200, r.text
    assert any("does not look like CT" in w for w in r.json()["warnings"]), r.json()["warnings"]
    r = _post(c, _image(_hu()))
    assert not any("CT" in w for w in r.json()["warnings"])


# --- valid but unusual -----------------------------------------------------------------------


def _mask_of(c: TestClient, payload: bytes) -> np.ndarray:
    r = _post(c, payload)
    assert r.status_code == 200, r.text
    raw = gzip.decompress(c.get(r.json()["mask_url"]).content)
    assert _is_nifti2(raw) == _is_nifti2(payload)  # the mask keeps the input's format
    mask = (nib.Nifti2Image if _is_nifti2(raw) else nib.Nifti1Image).from_bytes(raw)
    return np.asanyarray(mask.dataobj)


def _is_nifti2(raw: bytes) -> bool:
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return int(np.frombuffer(raw[:4], "<i4")[0]) == 540


def _scaled(stored_dtype: str, slope: float, inter: float) -> bytes:
    stored = ((_hu().astype(np.float64) - inter) / slope).astype(stored_dtype)
    img = nib.Nifti1Image(stored, AFFINE, dtype=stored_dtype)
    img.set_data_dtype(stored_dtype)
    img.header.set_slope_inter(slope, inter)
    return bytes(img.to_bytes())


def _big_endian() -> bytes:
    img = nib.Nifti1Image(_hu().astype(">i2"), AFFINE, header=nib.Nifti1Header(endianness=">"))
    return bytes(img.to_bytes())


UNUSUAL: dict[str, Callable[[], bytes]] = {
    **{dt: (lambda dt=dt: _image(_hu().astype(dt))) for dt in ["int32", "int64", "float32", "float64"]},
    "uint16-inter-1024": lambda: _scaled("uint16", 1.0, -1024.0),
    "uint32-inter-1024": lambda: _scaled("uint32", 1.0, -1024.0),
    "uint64-inter-1024": lambda: _scaled("uint64", 1.0, -1024.0),
    "int8-slope-16": lambda: _scaled("int8", 16.0, 0.0),
    "uint8-slope-16": lambda: _scaled("uint8", 16.0, -1024.0),
    "big-endian": _big_endian,
    "nifti2": lambda: _image(_hu(), nib.Nifti2Image),
    "4d-trailing-singleton": lambda: _image(_hu()[..., None]),
    "5d-trailing-singletons": lambda: _image(_hu()[..., None, None]),
}


@pytest.mark.parametrize("case", list(UNUSUAL))
def test_valid_unusual_inputs_give_the_same_mask(env: tuple[TestClient, Path], case: str) -> None:
    c, root = env
    reference = _mask_of(c, _image(_hu()))
    payload = UNUSUAL[case]()
    got = _mask_of(c, gzip.compress(payload))
    if case.startswith(("int8", "uint8")):
        # 8-bit storage quantises HU to steps of 16: same grid and labels, not the same voxels.
        assert got.shape == reference.shape and set(np.unique(got)) <= {0, 1, 2}
    else:
        np.testing.assert_array_equal(got, reference)
    _after_state(c, root)
