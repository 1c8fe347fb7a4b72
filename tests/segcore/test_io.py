import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segcore.errors import CorruptData, InvalidVolume, NotNifti, VolumeTooLarge
from segcore.io import Volume, decompress_to, load_labels, load_volume, save_mask
from tests.conftest import ORIENTATIONS, make_volume, write_nifti


def test_roundtrip_nii_gz_keeps_geometry(tmp_path: Path) -> None:
    hu, aff, truth = make_volume(ORIENTATIONS["IPL"])
    p = write_nifti(tmp_path / "ct.nii.gz", hu, aff)
    vol = load_volume(p)
    assert vol.data.dtype == np.float32 and vol.shape == hu.shape
    np.testing.assert_allclose(vol.affine, aff, atol=1e-5)
    assert vol.axcodes == ("I", "P", "L")
    out = tmp_path / "mask.nii.gz"
    save_mask(truth, vol, out)
    m = nib.load(str(out))
    assert m.get_data_dtype() == np.uint8
    np.testing.assert_allclose(m.affine, vol.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(m.dataobj), truth)
    assert not list(tmp_path.glob(".tmp-*")), "atomic write left a temp file"


def test_gzip_is_detected_by_magic_not_name(tmp_path: Path) -> None:
    hu, aff, _ = make_volume(ORIENTATIONS["RAS"])
    real = write_nifti(tmp_path / "a.nii.gz", hu, aff)
    misnamed = tmp_path / "upload.bin"
    misnamed.write_bytes(real.read_bytes())
    np.testing.assert_array_equal(load_volume(misnamed).data, hu)
    plain = write_nifti(tmp_path / "b.nii", hu, aff)
    misnamed2 = tmp_path / "plain.nii.gz"
    misnamed2.write_bytes(plain.read_bytes())
    np.testing.assert_array_equal(load_volume(misnamed2).data, hu)


def test_nifti2_and_scaling(tmp_path: Path) -> None:
    hu, aff, _ = make_volume(ORIENTATIONS["LPS"])
    raw = (hu + 1024).astype(np.uint16)
    img = nib.Nifti2Image(raw, aff)
    img.header.set_slope_inter(1.0, -1024.0)
    p = tmp_path / "n2.nii"
    nib.save(img, str(p))
    vol = load_volume(p)
    np.testing.assert_allclose(vol.data, hu, atol=1e-3)
    mask_p = tmp_path / "m.nii.gz"
    save_mask((hu > 0).astype(np.uint8), vol, mask_p)
    assert isinstance(nib.load(str(mask_p)), nib.Nifti2Image)


@pytest.mark.parametrize("dtype", ["<i2", ">i2", "<u2", "<i4", "<f4", ">f8", "<i8", "u1"])
@pytest.mark.parametrize("order", ["F", "C", "strided"])
def test_intensity_range_in_one_pass_matches_numpy(dtype: str, order: str) -> None:
    rng = np.random.default_rng(5)
    raw = rng.integers(2, 249, size=(21, 17, 9)).astype(dtype, order="F" if order == "F" else "C")
    if order == "strided":  # neither C- nor F-contiguous
        raw = np.repeat(raw, 2, axis=1)[:, ::2]
    raw[3, 4, 0], raw[20, 16, 8] = 1, 249  # the extremes at either end of the last axis
    vol = Volume(stored=raw, affine=np.eye(4), header=None, zooms=(1.0, 1.0, 1.0), slope=-2.0, inter=10.0)
    assert vol.stored_range == (1.0, 249.0)
    assert vol.intensity_range() == (249.0 * -2.0 + 10.0, 1.0 * -2.0 + 10.0)  # a negative slope swaps them


def test_reader_checks_intensities_once(tmp_path: Path) -> None:
    hu, aff, _ = make_volume(ORIENTATIONS["IPL"])
    vol = load_volume(write_nifti(tmp_path / "ct.nii.gz", hu, aff))
    assert "stored_range" in vars(vol)  # found by the reader's checks, kept for the service's
    assert vol.intensity_range() == (float(hu.min()), float(hu.max()))


def test_uint16_labels_read_as_uint8(tmp_path: Path) -> None:
    _, aff, truth = make_volume(ORIENTATIONS["IPL"])
    p = write_nifti(tmp_path / "seg.nii.gz", truth, aff, dtype=np.uint16)
    lab, _ = load_labels(p)
    assert lab.dtype == np.uint8
    np.testing.assert_array_equal(lab, truth)


def test_trailing_singleton_axes_are_squeezed(tmp_path: Path) -> None:
    hu, aff, _ = make_volume(ORIENTATIONS["RAS"])
    p = write_nifti(tmp_path / "4d.nii.gz", hu[..., None], aff)
    assert load_volume(p).shape == hu.shape


@pytest.mark.parametrize(
    "make, exc",
    [
        (lambda p, hu, aff: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 400), NotNifti),
        (lambda p, hu, aff: p.write_bytes(gzip.compress(b"not nifti" * 100)), NotNifti),
        (
            lambda p, hu, aff: p.write_bytes(
                gzip.compress(write_nifti(p.with_suffix(".x.nii"), hu, aff).read_bytes())[:-200]
            ),
            CorruptData,
        ),
        (lambda p, hu, aff: write_nifti(p, np.zeros((32, 32), np.int16), np.eye(4)), InvalidVolume),
        (lambda p, hu, aff: write_nifti(p, np.zeros((32, 32, 4, 2), np.int16), np.eye(4)), InvalidVolume),
        (lambda p, hu, aff: write_nifti(p, np.zeros((4, 4, 4), np.int16), np.eye(4)), InvalidVolume),
        (
            lambda p, hu, aff: write_nifti(p, np.full((32, 32, 3), np.nan, np.float32), np.eye(4), dtype=np.float32),
            InvalidVolume,
        ),
        (lambda p, hu, aff: write_nifti(p, hu, np.diag([1.0, 1.0, 0.0, 1.0])), InvalidVolume),
    ],
    ids=["png", "gzip-not-nifti", "truncated-gzip", "2d", "4d", "too-small", "nan", "singular-affine"],
)
def test_bad_inputs_raise_domain_errors(tmp_path: Path, make, exc) -> None:
    hu, aff, _ = make_volume(ORIENTATIONS["RAS"])
    p = tmp_path / "bad.nii.gz"
    make(p, hu, aff)
    with pytest.raises(exc):
        load_volume(p)


def test_decompressed_limit_stops_a_gzip_bomb_early(tmp_path: Path) -> None:
    # An honest 32x32x16 header followed by 64 MiB of zeros (~64 KiB compressed): the stream is
    # abandoned once past the limit, so the bomb never decompresses in full.
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((32, 32, 16))
    hdr.set_data_dtype(np.int16)
    hdr.set_data_offset(352)
    p = tmp_path / "bomb.nii.gz"
    with gzip.open(p, "wb", compresslevel=9) as f:
        f.write(bytes(hdr.binaryblock) + bytes(4) + bytes(32 * 32 * 16 * 2))
        for _ in range(64):
            f.write(bytes(1 << 20))
    assert p.stat().st_size < 200_000
    with pytest.raises(VolumeTooLarge):
        load_volume(p, max_decompressed_bytes=4 << 20)
    assert load_volume(p).shape == (32, 32, 16)  # without a limit, trailing data is ignored


def test_declared_voxels_checked_before_allocation(tmp_path: Path) -> None:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((1024, 1024, 1024))
    hdr.set_data_dtype(np.int16)
    hdr.set_data_offset(352)
    p = tmp_path / "liar.nii"
    p.write_bytes(hdr.binaryblock + b"\x00" * 4 + b"\x00" * 1000)
    with pytest.raises(VolumeTooLarge):
        load_volume(p, max_voxels=600 * 512 * 512)
    with pytest.raises(InvalidVolume, match="truncated"):
        load_volume(p)


def _is_mapped(a: np.ndarray) -> bool:
    while a is not None:
        if isinstance(a, np.memmap):
            return True
        a = a.base if isinstance(a, np.ndarray) else None
    return False


@pytest.mark.parametrize("dtype", [np.int16, np.dtype(">i2"), np.float32])
def test_mapped_uncompressed_files_read_the_same_and_writes_stay_private(tmp_path: Path, dtype) -> None:
    hu, aff, _ = make_volume(ORIENTATIONS["LPS"])
    img = nib.Nifti1Image(hu.astype(dtype), aff)
    img.header.set_data_dtype(dtype)
    p = tmp_path / "v.nii"
    nib.save(img, str(p))
    read, mapped = load_volume(p), load_volume(p, mmap=True)
    assert _is_mapped(mapped.stored) and not _is_mapped(read.stored)
    np.testing.assert_array_equal(mapped.stored, read.stored)
    assert mapped.stored.dtype == read.stored.dtype and mapped.stored.strides == read.stored.strides
    before = p.read_bytes()
    mapped.stored[0, 0, 0] += 1  # copy-on-write: the file is never changed through the volume
    assert p.read_bytes() == before
    gz = write_nifti(tmp_path / "v.nii.gz", hu, aff)
    assert not _is_mapped(load_volume(gz, mmap=True).stored)  # gzip is read as always
    short = tmp_path / "short.nii"
    short.write_bytes(before[:-100])
    with pytest.raises(InvalidVolume, match="truncated"):
        load_volume(short, mmap=True)


def test_decompress_to_writes_the_nifti_bytes_that_load_the_same(tmp_path: Path) -> None:
    hu, aff, _ = make_volume(ORIENTATIONS["IPL"])
    gz = write_nifti(tmp_path / "ct.nii.gz", hu, aff)
    decompress_to(gz, tmp_path / "ct.nii")
    assert (tmp_path / "ct.nii").read_bytes() == gzip.decompress(gz.read_bytes())
    a, b = load_volume(gz), load_volume(tmp_path / "ct.nii", mmap=True)
    assert _is_mapped(b.stored)
    np.testing.assert_array_equal(a.stored, b.stored)
    np.testing.assert_array_equal(a.affine, b.affine)
    # A file that isn't gzip is copied as it is.
    decompress_to(tmp_path / "ct.nii", tmp_path / "again.nii")
    assert (tmp_path / "again.nii").read_bytes() == (tmp_path / "ct.nii").read_bytes()
    # A truncated gzip stream is CorruptData, and leaves nothing behind.
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(gz.read_bytes()[:-2000])
    with pytest.raises(CorruptData, match="gzip"):
        decompress_to(cut, tmp_path / "cut.nii")
    assert not (tmp_path / "cut.nii").exists() and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("kind", ["nifti1.nii.gz", "nifti2.nii.gz", "nifti1.nii", "scaled.nii.gz", "4d.nii"])
def test_labels_read_as_nibabel_reads_them(tmp_path: Path, kind: str) -> None:
    # load_labels reads gzip with ISA-L and maps uncompressed files; values and affine must be
    # what nibabel gives, scaling included.
    _, aff, truth = make_volume(ORIENTATIONS["LPS"], oblique_deg=10.0)
    data = truth.astype(np.int16)
    klass = nib.Nifti2Image if kind.startswith("nifti2") else nib.Nifti1Image
    img = klass(data[..., None] if kind.startswith("4d") else data, aff)
    img.set_data_dtype(np.int16)
    if kind.startswith("scaled"):
        img = nib.Nifti1Image((data * 2).astype(np.int16), aff)
        img.set_data_dtype(np.int16)
        img.header.set_slope_inter(0.5, 0.0)
    path = tmp_path / kind
    nib.save(img, str(path))
    got, got_aff = load_labels(path)
    ref = nib.load(str(path))
    assert got.dtype == np.uint8 and got.shape == truth.shape
    np.testing.assert_array_equal(got, np.asanyarray(ref.dataobj).reshape(truth.shape).astype(np.uint8))
    np.testing.assert_array_equal(got, truth)
    np.testing.assert_array_equal(got_aff, ref.affine)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_private_writes_stay_0600_and_a_tools_outputs_get_the_umasks_mode(umask: int, tmp_path: Path) -> None:
    import os
    import stat

    from segcore.io import atomic_write, new_file_mode, save_image

    old = os.umask(umask)
    try:
        assert new_file_mode() == 0o666 & ~umask
        atomic_write(tmp_path / "result.json", b"{}")  # the service's results: private
        atomic_write(tmp_path / "stats.json", b"{}", private=False)
        save_image(np.zeros((4, 4, 4), np.int16), np.eye(4), tmp_path / "imaging.nii.gz")
        hu, aff, _ = make_volume(ORIENTATIONS["RAS"])
        write_nifti(tmp_path / "ct.nii.gz", hu, aff)
        vol = load_volume(tmp_path / "ct.nii.gz")
        save_mask(np.zeros(vol.shape, np.uint8), vol, tmp_path / "private_mask.nii.gz")
        save_mask(np.zeros(vol.shape, np.uint8), vol, tmp_path / "mask.nii.gz", private=False)
    finally:
        os.umask(old)

    def mode(name: str) -> int:
        return stat.S_IMODE((tmp_path / name).stat().st_mode)

    assert mode("result.json") == mode("private_mask.nii.gz") == 0o600
    assert mode("stats.json") == mode("imaging.nii.gz") == mode("mask.nii.gz") == 0o666 & ~umask
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
