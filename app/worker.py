"""The one worker that owns the device.

Requests are spooled to disk by the route and handed over as paths through a bounded queue, so
at most one volume is in memory at a time and a burst costs disk, not RAM. A full queue raises
:class:`Overloaded` (503 + Retry-After). The worker thread runs the whole job (decompress, parse,
segment, statistics, encode, write) off the event loop; the spool file is usually already
decompressed, by :mod:`app.upload` while the upload arrived.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import queue
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from app.errors import DeadlineExceeded, InsufficientStorage, NotReady, OutOfMemory, Overloaded, describe
from app.metrics import Metrics
from app.settings import Settings
from app.store import ResultStore, StoreClosed
from segcore.checkpoint import CheckpointMeta, file_sha256
from segcore.inference import Engine
from segcore.io import Volume, encode_mask, load_volume
from segcore.stats import compute_statistics

log = logging.getLogger("kitseg.worker")


@dataclass
class Job:
    """One accepted upload. ``deadline`` (``time.monotonic()``) is set for a job whose client
    doesn't wait (``POST /segment?wait=false``): the worker enforces it, where a waiting request
    enforces its own. ``state`` and ``progress`` answer ``GET /segmentations/{id}`` meanwhile."""

    rid: str
    upload: Path
    received_ms: float
    request_id: str
    future: cf.Future[dict[str, Any]] = field(default_factory=cf.Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    deadline: float | None = None
    state: str = "queued"
    progress: float = 0.0
    #: kept on disk until it ends (ResultStore.persist), so that a restart after a crash runs it
    persisted: bool = False
    #: when its progress was last written for replicas (ResultStore.note_progress)
    progress_noted: float = 0.0

    @property
    def waited_for(self) -> bool:
        return self.deadline is None


@dataclass(frozen=True)
class Failure:
    """What a job whose client didn't wait failed with, answered by ``GET /segmentations/{id}``
    for the results' time-to-live. Kept in the result folder (:meth:`ResultStore.write_failure`),
    so that it outlives a restart as a result does; in memory only where that write failed."""

    status: int
    code: str
    message: str
    request_id: str


def _release_frames(exc: BaseException) -> None:
    """Drop the local variables held by an exception's traceback (and its causes').

    A failed request's traceback keeps every frame it passed through, and so the decompressed
    volume in them, alive for as long as the exception object lives, and through the reference
    cycle that ``raise ... from e`` makes, until the cyclic GC happens to run. Memory must be back
    to baseline as soon as the error has been answered. Line numbers stay for the log.
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        traceback.clear_frames(cur.__traceback__)
        cur = cur.__cause__ or cur.__context__


def warm_pipeline(engine: Engine, labels: dict[int, str], compresslevel: int, slices: int = 64) -> None:
    """One whole job (segment, statistics, encode) on a synthetic 512x512 CT before the service
    reports ready, so that the first real request doesn't pay for lazy imports, first calls and
    the allocator's first growth to request-sized buffers (docs/benchmarks.md, "First requests").
    The worker runs it on its own thread (:meth:`InferenceWorker.start`).

    The volume is one chunk of slices (the engine's working set per chunk is the same at any
    slice count); its statistics use a synthetic mask, since the model may find nothing in it.
    """
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[-256:256, -256:256]
    body = (yy / 170.0) ** 2 + (xx / 230.0) ** 2 < 1  # an abdomen-sized ellipse of soft tissue
    hu = np.where(body, 40, -1000).astype(np.int16)[:, :, None] + rng.integers(-20, 20, (512, 512, slices), np.int16)
    affine = np.diag([-0.78, -0.78, 2.5, 1.0])
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(hu.shape)
    hdr.set_data_dtype(np.int16)
    vol = Volume(stored=np.asfortranarray(hu), affine=affine, header=hdr, zooms=(0.78, 0.78, 2.5))
    engine.predict(vol)
    mask = np.zeros(hu.shape, np.uint8, order="F")
    mask[150:210, 200:300, 10:40] = 1  # two kidneys, one with a tumor
    mask[300:360, 200:300, 10:40] = 1
    mask[160:180, 220:240, 20:30] = 2
    compute_statistics(mask, vol, labels, None, None)
    encode_mask(mask, vol, compresslevel=compresslevel)


class JobCancelled(Exception):
    """The request's deadline passed or its client disconnected; stop between batches."""


#: failures of jobs nobody waited for that could not be written to disk, kept in memory at most
#: (each is a few hundred bytes)
MAX_FAILURES = 10_000
#: how often a persisted job's progress is written for replicas that share the result folder
PROGRESS_NOTE_S = 1.0


def _check_deadline(job: Job) -> None:
    """A job whose client doesn't wait ends at its deadline (a waiting request ends its own)."""
    if job.deadline is not None and time.monotonic() > job.deadline:
        raise DeadlineExceeded("segmentation did not finish within KITSEG_REQUEST_TIMEOUT_S of its upload")


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class InferenceWorker:
    def __init__(self, engine: Engine, settings: Settings, store: ResultStore, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self.settings = settings
        self.store = store
        self.meta: CheckpointMeta = engine.meta
        shas = [file_sha256(p) for p in settings.checkpoint_paths]  # the checkpoint, then the ensemble's others
        self.checkpoint_sha256 = shas[0]
        self.ensemble_sha256 = shas if settings.ensemble else None
        # Bounded by submit() (settings.queue_size), not by the queue itself, so that the jobs an
        # ended process left (restore()) always fit.
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="kitseg-worker", daemon=True)
        self.busy = threading.Event()
        self.accepting = True
        self.processed = 0
        # Accepted jobs not finished yet, and failures of jobs nobody waited for, by result id.
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._failures: dict[str, tuple[Failure, float]] = {}  # -> expiry, time.monotonic()
        self._warmed = threading.Event()
        self._warm_error: BaseException | None = None

    def start(self) -> None:
        """Start the thread; with ``settings.warmup`` it first runs :func:`warm_pipeline` (see
        :meth:`wait_warm`). The warm-up runs on this thread, not the caller's: glibc gives each
        thread its own malloc arena, and a warm-up elsewhere grows an arena that no job uses
        (it halved the first request's extra page faults, docs/benchmarks.md)."""
        self.thread.start()

    def wait_warm(self) -> None:
        """Block until the warm-up is over; raise its error, if it failed (the thread has ended)."""
        self._warmed.wait()
        if self._warm_error is not None:
            raise self._warm_error

    def model_info(self) -> dict[str, Any]:
        return {
            "name": self.meta.name,
            "version": str(self.meta.provenance.get("git", "unknown")),
            "sha256": self.checkpoint_sha256,
            "demo": self.settings.is_demo,
            **({"ensemble": self.ensemble_sha256} if self.ensemble_sha256 else {}),
        }

    def submit(self, job: Job) -> None:
        if not self.accepting:
            raise Overloaded("server is shutting down", {"Retry-After": str(self.settings.retry_after_s)})
        with self._lock:  # only submit() and restore() add, under the lock: the check holds
            if self.queue.qsize() >= self.settings.queue_size:
                raise Overloaded(
                    f"all {self.settings.queue_size} queue slots are taken; retry later",
                    {"Retry-After": str(self.settings.retry_after_s)},
                )
            self._jobs[job.rid] = job
            self.queue.put_nowait(job)

    def restore(self, adopted: list[tuple[dict[str, Any], Path]]) -> int:
        """Queue the persisted jobs that an ended process accepted and didn't finish
        (:meth:`ResultStore.adopt_pending`), whatever the queue's bound; one whose deadline passed
        meanwhile fails with 504 at its status URL, and one whose result was written already is
        only forgotten. Returns how many were queued."""
        n = 0
        for record, upload in adopted:
            rid = str(record.get("id", ""))
            if self.store.get(rid) is not None or self.store.failure(rid) is not None:
                self.store.unpend(rid)  # it ended just before its process did
                continue
            try:
                job = Job(
                    rid=rid,
                    upload=upload,
                    received_ms=float(record.get("received_ms", 0.0)),
                    request_id=str(record.get("request_id", "")),
                    deadline=time.monotonic() + (float(record["deadline_at"]) - time.time()),
                    persisted=True,
                )
            except (KeyError, TypeError, ValueError):  # a record this version can't read: never fatal
                log.warning("dropped an accepted job whose record can't be read", extra={"result_id": rid})
                self.store.unpend(rid)
                continue
            if job.deadline is not None and job.deadline <= time.monotonic():
                self._record_failure(
                    job,
                    DeadlineExceeded(
                        f"segmentation did not finish within {self.settings.request_timeout_s:.0f} s: the process "
                        "that accepted it stopped before running it"
                    ),
                )
                self.store.unpend(rid)
                continue
            with self._lock:
                self._jobs[rid] = job
                self.queue.put_nowait(job)
            n += 1
        if n:
            log.info("resumed %d accepted jobs of an ended process", n)
        return n

    def pending(self, rid: str) -> Job | None:
        """The accepted job with this result id, while it is queued or running (not one that a
        DELETE at a replica sharing the result folder withdrew: the worker drops it)."""
        with self._lock:
            job = self._jobs.get(rid)
        return None if job is None or self._withdrawn(job) else job

    def failure(self, rid: str) -> Failure | None:
        """How the job with this result id failed, if nobody waited for it and it did, until the
        results' time-to-live has passed."""
        with self._lock:
            kept = self._failures.get(rid)
            if kept is not None:
                if kept[1] >= time.monotonic():
                    return kept[0]
                del self._failures[rid]
        stored = self.store.failure(rid)
        return Failure(**stored) if stored is not None else None

    def cancel(self, rid: str) -> bool:
        """Cancel a queued or running job (it is dropped between batches and leaves nothing), or
        forget a failure; False when there is neither."""
        with self._lock:
            job = self._jobs.pop(rid, None)  # gone for GET at once; the worker drops it
            forgot = self._failures.pop(rid, None) is not None
        if job is not None:
            job.cancelled.set()
            if job.persisted:
                self.store.unpend(rid, upload=False)  # no restart runs it; the worker removes the upload
        return job is not None or forgot

    def _withdrawn(self, job: Job) -> bool:
        """A persisted job whose record a replica sharing the result folder removed: a DELETE
        that reached it (:meth:`ResultStore.withdraw`)."""
        return job.persisted and not self.store.is_pending(job.rid)

    def _note_progress(self, job: Job, force: bool = False) -> None:
        """Write a persisted job's progress where replicas read it, at most once a second."""
        now = time.monotonic()
        if not job.persisted or (not force and now - job.progress_noted < PROGRESS_NOTE_S):
            return
        job.progress_noted = now
        with contextlib.suppress(OSError):  # only what replicas say about it is older
            self.store.note_progress(job.rid, job.progress)

    def _forget(self, job: Job) -> None:
        with self._lock:
            self._jobs.pop(job.rid, None)

    def _record_failure(self, job: Job, error: BaseException) -> None:
        status, code, message, _ = describe(error)
        failure = Failure(status, code, message, job.request_id)
        log.info("job failed", extra={"request_id": job.request_id, "result_id": job.rid, "code": code})
        try:
            self.store.write_failure(job.rid, asdict(failure))
            return
        except StoreClosed:
            return  # purged at shutdown: nothing is kept
        except OSError as e:  # a full disk, often the failure itself (507): kept in memory instead
            log.warning("could not write a failure record: %s", e.strerror or e)
        now = time.monotonic()
        with self._lock:
            for rid in [r for r, (_, expires) in self._failures.items() if expires < now]:
                del self._failures[rid]
            while len(self._failures) >= MAX_FAILURES:  # the oldest go first
                del self._failures[next(iter(self._failures))]
            self._failures[job.rid] = (failure, now + self.settings.result_ttl_s)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, let queued work finish, then end the thread."""
        self.accepting = False
        self.queue.put(None)
        self.thread.join(timeout)

    def _run(self) -> None:
        try:
            if self.settings.warmup:
                warm_pipeline(self.engine, self.meta.labels, self.settings.mask_compresslevel)
        except BaseException as e:
            self._warm_error = e
            return
        finally:
            self._warmed.set()
        while True:
            job = self.queue.get()
            if job is None:
                return
            if job.cancelled.is_set() or job.future.cancelled() or self._withdrawn(job):
                job.upload.unlink(missing_ok=True)
                if job.persisted:
                    self.store.unpend(job.rid)
                self._forget(job)
                if self.metrics is not None:
                    self.metrics.observe_job("cancelled")
                continue
            self.busy.set()
            job.state = "running"
            self._note_progress(job, force=True)
            result: dict[str, Any] | None = None
            error: BaseException | None = None
            cancelled = False
            try:
                _check_deadline(job)  # it may have passed in the queue
                result = self._process(job)
            except JobCancelled:
                cancelled = True
            except BaseException as e:  # every failure goes back to its request
                error = e
                _release_frames(e)
            finally:
                # Remove the spooled upload *before* answering, so no client ever sees a
                # response while its temp file still exists.
                job.upload.unlink(missing_ok=True)
                self.busy.clear()
                self.processed += 1
            if cancelled or job.cancelled.is_set() or job.future.cancelled() or self._withdrawn(job):
                # Deadline passed, the client left or deleted the job (here or at a replica that
                # shares the result folder): nobody will ask for this id.
                self.store.delete(job.rid)
            elif error is not None and not job.waited_for:
                self._record_failure(job, error)  # kept for the client's next GET
            if job.persisted:  # its result or failure is recorded: a restart no longer runs it
                self.store.unpend(job.rid)
            self._forget(job)
            if self.metrics is not None:
                outcome = "cancelled" if cancelled else describe(error)[1] if error is not None else "ok"
                with contextlib.suppress(Exception):  # counting must never stop the worker
                    self.metrics.observe_job(outcome, result["timings_ms"] if result is not None else None)
            # The request may cancel its future at any moment; the worker must never die of it.
            with contextlib.suppress(cf.InvalidStateError):
                if error is not None:
                    job.future.set_exception(error)
                elif not cancelled:
                    job.future.set_result(result)  # type: ignore[arg-type]

    def _predict_with_oom_retry(self, vol: Any, job: Job) -> Any:
        def check(done: int, total: int) -> None:
            if job.cancelled.is_set() or self._withdrawn(job):
                raise JobCancelled
            _check_deadline(job)
            job.progress = done / total if total else 1.0
            self._note_progress(job)

        bs = self.engine.batch_size
        while True:
            try:
                return self.engine.predict(vol, progress=check, batch_size=bs)
            except (RuntimeError, MemoryError) as e:
                if not _is_oom(e) and not isinstance(e, MemoryError):
                    raise
                if self.engine.device.type == "cuda":
                    torch.cuda.empty_cache()
                if bs == 1:
                    raise OutOfMemory(
                        "out of memory even at batch size 1; the volume is too large for this device"
                    ) from e
                bs = max(1, bs // 2)
                log.warning("out of memory; retrying with batch size %d", bs)

    def _process(self, job: Job) -> dict[str, Any]:
        s = self.settings
        t0 = time.perf_counter()
        # The spool file is ours and unchanged until the job ends: an uncompressed one (decoded
        # during the upload) is mapped rather than copied.
        vol = load_volume(
            job.upload, max_decompressed_bytes=s.max_decompressed_bytes, max_voxels=s.max_voxels, mmap=True
        )
        warnings = vol.ct_warnings()  # non-CT policy (README "Limits"): segmented anyway, with a warning
        t_load = time.perf_counter()  # the parse stage includes the intensity check
        pred = self._predict_with_oom_retry(vol, job)
        t_pred = time.perf_counter()
        classes = compute_statistics(pred.mask, vol, self.meta.labels, pred.confidence, pred.box)
        t_stats = time.perf_counter()
        mask_gz = encode_mask(pred.mask, vol, compresslevel=s.mask_compresslevel)
        t_enc = time.perf_counter()
        now = datetime.now(timezone.utc)
        result: dict[str, Any] = {
            "id": job.rid,
            "model": self.model_info(),
            "input": {
                "shape": list(vol.shape),
                "spacing_mm": [float(z) for z in vol.zooms],
                "orientation": list(vol.axcodes),
                "affine": np.round(vol.affine, 6).tolist(),
                "dtype": str(vol.header.get_data_dtype()),
            },
            "timings_ms": {},
            "classes": classes,
            "mask_url": f"/segmentations/{job.rid}/mask",
            "warnings": warnings,
            "created_at": now.isoformat(timespec="seconds"),
            "expires_at": (now + timedelta(seconds=s.result_ttl_s)).isoformat(timespec="seconds"),
        }
        if s.is_demo:
            result["notice"] = "demo model trained on synthetic phantoms; not for clinical use"
        timings = {
            "receive": job.received_ms,
            "decompress_parse": 1000 * (t_load - t0),
            **{k: v for k, v in pred.timings_ms.items() if k != "engine_total"},
            "statistics": 1000 * (t_stats - t_pred),
            "encode": 1000 * (t_enc - t_stats),
        }

        def finalize(r: dict[str, Any]) -> None:
            timings["write"] = 1000 * (time.perf_counter() - t_enc)  # the mask; result.json is tiny
            timings["total"] = sum(timings.values())
            r["timings_ms"] = {k: round(v, 2) for k, v in timings.items()}

        try:
            self.store.write(job.rid, result, mask_gz, finalize)
        except StoreClosed as e:
            raise NotReady(str(e)) from e
        except OSError as e:
            raise InsufficientStorage(f"could not write the result: {e.strerror or e}") from e
        return result
