"""Typed configuration from ``KITSEG_*`` environment variables (pydantic-settings).

``get_settings()`` is cached; tests swap it through ``app.dependency_overrides`` or pass a
``Settings`` to ``create_app``.
"""

from __future__ import annotations

import re
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: a URL path prefix: unreserved characters and slashes, nothing to escape in a URL or in HTML
_PATH_PREFIX = re.compile(r"/[A-Za-z0-9._~/-]*")
#: a web origin: scheme, host (a name, IPv4 or [IPv6]) and port, nothing after
_ORIGIN = re.compile(r"https?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?")
DEMO_CHECKPOINT = Path(__file__).resolve().parent / "demo_model" / "kitseg-demo-phantom.safetensors"


class Settings(BaseSettings):
    """Every setting, its default and its meaning (the README's configuration table mirrors this)."""

    # An empty variable is an unset one: compose passes `KITSEG_CHECKPOINT: ${KITSEG_CHECKPOINT:-}`
    # as an empty string when the host has none, which would otherwise be the path "." (and a
    # service that cannot start) instead of the demo model.
    model_config = SettingsConfigDict(env_prefix="KITSEG_", env_file=None, extra="ignore", env_ignore_empty=True)

    checkpoint: Path | None = Field(
        None, description="checkpoint (.safetensors) to serve; unset = the bundled demo model"
    )
    ensemble: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="more checkpoints (comma-separated) served with KITSEG_CHECKPOINT as one ensemble: their softmax "
        "probabilities are averaged, as nnU-Net averages its cross-validation folds; they must share the training "
        "configuration, and each adds its model time",
    )
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto picks CUDA when available")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 on CUDA and on CPUs with native bf16 (AVX-512 BF16 or AMX), fp32 on other CPUs",
    )
    backend: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto",
        description="auto: ONNX Runtime for fp32 on CPU when the onnx extra is installed (1.05-1.4x faster model "
        "stage here), torch otherwise and always on CUDA",
    )
    mirror: bool = Field(
        True, description="test-time mirroring (as nnU-Net): also run the left-right flipped input; 2x model time"
    )
    body_crop: bool = Field(
        True,
        description="run the network only on the box around the body (what is above the checkpoint's lower HU "
        "clip) plus a margin; outside it is background. About 2x faster model stage on the phantoms",
    )
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="torch.compile the network at startup (the same masks; startup about 40 s longer on a 2-core "
        "CPU with a fresh inductor cache). auto: on for torch bf16 on CPU when a C++ compiler is installed (model "
        "stage 1.17-1.32x faster here), off on CUDA until measured there, and off with warmup=false (the first request "
        "would pay for compiling)",
    )
    batch_size: int = Field(8, ge=1, le=256, description="slices per forward pass; bounds activation memory")
    result_dir: Path = Field(
        Path(tempfile.gettempdir()) / "kitseg-results", description="where results and spooled uploads live"
    )
    result_ttl_s: int = Field(
        3600, ge=10, le=30 * 24 * 3600, description="results are deleted this long after creation"
    )
    purge_results_on_shutdown: bool = Field(
        False,
        description="delete every result in result_dir when the service stops (after the drain; not for replicas "
        "that share one result_dir); by default results stay for the next start, which sweeps the expired ones, so "
        "a service stopped for good leaves them on disk",
    )
    queue_size: int = Field(4, ge=1, le=1000, description="requests waiting for the worker; more get 503")
    max_upload_bytes: int = Field(1 << 30, ge=1024, description="limit on the uploaded (compressed) file")
    max_decompressed_bytes: int = Field(2 << 30, ge=1024, description="limit after gunzip, checked while streaming")
    decode_during_upload: bool = Field(
        True,
        description="gunzip a .nii.gz upload on a second thread while it arrives, so that it is not paid after the "
        "last byte (the plain path is the fallback for anything unusual)",
    )
    max_voxels: int = Field(1024 * 1024 * 1024, ge=1, description="limit on the voxel count declared in the header")
    request_timeout_s: float = Field(600.0, gt=0, description="deadline for one segmentation (504 after it)")
    retry_after_s: int = Field(5, ge=1, description="Retry-After sent with 503")
    drain_timeout_s: float = Field(
        120.0, ge=0, description="on SIGTERM, how long accepted requests may take to finish before exit"
    )
    upload_timeout_s: float = Field(
        300.0, gt=0, description="time allowed to receive one request body; slower clients get 408"
    )
    mask_compresslevel: int = Field(1, ge=0, le=3, description="gzip level of returned masks (ISA-L levels 0-3)")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated keys; empty = no auth"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="the browser origins (scheme://host[:port], comma-separated, or *) whose pages may call the API "
        "(a web viewer on another host); empty = no CORS headers, so browsers allow only the service's own pages",
    )
    cors_private_network: bool = Field(
        False,
        description="also answer Chrome's Private Network Access preflight, so that a page served from a public "
        "origin (one of cors_origins) may call this service on a private address",
    )
    root_path: str = Field(
        "",
        description="the path prefix a reverse proxy serves the API under (for example /kitseg), which the proxy "
        "strips before forwarding: kitseg-serve gives it to uvicorn (--root-path), and the links the API returns "
        "(mask_url, Location) and the docs pages carry it",
    )
    log_level: str = Field("INFO", description="logging level")
    metrics: bool = Field(
        True,
        description="Prometheus metrics at GET /metrics (requests, job stages and outcomes, queue, process); "
        "behind the API key when keys are set",
    )
    warmup: bool = Field(
        True,
        description="run one whole job on a synthetic CT before reporting ready, so the first request is not slower",
    )

    @field_validator("api_keys", "ensemble", "cors_origins", mode="before")
    @classmethod
    def _split_keys(cls, v: object) -> object:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    @field_validator("api_keys")
    @classmethod
    def _strong_keys(cls, v: list[str]) -> list[str]:
        weak = [k for k in v if len(k) < 16]
        if weak:
            raise ValueError("each API key must be at least 16 characters")
        return v

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        out = [o.rstrip("/") for o in v]
        bad = [o for o in out if o != "*" and not _ORIGIN.fullmatch(o)]
        if bad:
            raise ValueError(f"each CORS origin must be scheme://host[:port] (no path) or *, got {bad}")
        return out

    @field_validator("root_path")
    @classmethod
    def _url_path(cls, v: str) -> str:
        v = v.strip()
        if v in ("", "/"):
            return ""
        if not v.startswith("/") or "//" in v or not _PATH_PREFIX.fullmatch(v):
            raise ValueError(f"root_path must be a URL path such as /kitseg (letters, digits, -._~/), got {v!r}")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _limits_consistent(self) -> Settings:
        if self.max_decompressed_bytes < self.max_upload_bytes // 1024:
            raise ValueError("max_decompressed_bytes is implausibly small next to max_upload_bytes")
        if self.ensemble and self.checkpoint is None:
            raise ValueError("KITSEG_ENSEMBLE adds to KITSEG_CHECKPOINT: set the first member there")
        return self

    @property
    def checkpoint_path(self) -> Path:
        return self.checkpoint if self.checkpoint is not None else DEMO_CHECKPOINT

    @property
    def checkpoint_paths(self) -> list[Path]:
        """What the engine loads: the checkpoint, then the ensemble's other members."""
        return [self.checkpoint_path, *self.ensemble]

    @property
    def is_demo(self) -> bool:
        return self.checkpoint is None


@lru_cache
def get_settings() -> Settings:
    return Settings()
