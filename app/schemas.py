"""Response models (they document the API in /docs; extra fields are allowed to pass through)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorBody(BaseModel):
    code: str = Field(description="stable machine-readable error code")
    message: str = Field(description="what went wrong, for humans")
    request_id: str = Field(description="echo of X-Request-ID; quote it when reporting a problem")


class ModelRef(Loose):
    name: str
    version: str
    sha256: str
    demo: bool = Field(description="true when the bundled phantom-trained demo model is served")
    ensemble: list[str] | None = Field(
        None,
        description="an ensemble's checkpoints (sha256 of each file, the first as in sha256); absent for one model",
    )


class InputInfo(Loose):
    shape: list[int]
    spacing_mm: list[float]
    orientation: list[str] = Field(description="nibabel axis codes, e.g. ['I','P','L'] for KiTS19")
    affine: list[list[float]]


class HUStats(BaseModel):
    mean: float
    std: float
    min: float
    max: float


class ClassStats(Loose):
    label: int
    name: str
    present: bool
    voxels: int
    volume_ml: float
    components: int
    largest_component_ml: float
    bbox_voxels: dict[str, list[int]] | None = None
    bbox_size_mm: list[float] | None = None
    centroid_mm: list[float] | None = Field(None, description="world (RAS+) coordinates in mm")
    hu: HUStats | None = None
    mean_confidence: float | None = Field(None, description="mean softmax probability of the voxels given this label")
    touches_border: bool
    sides: dict[str, Any] | None = Field(None, description="kidney only: left/right volumes with the tumor inside each")
    max_axial_diameter_mm: float | None = Field(
        None, description="tumor only: largest in-plane diameter of the largest tumor"
    )


class SegmentationResult(Loose):
    id: str
    model: ModelRef
    input: InputInfo
    timings_ms: dict[str, float]
    classes: list[ClassStats]
    mask_url: str
    warnings: list[str] = []
    notice: str | None = None
    created_at: str
    expires_at: str


class JobStatus(BaseModel):
    id: str
    status: str = Field(
        description="queued or running; done or failed only in the answer to a POST repeated with the same "
        "Idempotency-Key (GET status_url for the result or the error)"
    )
    progress: float = Field(
        description="share of the volume's slices segmented so far, 0 to 1 (as of the last second, where a "
        "replica sharing the result folder runs the job)"
    )
    status_url: str = Field(description="GET it until it answers 200 with the result (or the job's error)")
