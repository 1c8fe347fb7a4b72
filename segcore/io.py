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
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO, cast

import nibabel as nib
import numpy as np
import numpy.typing as npt
import torch
from isal import igzip, isal_zlib
from nibabel.affines import voxel_sizes
from nibabel.volumeutils import apply_read_scaling

from segcore.errors import CorruptData, InvalidVolume, NotNifti, VolumeTooLarge

GZIP_MAGIC = b"\x1f\x8b"
_ISAL_ERROR = cast(type[BaseException], isal_zlib.error)  # its stub declares an instance
_GZIP_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error, _ISAL_ERROR)
_CHUNK = 1 << 20
_HEAD = 544  # a NIfTI-2 header (540) and the extension flag; NIfTI-1 needs 352
HEAD_BYTES = _HEAD
#: the lowest intensity a CT in HU has (its air), and the least its highest reaches (Volume.ct_warnings)
CT_AIR_HU = (-3100.0, -500.0)
CT_MIN_MAX_HU = 100.0
# Smallest in-plane size the U-Net is meant for; anything smaller is a thumbnail, not a CT.
MIN_INPLANE = 16
MAX_ABS_SPACING_MM = 50.0
MIN_SPACING_MM = 0.01


@dataclass
class Volume:
    """A scalar 3D image, kept in the dtype it was stored in.

    Intensities are ``stored * slope + inter`` (NIfTI ``scl_slope``/``scl_inter``). Keeping the
    stored array (for an upload: a zero-copy view of the decompressed bytes) instead of a float32
    copy is what keeps the service at a few bytes per voxel; the engine converts batch by batch
    with :meth:`to_hu`. :attr:`data` gives the whole float32 image for code that wants it.

    Attributes:
        stored: ``(i, j, k)`` voxel values as stored (any real dtype, either byte order).
        affine: ``(4, 4)`` voxel-to-world (RAS+ mm) matrix.
        header: the source header (extensions dropped), kept so masks can be written with it.
        zooms: voxel size in mm along ``i, j, k``.
        slope, inter: the intensity scaling.
        warnings: things a user should know that did not stop the read.
    """

    stored: npt.NDArray[Any]
    affine: npt.NDArray[np.float64]
    header: Any
    zooms: tuple[float, float, float]
    slope: float = 1.0
    inter: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        s = self.stored.shape
        return (int(s[0]), int(s[1]), int(s[2]))

    @property
    def voxel_ml(self) -> float:
        """One voxel's volume in millilitres, from the affine (right for oblique and sheared grids too)."""
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    @property
    def axcodes(self) -> tuple[str, str, str]:
        codes = nib.orientations.aff2axcodes(self.affine)
        return (str(codes[0]), str(codes[1]), str(codes[2]))

    def to_hu(self, values: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        """Stored values (any part of :attr:`stored`) as float32 intensities, a new array."""
        out = np.array(values, dtype=np.float32, order="C")
        if self.slope != 1.0:
            out *= np.float32(self.slope)
        if self.inter != 0.0:
            out += np.float32(self.inter)
        return out

    @cached_property
    def data(self) -> npt.NDArray[np.float32]:
        """The whole image as float32 intensities (computed once; 4 bytes per voxel)."""
        return self.to_hu(self.stored)

    @cached_property
    def stored_range(self) -> tuple[float, float]:
        """``(min, max)`` of :attr:`stored`, found once (the reader's checks and the service's
        CT check both need it) in one pass without a float copy."""
        return _min_max(self.stored)

    def intensity_range(self) -> tuple[float, float]:
        """``(min, max)`` intensity without a float copy of the volume."""
        lo, hi = self.stored_range
        a, b = lo * self.slope + self.inter, hi * self.slope + self.inter
        return (min(a, b), max(a, b))

    def ct_warnings(self) -> list[str]:
        """:attr:`warnings`, plus one when the intensities don't look like CT in HU (README
        "Limits": such a volume is segmented anyway, and the warning goes with the result).

        A CT in HU always has air in its field of view (about -1000 HU; scanners pad outside the
        reconstruction circle with down to -3024) and soft tissue above 0 HU. Images without both
        are MR, PET, label maps, normalised or unscaled data, on which the model's output is
        meaningless.
        """
        lo, hi = self.intensity_range()
        out = list(self.warnings)
        if not (CT_AIR_HU[0] <= lo <= CT_AIR_HU[1]) or hi < CT_MIN_MAX_HU:
            out.append(
                f"intensities span [{lo:.0f}, {hi:.0f}], which does not look like CT in HU (no air near "
                "-1000 HU, or no soft tissue above 0 HU); results on non-CT or unscaled data are meaningless"
            )
        return out


#: dtypes that torch reads straight from numpy memory (in native byte order only): it finds their
#: range here, and converts, resamples and reduces them in preprocessing, with vectorised,
#: multi-threaded loops; numpy handles the rest (byte-swapped, uint16, ...).
TORCH_DTYPES = tuple(np.dtype(d) for d in (np.int8, np.uint8, np.int16, np.int32, np.int64, np.float32, np.float64))


def _min_max(a: npt.NDArray[Any]) -> tuple[float, float]:
    if a.size and a.dtype.isnative and a.dtype in TORCH_DTYPES and (a.flags.c_contiguous or a.flags.f_contiguous):
        # Flat: torch reduces a Fortran-ordered 3D view 100x slower than the same memory as 1D.
        # Numpy would need two passes, each on one core.
        lo, hi = torch.aminmax(torch.from_numpy(a.reshape(-1, order="A")))
        return float(lo), float(hi)
    return float(a.min()), float(a.max())


def _open_stream(path: str | os.PathLike[str]) -> tuple[BinaryIO, bool]:
    """The file's content stream, gunzipping when it starts with the gzip magic; closing it closes the file."""
    gz = _is_gzip(path)
    return (cast(BinaryIO, igzip.open(path, "rb")) if gz else open(path, "rb")), gz


def _read_exact(stream: BinaryIO, view: memoryview) -> int:
    """Fill ``view`` from ``stream``; returns how many bytes were read (short only at EOF)."""
    got = 0
    while got < len(view):
        n = stream.readinto(view[got : got + _CHUNK])  # type: ignore[attr-defined]
        if not n:
            break
        got += n
    return got


def _is_gzip(path: str | os.PathLike[str]) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def _parse_header(block: bytes) -> nib.Nifti1Header:
    """The NIfTI-1 or NIfTI-2 header struct at the start of ``block`` (extensions are not read)."""
    if len(block) < 348:
        raise NotNifti(f"file is {len(block)} bytes, shorter than a NIfTI header")
    for klass in (nib.Nifti1Header, nib.Nifti2Header):
        size = klass.template_dtype.itemsize
        if len(block) < size:
            continue
        # The byte order comes from sizeof_hdr (348 or 540 either way round), not from nibabel's
        # guess from dim[0], which a bad dim[0] would fool.
        for endian in ("<", ">"):
            if int(np.frombuffer(block[:4], dtype=f"{endian}i4")[0]) == size:
                break
        else:
            continue
        try:
            hdr = klass(binaryblock=block[:size], endianness=endian, check=False)
            magic = hdr.get("magic").item()
        except Exception:
            continue
        if magic in (b"ni1", b"ni2"):
            raise NotNifti("two-file NIfTI (.hdr/.img) is not supported; send a single .nii file")
        if magic in (b"n+1", b"n+2"):
            return hdr
    raise NotNifti("not a NIfTI-1 or NIfTI-2 file (no sizeof_hdr 348/540 with n+1/n+2 magic)")


def declared_file_bytes(head: bytes) -> int:
    """The bytes a single-file NIfTI whose first :data:`HEAD_BYTES` bytes are ``head`` declares
    (header, extensions and voxels: ``vox_offset`` + voxels x item size).

    For bounding a stream before the whole file is read; :func:`load_volume` does the full checks.
    Raises:
        NotNifti: no NIfTI-1/2 header.
        InvalidVolume: the header's shape, datatype or offset make no sense.
    """
    hdr = _parse_header(head)
    try:
        dims = [int(d) for d in hdr.get_data_shape()]
        itemsize = np.dtype(hdr.get_data_dtype()).itemsize
        offset = float(hdr["vox_offset"])
    except Exception as e:
        raise InvalidVolume(f"unreadable NIfTI header: {e}") from e
    if not dims or any(d <= 0 for d in dims) or not np.isfinite(offset) or offset < 0:
        raise InvalidVolume("the header declares no image")
    return int(offset) + int(np.prod(dims, dtype=np.float64)) * int(itemsize)


def _read_image(
    path: str | os.PathLike[str], max_bytes: int | None, max_voxels: int | None, mmap: bool = False
) -> tuple[nib.Nifti1Header, npt.NDArray[Any]]:
    """Header and voxel array of a single-file NIfTI, gzip or not.

    The header is parsed and checked first; only then is one buffer of exactly the declared
    size allocated and filled (no growing buffer, no second copy). An uncompressed file must be
    at least that long before anything is allocated. The array is a view of it.
    Whatever follows the voxel data is read and discarded, up to ``max_bytes`` in all, so the
    gzip CRC is still verified and a bomb hidden after an honest header is still stopped.
    ``mmap``: an uncompressed file's voxels are mapped (copy-on-write) instead of read; the file
    must then not change while the array lives.
    """
    stream, gz = _open_stream(path)
    size = os.path.getsize(path)
    try:
        with stream:
            if max_bytes is not None and not gz and size > max_bytes:
                raise VolumeTooLarge(f"uncompressed file is {size} bytes, over the limit of {max_bytes}")
            head = stream.read(_HEAD)
            hdr = _parse_header(head)
            ndim = int(hdr["dim"][0])
            if not 1 <= ndim <= 7:
                raise InvalidVolume(f"dim[0] = {ndim} is not a valid number of dimensions (1 to 7)")
            if int(hdr["datatype"]) == 1:
                raise InvalidVolume("the 1-bit binary datatype (code 1) is not supported; send a real scalar type")
            dims = [int(d) for d in hdr.get_data_shape()]
            if len(dims) == 0:
                raise InvalidVolume("header declares no dimensions")
            if any(d <= 0 for d in dims):
                raise InvalidVolume(f"header declares an empty axis: shape {tuple(dims)}")
            n = int(np.prod(dims, dtype=np.float64))
            if max_voxels is not None and n > max_voxels:
                raise VolumeTooLarge(f"header declares {n} voxels, over the limit of {max_voxels}")
            try:
                dtype = np.dtype(hdr.get_data_dtype())
            except Exception as e:
                raise InvalidVolume(f"unsupported NIfTI datatype code {int(hdr['datatype'])}") from e
            if dtype.fields is not None or dtype.kind not in "biuf":
                raise InvalidVolume(f"unsupported voxel datatype {dtype}; expected a real scalar type")
            raw_offset = float(hdr["vox_offset"])
            if not np.isfinite(raw_offset) or raw_offset > np.iinfo(np.int64).max:
                raise InvalidVolume(f"bad vox_offset {raw_offset}: not a finite byte offset")
            offset = int(raw_offset)
            if offset < hdr.sizeof_hdr:
                raise InvalidVolume(f"bad vox_offset {offset}: it points inside the {hdr.sizeof_hdr}-byte header")
            need = offset + n * dtype.itemsize
            if max_bytes is not None and need > max_bytes:
                raise VolumeTooLarge(f"header declares {need} bytes of image, over the limit of {max_bytes}")
            if not gz and need > size:
                raise _truncated(size, need, offset, n, dtype.itemsize)
            if mmap and not gz:
                # Already checked: the file holds all of it, and its size is within max_bytes.
                mapped = np.memmap(path, dtype=np.uint8, mode="c", shape=(need,))
                return hdr, np.ndarray(tuple(dims), dtype=dtype, buffer=mapped, offset=offset, order="F")
            # np.empty, not bytearray: pages become resident only as data arrives, so a gzip whose
            # header declares more than its stream holds costs no memory beyond what it sends.
            buf = np.empty(need, dtype=np.uint8)
            view = memoryview(buf.data)
            k = min(len(head), need)
            view[:k] = head[:k]
            got = k + _read_exact(stream, view[k:])
            if got < need:
                raise _truncated(got, need, offset, n, dtype.itemsize)
            total = max(len(head), need)
            while chunk := stream.read(_CHUNK):
                total += len(chunk)
                if max_bytes is not None and total > max_bytes:
                    raise VolumeTooLarge(f"decompressed data exceeds the limit of {max_bytes} bytes")
    except _GZIP_ERRORS as e:
        raise CorruptData(f"corrupt or truncated gzip stream: {e}") from e
    arr = np.ndarray(tuple(dims), dtype=dtype, buffer=buf, offset=offset, order="F")
    return hdr, arr


def _truncated(have: int, need: int, offset: int, n: int, itemsize: int) -> InvalidVolume:
    return InvalidVolume(
        f"file holds {have} bytes but the header needs {need} "
        f"(vox_offset {offset} + {n} voxels x {itemsize} bytes): truncated or bad vox_offset"
    )


def _squeeze_to_3d(shape: tuple[int, ...]) -> tuple[int, int, int]:
    dims = list(shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) != 3:
        raise InvalidVolume(f"expected a 3D volume (trailing singleton axes allowed), got shape {tuple(shape)}")
    return (dims[0], dims[1], dims[2])


def _affine(hdr: nib.Nifti1Header) -> tuple[npt.NDArray[np.float64], list[str]]:
    """The affine nibabel (and ITK-SNAP, Slicer) use: sform if set, else qform, else pixdim only."""
    warnings: list[str] = []
    pixdim = np.asarray(hdr["pixdim"][1:4], dtype=np.float64)
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0):
        raise InvalidVolume(f"pixdim {pixdim.tolist()} must be finite and positive for the three spatial axes")
    try:
        affine = np.asarray(hdr.get_best_affine(), dtype=np.float64)
        qform = np.asarray(hdr.get_qform(), dtype=np.float64) if int(hdr["qform_code"]) > 0 else None
    except Exception as e:  # nibabel raises for quaternions that are not unit length, etc.
        raise InvalidVolume(f"invalid orientation in the header: {e}") from e
    if (
        int(hdr["sform_code"]) > 0
        and qform is not None
        and not (
            np.allclose(affine[:3, :3], qform[:3, :3], atol=1e-3 * float(pixdim.max()))
            and np.allclose(affine[:3, 3], qform[:3, 3], atol=0.5)
        )
    ):
        warnings.append(
            "the header's sform and qform disagree; the sform was used (as nibabel, ITK-SNAP and 3D Slicer "
            "do) and the mask carries both unchanged, so it overlays the input in any viewer"
        )
    return affine, warnings


def _check_geometry(affine: npt.NDArray[np.float64]) -> tuple[float, float, float]:
    if not np.all(np.isfinite(affine)):
        raise InvalidVolume("affine contains NaN or Inf")
    det = float(np.linalg.det(affine[:3, :3]))
    if not np.isfinite(det) or abs(det) < 1e-9:
        raise InvalidVolume("affine is singular (zero or degenerate voxel axes)")
    zooms = voxel_sizes(affine)
    for z in zooms:
        if not (MIN_SPACING_MM <= float(z) <= MAX_ABS_SPACING_MM):
            raise InvalidVolume(
                f"voxel spacing {tuple(round(float(v), 4) for v in zooms)} mm is outside "
                f"[{MIN_SPACING_MM}, {MAX_ABS_SPACING_MM}] mm"
            )
    return (float(zooms[0]), float(zooms[1]), float(zooms[2]))


def _check_values(vol: Volume) -> None:
    stored, slope, inter = vol.stored, vol.slope, vol.inter
    f32 = float(np.finfo(np.float32).max)
    if stored.dtype.kind == "f":
        # One slab at a time along the last (slowest, F-order) axis: no volume-sized temporary.
        step = max(1, (1 << 24) // max(1, stored.shape[0] * stored.shape[1]))
        for k0 in range(0, stored.shape[2], step):
            if not np.isfinite(stored[:, :, k0 : k0 + step]).all():
                raise InvalidVolume("volume contains NaN or Inf voxels")
    lo, hi = vol.stored_range
    ends = (lo * slope + inter, hi * slope + inter)
    if not all(np.isfinite(v) and abs(v) <= f32 for v in ends):
        raise InvalidVolume(
            f"scl_slope {slope:g} / scl_inter {inter:g} scale the stored range [{lo:g}, {hi:g}] out of float32"
        )


def load_volume(
    path: str | os.PathLike[str],
    *,
    max_decompressed_bytes: int | None = None,
    max_voxels: int | None = None,
    min_inplane: int = MIN_INPLANE,
    mmap: bool = False,
) -> Volume:
    """Read a ``.nii`` or ``.nii.gz`` CT image (gzip detected from its magic bytes).

    ``mmap``: map an uncompressed file's voxels (copy-on-write) instead of reading them; it must
    not change while the volume is in use (the service's own spool files).

    Raises:
        NotNifti: the bytes are not NIfTI.
        CorruptData: the gzip stream is truncated, corrupt or fails its CRC.
        VolumeTooLarge: over ``max_decompressed_bytes`` or ``max_voxels`` (checked before the
            voxel data is allocated).
        InvalidVolume: anything that makes the image unsegmentable.
    """
    hdr, arr = _read_image(path, max_decompressed_bytes, max_voxels, mmap)
    shape3 = _squeeze_to_3d(arr.shape)
    if sorted(shape3)[1] < min_inplane:
        raise InvalidVolume(f"volume {shape3} is too small to segment (needs two axes >= {min_inplane})")
    stored = arr.reshape(shape3, order="F")  # a view: trailing singleton axes dropped
    affine, warnings = _affine(hdr)
    zooms = _check_geometry(affine)
    try:
        slope, inter = hdr.get_slope_inter()
    except Exception as e:  # a valid slope with an infinite intercept
        raise InvalidVolume(f"invalid intensity scaling: {e}") from e
    if slope is None and float(hdr["scl_slope"]) != 0:
        warnings.append(f"scl_slope is {float(hdr['scl_slope'])}: ignored, as nibabel and ITK do (no scaling)")
    slope = 1.0 if slope is None else float(slope)
    inter = 0.0 if inter is None else float(inter)
    vol = Volume(stored=stored, affine=affine, header=hdr, zooms=zooms, slope=slope, inter=inter, warnings=warnings)
    _check_values(vol)
    return vol


def load_labels(path: str | os.PathLike[str]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float64]]:
    """Read a label map as uint8 plus its affine; values must fit in 0..255.

    What ``nib.load`` gives (its scaling, its best affine), read as images are: gzip with ISA-L
    (nibabel's reader took 0.9 s for a 600-slice KiTS19 label map), uncompressed files mapped.
    """
    hdr, raw = _read_image(path, None, None, mmap=True)
    arr = apply_read_scaling(raw, *hdr.get_slope_inter())
    arr = arr.reshape(_squeeze_to_3d(arr.shape), order="A")
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise InvalidVolume(f"label map {path} has values outside 0..255")
        arr = arr.astype(np.uint8)
    return arr, np.asarray(hdr.get_best_affine(), dtype=np.float64)


def mask_image(mask: npt.NDArray[np.uint8], like: Volume) -> nib.Nifti1Image:
    """Wrap a uint8 mask on ``like``'s voxel grid, with ``like``'s affine and header.

    The header keeps the geometry (qform and sform with their codes, pixdim, units) and drops
    what could carry patient data: extensions (DICOM headers ride in them), description and
    file names. The intent is set to NIfTI's label map.
    """
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {mask.shape} does not match the volume {like.shape}")
    klass = nib.Nifti2Image if isinstance(like.header, nib.Nifti2Header) else nib.Nifti1Image
    hdr = like.header.copy()
    hdr.extensions.clear()
    img = klass(np.asfortranarray(mask, dtype=np.uint8), like.affine, header=hdr)
    h = img.header
    h.set_data_dtype(np.uint8)
    h.set_slope_inter(1.0, 0.0)
    h.set_intent("label")
    h["cal_min"] = 0
    h["cal_max"] = float(mask.max()) if mask.size else 0.0
    h["descrip"] = b"kitseg mask"
    h["aux_file"] = b""
    if "db_name" in h:
        h["db_name"] = b""
    h.set_data_offset(0)  # recomputed on write: the header has no extensions now
    return img


def encode_mask(mask: npt.NDArray[np.uint8], like: Volume, compresslevel: int = 1) -> bytes:
    """The mask as ``.nii.gz`` bytes (level 1: masks compress well and speed matters).

    The header is written by nibabel; the voxels go to the compressor straight from the mask's
    memory in chunks, so encoding needs no uncompressed copy of the file.
    """
    img = mask_image(mask, like)
    hdr = img.header
    head = io.BytesIO()
    hdr.write_to(head)
    offset = int(hdr.get_data_offset())
    raw_head = head.getvalue()
    raw_head += bytes(max(0, offset - len(raw_head)))
    data = np.asfortranarray(mask, dtype=np.uint8).reshape(-1, order="F")  # a view for an F-ordered mask
    comp = isal_zlib.compressobj(compresslevel, isal_zlib.DEFLATED, 31)  # wbits 31: gzip container
    parts = [comp.compress(raw_head)]
    mv = data.data  # a memoryview, no copy
    for i in range(0, len(mv), 4 * _CHUNK):
        parts.append(comp.compress(mv[i : i + 4 * _CHUNK]))
    parts.append(comp.flush())
    return b"".join(parts)


def new_file_mode() -> int:
    """What ``open()`` gives a new file: 0666 less the process's umask (read from ``/proc`` where
    it can be, since setting the umask to read it races with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike[str], payload: bytes, private: bool = True) -> None:
    """Write to a temp file in the same folder, fsync, then rename: never a partial file.

    ``private``: keep the temp file's 0600 (the service's results: patient data only it reads);
    False gives the file what any new file gets, :func:`new_file_mode` (a tool's outputs, which
    the user may share).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        if not private:
            os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def decompress_to(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Write ``src``'s NIfTI bytes, gunzipped when it is gzip, to ``dst`` (atomically, streamed):
    an uncompressed copy that :func:`load_volume` can map instead of decompressing again.

    Raises:
        CorruptData: the gzip stream is truncated, corrupt or fails its CRC (nothing is written).
    """
    dst = Path(dst)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=".tmp-", suffix=".part")
    try:
        stream, gz = _open_stream(src)
        with stream, os.fdopen(fd, "wb") as f:
            while True:
                try:
                    chunk = stream.read(_CHUNK)
                except _GZIP_ERRORS as e:
                    if not gz:
                        raise
                    raise CorruptData(f"corrupt or truncated gzip stream: {e}") from e
                if not chunk:
                    break
                f.write(chunk)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_mask(
    mask: npt.NDArray[np.uint8],
    like: Volume,
    path: str | os.PathLike[str],
    compresslevel: int = 1,
    private: bool = True,
) -> None:
    """Write ``mask`` as ``.nii.gz`` with ``like``'s affine and header (atomically; ``private``
    as :func:`atomic_write` has it)."""
    atomic_write(path, encode_mask(mask, like, compresslevel), private)


def save_image(
    data: npt.NDArray[Any], affine: npt.NDArray[np.float64], path: str | os.PathLike[str], compresslevel: int = 1
) -> None:
    """Write an array as NIfTI-1 (gzip when the path ends in .gz), keeping its dtype, with the mode
    any new file gets (the phantoms and synthesized CT are the user's data to share)."""
    img = nib.Nifti1Image(np.asfortranarray(data), affine)
    img.set_data_dtype(data.dtype)
    raw = img.to_bytes()
    payload = bytes(igzip.compress(raw, compresslevel=compresslevel)) if str(path).endswith(".gz") else raw
    atomic_write(path, payload, private=False)
