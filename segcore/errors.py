"""Domain errors shared by training and the service.

The service maps each class to one HTTP status in a single handler module; training lets them
propagate with their message.
"""

from __future__ import annotations


class KitsegError(Exception):
    """Base class; ``code`` is a stable machine-readable identifier."""

    code = "kitseg_error"


class InvalidVolume(KitsegError, ValueError):
    """The file is NIfTI but cannot be segmented (wrong rank, empty axis, NaN, singular affine...)."""

    code = "invalid_volume"


class CorruptData(InvalidVolume):
    """The container is damaged: truncated gzip, bad CRC, corrupt deflate data."""

    code = "corrupt_data"


class NotNifti(KitsegError, ValueError):
    """The bytes are not a NIfTI-1/NIfTI-2 image (or gzip of one)."""

    code = "unsupported_media_type"


class VolumeTooLarge(KitsegError, ValueError):
    """The compressed or decompressed size, or the declared voxel count, is over a limit."""

    code = "payload_too_large"


class CheckpointError(KitsegError, RuntimeError):
    """A checkpoint is missing, corrupted, tampered with, or does not match this code."""

    code = "checkpoint_error"


class DeviceUnavailable(KitsegError, RuntimeError):
    """The device asked for is not there (``cuda`` on a machine without CUDA) or has no such name."""

    code = "device_unavailable"
