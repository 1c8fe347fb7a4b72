"""NIfTI-1/NIfTI-2 reading and mask writing.

Images are read with ``get_fdata(dtype=float32)`` (scl_slope/scl_inter applied), label maps through
``np.asanyarray(img.dataobj)`` cast to uint8 (some KiTS19 labels are stored as uint16). Masks are
written with the input's affine and header so they overlay the input in ITK-SNAP or 3D Slicer.

Arrays keep nibabel's voxel-index order ``(i, j, k)``; for a KiTS19 case that is ``(slices, H, W)``.
"""

from __future__ import annotations

import io
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
import numpy.typing as npt
from isal import igzip, isal_zlib

from segcore.errors import CorruptData, InvalidVolume, NotNifti, VolumeTooLarge

GZIP_MAGIC = b"\x1f\x8b"
_ISAL_ERROR = cast(type[BaseException], isal_zlib.error)  # its stub declares an instance
_GZIP_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error, _ISAL_ERROR)
_CHUNK = 1 << 20
# Smallest in-plane size the U-Net is meant for; anything smaller is a thumbnail, not a CT.
MIN_INPLANE = 16
MAX_ABS_SPACING_MM = 50.0
MIN_SPACING_MM = 0.01


@dataclass
class Volume:
    """A scalar 3D image.

    Attributes:
        data: ``(i, j, k)`` float32 intensities (HU for CT), scaling applied.
        affine: ``(4, 4)`` voxel-to-world (RAS+ mm) matrix.
        header: the source header, kept so masks can be written with it.
        zooms: voxel size in mm along ``i, j, k``.
    """

    data: npt.NDArray[np.float32]
    affine: npt.NDArray[np.float64]
    header: Any
    zooms: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        s = self.data.shape
        return (int(s[0]), int(s[1]), int(s[2]))

    @property
    def axcodes(self) -> tuple[str, str, str]:
        codes = nib.orientations.aff2axcodes(self.affine)
        return (str(codes[0]), str(codes[1]), str(codes[2]))


def read_decompressed(path: str | os.PathLike[str], max_bytes: int | None = None) -> bytes:
    """Return the file's bytes, gunzipped if they start with the gzip magic (the name is ignored).

    The gzip stream is read in chunks and abandoned as soon as it exceeds ``max_bytes``, so a gzip
    bomb never allocates its full size. The CRC is verified at the end of the stream.
    """
    with open(path, "rb") as f:
        head = f.read(2)
    if head != GZIP_MAGIC:
        size = os.path.getsize(path)
        if max_bytes is not None and size > max_bytes:
            raise VolumeTooLarge(f"uncompressed file is {size} bytes, over the limit of {max_bytes}")
        return Path(path).read_bytes()
    out = bytearray()
    try:
        with igzip.open(path, "rb") as g:
            while True:
                chunk = g.read(_CHUNK)
                if not chunk:
                    break
                out += chunk
                if max_bytes is not None and len(out) > max_bytes:
                    raise VolumeTooLarge(f"decompressed data exceeds the limit of {max_bytes} bytes")
    except _GZIP_ERRORS as e:
        raise CorruptData(f"corrupt or truncated gzip stream: {e}") from e
    return bytes(out)


def _header_from_bytes(raw: bytes) -> nib.Nifti1Header:
    if len(raw) < 348:
        raise NotNifti(f"file is {len(raw)} bytes, shorter than a NIfTI header")
    for klass in (nib.Nifti1Header, nib.Nifti2Header):
        try:
            hdr = klass.from_fileobj(io.BytesIO(raw), check=False)
        except Exception:
            continue
        if hdr.get("magic").item() in (b"n+1", b"n+2", b"ni1", b"ni2"):
            if hdr.get("magic").item() in (b"ni1", b"ni2"):
                raise NotNifti("two-file NIfTI (.hdr/.img) is not supported; send a single .nii file")
            return hdr
    raise NotNifti("not a NIfTI-1 or NIfTI-2 file (no n+1/n+2 magic)")


def _image_from_bytes(raw: bytes, max_voxels: int | None) -> nib.Nifti1Image:
    hdr = _header_from_bytes(raw)
    dims = hdr.get_data_shape()
    if len(dims) == 0:
        raise InvalidVolume("header declares no dimensions")
    if any(int(d) <= 0 for d in dims):
        raise InvalidVolume(f"header declares an empty axis: shape {tuple(int(d) for d in dims)}")
    n = int(np.prod([int(d) for d in dims], dtype=np.float64))
    if max_voxels is not None and n > max_voxels:
        raise VolumeTooLarge(f"header declares {n} voxels, over the limit of {max_voxels}")
    try:
        itemsize = np.dtype(hdr.get_data_dtype()).itemsize
    except Exception as e:
        raise InvalidVolume(f"unsupported NIfTI datatype code {int(hdr['datatype'])}") from e
    offset = int(hdr.get_data_offset())
    if offset < hdr.sizeof_hdr or offset + n * itemsize > len(raw):
        raise InvalidVolume(
            f"file holds {len(raw)} bytes but the header needs {offset + n * itemsize} "
            f"(vox_offset {offset} + {n} voxels x {itemsize} bytes): truncated or bad vox_offset"
        )
    klass = nib.Nifti2Image if isinstance(hdr, nib.Nifti2Header) else nib.Nifti1Image
    try:
        return klass.from_bytes(raw)
    except Exception as e:
        raise InvalidVolume(f"nibabel could not parse the header: {e}") from e


def _squeeze_to_3d(shape: tuple[int, ...]) -> tuple[int, int, int]:
    dims = list(shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) != 3:
        raise InvalidVolume(f"expected a 3D volume (trailing singleton axes allowed), got shape {tuple(shape)}")
    return (dims[0], dims[1], dims[2])


def _check_geometry(affine: npt.NDArray[np.float64], zooms: tuple[float, ...]) -> None:
    if not np.all(np.isfinite(affine)):
        raise InvalidVolume("affine contains NaN or Inf")
    det = float(np.linalg.det(affine[:3, :3]))
    if not np.isfinite(det) or abs(det) < 1e-9:
        raise InvalidVolume("affine is singular (zero or degenerate voxel axes)")
    for z in zooms[:3]:
        if not (MIN_SPACING_MM <= float(z) <= MAX_ABS_SPACING_MM):
            raise InvalidVolume(
                f"voxel spacing {tuple(round(float(v), 4) for v in zooms[:3])} mm is outside "
                f"[{MIN_SPACING_MM}, {MAX_ABS_SPACING_MM}] mm"
            )


def load_volume(
    path: str | os.PathLike[str],
    *,
    max_decompressed_bytes: int | None = None,
    max_voxels: int | None = None,
    min_inplane: int = MIN_INPLANE,
) -> Volume:
    """Read a ``.nii`` or ``.nii.gz`` CT image (gzip detected from its magic bytes).

    Raises:
        NotNifti: the bytes are not NIfTI, or the gzip stream is corrupt.
        VolumeTooLarge: over ``max_decompressed_bytes`` or ``max_voxels`` (checked before the
            voxel data is allocated).
        InvalidVolume: anything that makes the image unsegmentable.
    """
    raw = read_decompressed(path, max_decompressed_bytes)
    img = _image_from_bytes(raw, max_voxels)
    shape3 = _squeeze_to_3d(img.shape)
    if sorted(shape3)[1] < min_inplane:
        raise InvalidVolume(f"volume {shape3} is too small to segment (needs two axes >= {min_inplane})")
    hdr = img.header
    dtype = hdr.get_data_dtype()
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise InvalidVolume(f"unsupported voxel datatype {dtype}; expected a real scalar type")
    affine = np.asarray(img.affine, dtype=np.float64)
    zooms = tuple(float(z) for z in hdr.get_zooms()[:3])
    _check_geometry(affine, zooms)
    try:
        data = img.get_fdata(dtype=np.float32)
    except Exception as e:
        raise InvalidVolume(f"could not read voxel data: {e}") from e
    data = data.reshape(shape3, order="A")
    if not np.isfinite(data).all():
        raise InvalidVolume("volume contains NaN or Inf voxels (after scl_slope/scl_inter scaling)")
    return Volume(data=data, affine=affine, header=hdr, zooms=(zooms[0], zooms[1], zooms[2]))


def load_labels(path: str | os.PathLike[str]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float64]]:
    """Read a label map as uint8 plus its affine; values must fit in 0..255."""
    img = nib.load(str(path))
    arr = np.asanyarray(img.dataobj)
    arr = arr.reshape(_squeeze_to_3d(arr.shape), order="A")
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise InvalidVolume(f"label map {path} has values outside 0..255")
        arr = arr.astype(np.uint8)
    return arr, np.asarray(img.affine, dtype=np.float64)


def mask_image(mask: npt.NDArray[np.uint8], like: Volume) -> nib.Nifti1Image:
    """Wrap a uint8 mask on ``like``'s voxel grid, with ``like``'s affine and header."""
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {mask.shape} does not match the volume {like.shape}")
    klass = nib.Nifti2Image if isinstance(like.header, nib.Nifti2Header) else nib.Nifti1Image
    hdr = like.header.copy()
    img = klass(np.asfortranarray(mask, dtype=np.uint8), like.affine, header=hdr)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"] = 0
    img.header["cal_max"] = float(mask.max()) if mask.size else 0.0
    img.header["descrip"] = b"kitseg mask"
    return img


def encode_mask(mask: npt.NDArray[np.uint8], like: Volume, compresslevel: int = 1) -> bytes:
    """The mask as ``.nii.gz`` bytes; level 1 because masks compress well and speed matters."""
    return bytes(igzip.compress(mask_image(mask, like).to_bytes(), compresslevel=compresslevel))


def atomic_write(path: str | os.PathLike[str], payload: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: never a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_mask(mask: npt.NDArray[np.uint8], like: Volume, path: str | os.PathLike[str], compresslevel: int = 1) -> None:
    """Write ``mask`` as ``.nii.gz`` with ``like``'s affine and header (atomically)."""
    atomic_write(path, encode_mask(mask, like, compresslevel))


def save_image(
    data: npt.NDArray[Any], affine: npt.NDArray[np.float64], path: str | os.PathLike[str], compresslevel: int = 1
) -> None:
    """Write an array as NIfTI-1 (gzip when the path ends in .gz), keeping its dtype."""
    img = nib.Nifti1Image(np.asfortranarray(data), affine)
    img.set_data_dtype(data.dtype)
    raw = img.to_bytes()
    payload = bytes(igzip.compress(raw, compresslevel=compresslevel)) if str(path).endswith(".gz") else raw
    atomic_write(path, payload)
