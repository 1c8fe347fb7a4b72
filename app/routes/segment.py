"""POST /segment and the result resources under /segmentations/{id}."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Annotated, Any, BinaryIO

from fastapi import APIRouter, File, Header, Query, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse

from app.deps import SettingsDep, StoreDep, WorkerDep, presented_api_key, root_path
from app.errors import (
    BadUpload,
    DeadlineExceeded,
    InsufficientStorage,
    KeyInUse,
    KeyReused,
    NotFinished,
    NotFound,
    PayloadTooLarge,
    error_response,
)
from app.schemas import ErrorBody, JobStatus, SegmentationResult
from app.settings import Settings
from app.store import ResultStore
from app.upload import UploadDecoder
from app.worker import InferenceWorker, Job

log = logging.getLogger("kitseg.api")
router = APIRouter(tags=["segmentation"])
#: what an Idempotency-Key may be (the IETF draft's header): visible ASCII, at most 255 characters
IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")
DISCONNECT_POLL_S = 0.5
#: longest wait for the decoder to finish once the body is in (it has at most 8 MiB left)
DECODE_TAIL_TIMEOUT_S = 30.0

ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorBody, "description": d}
    for s, d in {
        401: "missing or invalid API key",
        413: "upload or decompressed volume over the limit",
        415: "not a NIfTI-1/NIfTI-2 file",
        409: "with wait=false: a request with this Idempotency-Key is still being accepted (see Retry-After)",
        422: "a volume that cannot be segmented, a malformed request, or an Idempotency-Key sent with another file",
        503: "model not ready, or the queue is full (see Retry-After)",
        504: "the segmentation exceeded its deadline",
        507: "no space left to store the result, or out of memory",
    }.items()
}


def _spool(src: BinaryIO, dst: Path, limit: int) -> int:
    """Copy the upload to our own spool file, enforcing the compressed-size limit."""
    n = 0
    try:
        with open(dst, "wb") as out:
            while chunk := src.read(1 << 20):
                n += len(chunk)
                if n > limit:
                    raise PayloadTooLarge(f"upload exceeds the limit of {limit} bytes")
                out.write(chunk)
    except OSError as e:
        dst.unlink(missing_ok=True)
        raise InsufficientStorage(f"could not spool the upload: {e.strerror or e}") from e
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    return n


async def _decoded_upload(request: Request, file: UploadFile) -> tuple[Path | None, int]:
    """The spool file that :mod:`app.upload` decoded while the body arrived, and the upload's
    size; ``(None, 0)`` when there is none to use (decoding off or refused, or a body that the
    decoder didn't see the same way as Starlette)."""
    dec: UploadDecoder | None = getattr(request.state, "upload_decoder", None)
    if dec is None:
        return None, 0
    try:  # usually done already, or within the last few MiB of the body
        decoded = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(dec.result)), DECODE_TAIL_TIMEOUT_S)
    except TimeoutError:
        dec.abort()  # never wait on it: the plain path still has the upload
        return None, 0
    if decoded is None or decoded.upload_bytes != file.size:
        return None, 0
    dec.claim()
    return decoded.path, decoded.upload_bytes


async def _wait_for_result(request: Request, job: Job, timeout_s: float) -> dict[str, Any] | None:
    """The job's result, or None once the client has disconnected (the job is then cancelled, so
    the worker stops between batches and moves on to the next request)."""
    fut = asyncio.wrap_future(job.future)
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            job.cancelled.set()
            fut.cancel()
            raise TimeoutError
        done, _ = await asyncio.wait({fut}, timeout=min(DISCONNECT_POLL_S, left))
        if done:
            return fut.result()
        if await request.is_disconnected():
            job.cancelled.set()
            fut.cancel()
            return None


async def _persist(store: ResultStore, rid: str, upload: Path, record: dict[str, Any]) -> Path:
    """:meth:`ResultStore.persist` on a thread. Should the request be cancelled meanwhile (the
    server stopping), the move still finishes on its thread and is then undone, so that no
    restart runs a job whose client never heard of it."""
    moved = asyncio.ensure_future(run_in_threadpool(store.persist, rid, upload, record))
    try:
        return await asyncio.shield(moved)
    except asyncio.CancelledError:
        moved.add_done_callback(lambda _: store.unpend(rid))
        raise
    except OSError as e:
        raise InsufficientStorage(f"could not keep the upload: {e.strerror or e}") from e


def _linked(result: dict[str, Any], request: Request) -> dict[str, Any]:
    """``result`` with its ``mask_url`` under the proxy's prefix (results are stored without it)."""
    root = root_path(request)
    return {**result, "mask_url": root + result["mask_url"]} if root and "mask_url" in result else result


def _summary_header(result: dict[str, Any]) -> str:
    return json.dumps(
        {
            "id": result["id"],
            "demo": result["model"]["demo"],
            "classes": [
                {k: c.get(k) for k in ("label", "name", "present", "voxels", "volume_ml")} for c in result["classes"]
            ],
        },
        separators=(",", ":"),
    )


@router.post(
    "/segment",
    response_model=SegmentationResult,
    responses={
        **ERRORS,
        200: {
            "content": {"application/gzip": {}},
            "description": "the statistics (JSON), or the mask itself with ?download=true or Accept: application/gzip",
        },
        202: {"model": JobStatus, "description": "with wait=false: accepted; GET its status_url until it answers 200"},
    },
    summary="Segment kidneys and tumors in a CT volume",
)
async def segment(
    request: Request,
    worker: WorkerDep,
    store: StoreDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="CT volume as .nii or .nii.gz (gzip is detected from the bytes)")],
    download: Annotated[
        bool, Query(description="return the mask file itself, with the statistics in the X-Kitseg-Statistics header")
    ] = False,
    wait: Annotated[
        bool,
        Query(
            description="false: answer 202 with the result's id as soon as the upload is accepted, and let "
            "GET /segmentations/{id} say when it is done (for long jobs and proxies that cut long requests)"
        ),
    ] = True,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="with wait=false: a key of the client's choosing (a UUID, say; 1-255 visible ASCII "
            "characters). A POST repeated with it, as a client retries after a lost connection, answers the first "
            "one's job (Idempotent-Replayed: true) instead of starting another, for the results' time-to-live "
            "and while its job is unfinished or kept",
        ),
    ] = None,
) -> Any:
    t0 = time.perf_counter()
    if download and not wait:
        raise BadUpload("download=true needs the request to wait for the mask; with wait=false, fetch mask_url later")
    form = await request.form()  # already parsed for ``file``; cached by Starlette
    if len(form.getlist("file")) != 1:
        raise BadUpload("send exactly one file in the 'file' field")
    rid = store.new_id()
    key = None
    if (idem := idempotency_key) is not None:
        if wait:
            raise BadUpload("Idempotency-Key is for wait=false requests: a POST repeated with it finds the job again")
        if not IDEMPOTENCY_KEY_RE.fullmatch(idem):
            raise BadUpload("Idempotency-Key must be 1 to 255 visible ASCII characters")
        # Scoped by the client's API key, so that two clients' keys never meet.
        digest = hashlib.sha256(f"{presented_api_key(request.headers)}\0{idem}".encode()).hexdigest()
        fingerprint = await run_in_threadpool(_fingerprint, file.file)
        if (replay := _claim(digest, fingerprint, rid, worker, store, request)) is not None:
            return replay  # the upload is dropped: nothing new runs
        key = (digest, fingerprint)
    try:
        job = await _accept(request, file, rid, wait, t0, worker, store, settings)
    except BaseException:
        if key is not None:
            store.release_key(key[0], rid)
        raise
    if not wait:
        if key is not None:
            try:
                store.bind_key(key[0], rid, key[1])
            except OSError as e:  # the job runs; its claim still answers a repeated POST here
                log.warning("could not keep an idempotency key: %s", e.strerror or e)
        return JSONResponse(
            _status_of(rid, job.state, job.progress, request),
            status_code=202,
            headers={"Location": f"{root_path(request)}/segmentations/{rid}"},
        )
    try:
        result = await _wait_for_result(request, job, settings.request_timeout_s)
    except TimeoutError:  # _wait_for_result has already cancelled the job
        raise DeadlineExceeded(f"segmentation did not finish within {settings.request_timeout_s:.0f} s") from None
    except asyncio.CancelledError:
        job.cancelled.set()  # the server is cancelling us: the worker drops the job or its result
        raise
    if result is None:  # the client went away; nobody is listening
        return Response(status_code=499)
    wants_file = download or "application/gzip" in request.headers.get("accept", "")
    if wants_file:
        path = store.mask_path(rid)
        if path is None:
            raise NotFound("result expired before it could be returned")
        return FileResponse(
            path,
            media_type="application/gzip",
            filename=f"{rid}_mask.nii.gz",
            headers={
                "X-Kitseg-Statistics": _summary_header(result),
                "X-Kitseg-Result": f"{root_path(request)}/segmentations/{rid}",
            },
        )
    return JSONResponse(_linked(result, request), headers={"Location": f"{root_path(request)}/segmentations/{rid}"})


async def _accept(
    request: Request,
    file: UploadFile,
    rid: str,
    wait: bool,
    t0: float,
    worker: InferenceWorker,
    store: ResultStore,
    settings: Settings,
) -> Job:
    """Spool the upload (or take the one decoded while it arrived) and queue its job; with
    ``wait=false`` the job is kept on disk first (app.store). Nothing is left behind on failure."""
    dst, size = await _decoded_upload(request, file)
    if dst is None:  # the plain path: copy Starlette's file; the worker decompresses it
        dst = store.spool_path()
        size = await run_in_threadpool(_spool, file.file, dst, settings.max_upload_bytes)
    if size == 0:
        dst.unlink(missing_ok=True)
        raise BadUpload("the uploaded file is empty")
    job = Job(rid=rid, upload=dst, received_ms=1000 * (time.perf_counter() - t0), request_id=request.state.request_id)
    try:
        if not wait:  # nobody holds a request open for it: kept on disk until it ends
            job.deadline = time.monotonic() + settings.request_timeout_s
            record = {
                "id": rid,
                "request_id": job.request_id,
                "received_ms": job.received_ms,
                "accepted_at": time.time(),
                "deadline_at": time.time() + settings.request_timeout_s,
            }
            job.upload = await _persist(store, rid, dst, record)
            job.persisted = True
        worker.submit(job)
    except BaseException:
        if job.persisted:
            store.unpend(rid)
        dst.unlink(missing_ok=True)
        raise
    return job


def _fingerprint(f: BinaryIO) -> str:
    """The upload's sha256 (about 50 ms for a 57 MB upload on the development CPU)."""
    f.seek(0)
    h = hashlib.sha256()
    while chunk := f.read(1 << 20):
        h.update(chunk)
    f.seek(0)
    return h.hexdigest()


def _claim(
    digest: str, fingerprint: str, rid: str, worker: InferenceWorker, store: ResultStore, request: Request
) -> JSONResponse | None:
    """Give the Idempotency-Key ``digest`` to the new job ``rid``; or the answer to a POST that
    repeats an earlier one (:func:`_replayed`). A key sent with another file is refused (422),
    and so is one whose first request is still being accepted (409, Retry-After: 1; the IETF
    draft's answers). A key whose job is gone (deleted, or never accepted by a process that has
    ended since) goes to the new job."""
    for _ in range(3):  # another request may take the key between the look and the claim
        use = store.key_use(digest)
        if use is not None:
            if use.fingerprint is not None and use.fingerprint != fingerprint:
                raise KeyReused(
                    "this Idempotency-Key was sent before with another file; a retry must send the same file, "
                    "and each new volume needs a new key"
                )
            if (replay := _replayed(use.rid, worker, store, request)) is not None:
                return replay
            if use.in_progress:
                break
        try:
            if store.claim_key(digest, rid, fingerprint, replacing=use.rid if use is not None else None):
                return None
        except OSError as e:
            raise InsufficientStorage(f"could not keep the Idempotency-Key: {e.strerror or e}") from e
    raise KeyInUse(
        "a request with this Idempotency-Key is still being accepted; send it again in a moment",
        headers={"Retry-After": "1"},
    )


def _replayed(rid: str, worker: InferenceWorker, store: ResultStore, request: Request) -> JSONResponse | None:
    """The answer to a POST repeated with an Idempotency-Key given to ``rid``: 202 with the job's
    status, as the first POST answered (``done`` or ``failed`` once it has ended; its status URL
    has the result or the error). None when the job is gone (deleted, expired): then the key
    starts a new one."""
    if (unfinished := _unfinished(rid, worker, store)) is not None:
        body = _status_of(rid, *unfinished, request)
    else:
        state = "done" if store.get(rid) is not None else "failed" if worker.failure(rid) is not None else None
        if state is None:
            return None
        body = _status_of(rid, state, 1.0, request)
    return JSONResponse(
        body,
        status_code=202,
        headers={"Location": f"{root_path(request)}/segmentations/{rid}", "Idempotent-Replayed": "true"},
    )


def _unfinished(rid: str, worker: InferenceWorker | None, store: ResultStore) -> tuple[str, float] | None:
    """``(status, progress)`` of an accepted job that hasn't ended: this process's worker holds
    it, or another process sharing the result folder does (:meth:`ResultStore.elsewhere`)."""
    job = worker.pending(rid) if worker is not None else None
    return (job.state, job.progress) if job is not None else store.elsewhere(rid)


def _status_of(rid: str, state: str, progress: float, request: Request) -> dict[str, Any]:
    return {
        "id": rid,
        "status": state,
        "progress": round(progress, 3),
        "status_url": f"{root_path(request)}/segmentations/{rid}",
    }


def _worker(request: Request) -> InferenceWorker | None:
    """The worker, also while the service drains (its accepted jobs still finish)."""
    return getattr(request.app.state, "worker", None)


@router.get(
    "/segmentations/{rid}",
    response_model=SegmentationResult,
    responses={
        202: {"model": JobStatus, "description": "accepted with wait=false and not finished yet; ask again"},
        404: {"model": ErrorBody},
        **{s: ERRORS[s] for s in (413, 415, 422, 504, 507)},
    },
    summary="A segmentation's result; for one sent with wait=false, its progress or how it failed",
)
def get_segmentation(rid: str, request: Request, store: StoreDep) -> Any:
    result = store.get(rid)
    if result is not None:
        return JSONResponse(_linked(result, request))
    worker = _worker(request)
    if (unfinished := _unfinished(rid, worker, store)) is not None:
        return JSONResponse(_status_of(rid, *unfinished, request), status_code=202, headers={"Retry-After": "1"})
    failed = worker.failure(rid) if worker is not None else None
    if failed is not None:  # the job's own error, with its status and code
        return error_response(request, failed.status, failed.code, f"{failed.message} (request {failed.request_id})")
    raise NotFound(f"no segmentation {rid!r} (never existed, deleted, or expired)")


@router.get(
    "/segmentations/{rid}/mask",
    responses={
        200: {"content": {"application/gzip": {}}, "description": "uint8 mask with the input's affine and header"},
        404: {"model": ErrorBody},
        409: {"model": ErrorBody, "description": "sent with wait=false and not finished yet"},
    },
    response_class=FileResponse,
)
def get_mask(rid: str, request: Request, store: StoreDep) -> Any:
    path = store.mask_path(rid)
    if path is None:
        if _unfinished(rid, _worker(request), store) is not None:
            raise NotFinished(f"segmentation {rid!r} is not finished; GET /segmentations/{rid} says when it is")
        raise NotFound(f"no mask for segmentation {rid!r}")
    return FileResponse(path, media_type="application/gzip", filename=f"{rid}_mask.nii.gz")


@router.delete("/segmentations/{rid}", status_code=204, responses={404: {"model": ErrorBody}})
def delete_segmentation(rid: str, request: Request, store: StoreDep) -> Response:
    worker = _worker(request)
    cancelled = worker is not None and worker.cancel(rid)  # queued or running: dropped, nothing kept
    cancelled = store.withdraw(rid) or cancelled  # one a replica sharing the result folder accepted
    if not store.delete(rid) and not cancelled:
        raise NotFound(f"no segmentation {rid!r}")
    return Response(status_code=204)


__all__ = ["router"]
