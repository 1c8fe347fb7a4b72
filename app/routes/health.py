"""Liveness, readiness and the model card."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from app.deps import WorkerDep, require_api_key
from app.errors import NotFound, NotReady
from app.metrics import CONTENT_TYPE
from app.schemas import ErrorBody

router = APIRouter(tags=["service"])


@router.get("/health", summary="The process is alive")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/ready",
    summary="The model is loaded and warm",
    responses={503: {"model": ErrorBody}},
    dependencies=[Depends(require_api_key)],
)
async def ready(request: Request) -> dict[str, Any]:
    worker = getattr(request.app.state, "worker", None)
    if getattr(request.app.state, "draining", False):
        raise NotReady("shutting down: finishing accepted work", {"Retry-After": "5"})
    if worker is None or not getattr(request.app.state, "ready", False):
        raise NotReady("model not loaded yet, or shutting down", {"Retry-After": "5"})
    return {
        "status": "ready",
        "device": str(worker.engine.device),
        "queued": worker.queue.qsize(),
        "busy": worker.busy.is_set(),
    }


@router.get(
    "/model", summary="The model card", responses={503: {"model": ErrorBody}}, dependencies=[Depends(require_api_key)]
)
async def model_card(worker: WorkerDep) -> dict[str, Any]:
    m = worker.meta
    card: dict[str, Any] = {
        **worker.model_info(),
        "labels": {str(k): v for k, v in m.labels.items()},
        "architecture": m.model.to_dict(),
        "preprocessing": m.preprocessing.to_dict(),
        "postprocessing": m.postprocessing.to_dict(),
        "training_metrics": m.metrics,
        "provenance": {k: v for k, v in m.provenance.items() if k not in ("train_cases", "val_cases")},
        "format_version": m.format_version,
        "weights_sha256": m.weights_sha256,
        "device": str(worker.engine.device),
        "backend": worker.engine.backend,
        "compiled": worker.engine.compiled,
        "precision": worker.engine.precision,
        "mirror": worker.engine.mirror,
        "body_crop": worker.engine.body_crop,
        "batch_size": worker.engine.batch_size,
    }
    if worker.settings.is_demo:
        card["notice"] = "demo model trained on synthetic phantoms (kitseg-train phantoms); not for clinical use"
    return card


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description="Requests by route and status, job stages and outcomes, the queue, readiness and the process, in "
    "Prometheus' text format. Labels never hold result ids, file names or volume data. Behind the API key when "
    "keys are set (a Prometheus job's `authorization: {credentials: <key>}`); KITSEG_METRICS=false turns it off.",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {}}}, 404: {"model": ErrorBody}},
    dependencies=[Depends(require_api_key)],
)
async def metrics(request: Request) -> Response:
    m = getattr(request.app.state, "metrics", None)
    if m is None:
        raise NotFound("metrics are off (KITSEG_METRICS=false)")
    return Response(m.render(), media_type=CONTENT_TYPE)
