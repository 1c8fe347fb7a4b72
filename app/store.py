"""Results on disk: ``<result_dir>/results/<id>/{result.json, mask.nii.gz}`` with a time-to-live.

Ids are 32 lowercase hex characters (uuid4) and are checked against that pattern before any
path is built, so an id can never reach outside the result folder. Writes go to a temp file and
are renamed into place. Uploads are spooled in ``<result_dir>/spool`` under random names that
start with the process's instance id: an uploaded filename is never used in a path.

Accepted jobs whose client doesn't wait (``POST /segment?wait=false``) are also kept on disk
until they finish, in ``<result_dir>/pending/<instance>/`` (the upload and a small record), so
that a process that dies (killed, out of memory, the host restarted) doesn't lose them: the next
process that starts on the same ``result_dir`` adopts them and runs them. Each process holds an
exclusive ``flock`` on its own folder's ``.owner`` file for its life, and adopts only folders
whose lock it can take, whose process has ended; so replicas sharing a ``result_dir`` never take
each other's jobs.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, NamedTuple

from segcore.io import atomic_write

log = logging.getLogger("kitseg.store")
ID_RE = re.compile(r"^[0-9a-f]{32}$")
DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")


CLOSED = "the service is shutting down and has purged its results"
#: age after which a partial write, or the pending folder of a start that died half-way, is removed
STALE_S = 3600


class KeyUse(NamedTuple):
    """Who holds an idempotency key (:meth:`ResultStore.key_use`)."""

    rid: str
    #: the sha256 of the upload it was sent with; None in a key an earlier version kept
    fingerprint: str | None
    #: claimed by a request that a live process is still accepting
    in_progress: bool


class StoreClosed(RuntimeError):
    """The results were purged at shutdown: nothing is written after that."""


class ResultStore:
    def __init__(self, root: Path, ttl_s: int) -> None:
        self.root = Path(root)
        self.results = self.root / "results"
        self.spool = self.root / "spool"
        self.ttl_s = ttl_s
        self.results.mkdir(parents=True, exist_ok=True)
        self.spool.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        # purge() closes the store under this lock, and write() renames a result into place only
        # under it while the store is open: a job the shutdown's drain left running can't leave a
        # result behind the purge.
        self._lock = threading.Lock()
        self._closed = False
        self.keys = self.root / "keys"  # idempotency keys (hashed) -> result id
        self.keys.mkdir(exist_ok=True)
        self._key_lock = threading.Lock()
        self.instance = uuid.uuid4().hex
        self.pending_root = self.root / "pending"
        self.pending_root.mkdir(exist_ok=True)
        # Made under a dot name and locked before it gets its own: a replica adopting ended
        # processes' folders (adopt_pending) must never see it unlocked.
        making = self.pending_root / f".{self.instance}"
        making.mkdir()
        self._owner = open(making / ".owner", "wb")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(self._owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:  # a file system without locks (some network ones): one process per folder
            log.warning(
                "%s does not support file locks (%s): replicas must not share it, since each would take the "
                "others' accepted jobs and spooled uploads for an ended process's",
                self.root,
                e.strerror or e,
            )
        self.pending = self.pending_root / self.instance
        os.replace(making, self.pending)
        self.sweep_spool()

    def sweep_spool(self) -> None:
        """Remove the uploads that processes which have ended were receiving: they are never
        going to be processed. A live replica's (one sharing this result_dir) are still being
        received or segmented."""
        for f in self.spool.iterdir():
            if not self._alive(f.name.split("-", 1)[0]):
                f.unlink(missing_ok=True)

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    def spool_path(self) -> Path:
        """A new spool file, named after this process (whose lock says whether it still runs)."""
        return self.spool / f"{self.instance}-{uuid.uuid4().hex}.upload"

    def _alive(self, instance: str) -> bool:
        """Whether the process with this instance id still runs: it holds the lock on its
        pending folder's ``.owner`` for its life."""
        if instance == self.instance:
            return True
        if not ID_RE.fullmatch(instance):
            return False
        try:
            with open(self.pending_root / instance / ".owner", "rb") as owner:
                fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:  # no such folder, or no locks on this file system (see __init__)
            return False
        return False

    def _dir(self, rid: str) -> Path | None:
        if not ID_RE.fullmatch(rid):
            return None
        return self.results / rid

    def write(
        self, rid: str, result: dict[str, Any], mask_gz: bytes, finalize: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        """Write the mask, then ``result.json`` (after ``finalize`` may add to it), then rename the
        folder into place: a result is either complete or absent."""

        def fill(tmp: Path) -> None:
            atomic_write(tmp / "mask.nii.gz", mask_gz)
            if finalize is not None:
                finalize(result)
            atomic_write(tmp / "result.json", json.dumps(result).encode())

        self._publish(rid, fill)

    def write_failure(self, rid: str, failure: dict[str, Any]) -> None:
        """Keep a failed job's error (``error.json``: status, code, message, request id) in the
        result's place, for the same time-to-live, so that its status URL answers it after a
        restart too; :meth:`get` and :meth:`mask_path` don't see it, :meth:`delete` removes it."""
        self._publish(rid, lambda tmp: atomic_write(tmp / "error.json", json.dumps(failure).encode()))

    def _publish(self, rid: str, fill: Callable[[Path], None]) -> None:
        d = self._dir(rid)
        assert d is not None
        tmp = self.results / f".{rid}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            fill(tmp)
            with self._lock:
                if self._closed:
                    raise StoreClosed(CLOSED)
                os.replace(tmp, d)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if self._closed and isinstance(e, OSError):  # the purge removed the partial write under it
                raise StoreClosed(CLOSED) from e
            raise

    def _expired(self, d: Path, ttl_s: float | None = None) -> bool:
        try:
            return time.time() - d.stat().st_mtime > (self.ttl_s if ttl_s is None else ttl_s)
        except FileNotFoundError:
            return True

    def _live(self, rid: str, name: str) -> Path | None:
        """``name`` in ``rid``'s folder, unless it has none or its time-to-live has passed (then
        the folder is deleted)."""
        d = self._dir(rid)
        if d is None or not (d / name).is_file():
            return None
        if self._expired(d):
            self.delete(rid)
            return None
        return d / name

    def get(self, rid: str) -> dict[str, Any] | None:
        f = self._live(rid, "result.json")
        if f is None:
            return None
        data: dict[str, Any] = json.loads(f.read_text())
        return data

    def failure(self, rid: str) -> dict[str, Any] | None:
        """What :meth:`write_failure` kept for ``rid``, until the time-to-live has passed."""
        f = self._live(rid, "error.json")
        if f is None:
            return None
        try:
            data: dict[str, Any] = json.loads(f.read_text())
        except (OSError, ValueError):
            return None
        return data

    def mask_path(self, rid: str) -> Path | None:
        d = self._dir(rid)
        if d is None or not (d / "mask.nii.gz").is_file() or self._expired(d):
            return None
        return d / "mask.nii.gz"

    def delete(self, rid: str) -> bool:
        d = self._dir(rid)
        if d is None or not d.is_dir():
            return False
        shutil.rmtree(d, ignore_errors=True)
        return True

    def purge(self) -> int:
        """Delete every result, partial write and spooled upload, and close the store: a later
        :meth:`write` raises :class:`StoreClosed` and leaves nothing. Returns how many results."""
        n = 0
        with self._lock:
            self._closed = True
            for d in self.results.iterdir():
                if d.is_dir():
                    n += bool(ID_RE.fullmatch(d.name))  # partial writes are removed but not counted
                    shutil.rmtree(d, ignore_errors=True)
                else:
                    d.unlink(missing_ok=True)
            for f in self.spool.iterdir():
                f.unlink(missing_ok=True)
            for f in self.pending.iterdir():
                if f.name != ".owner":
                    f.unlink(missing_ok=True)
            for f in self.keys.iterdir():
                f.unlink(missing_ok=True)
        log.info("shutdown purge removed %d results", n)
        return n

    # ------------------------------------------------------------ jobs nobody waits for
    def persist(self, rid: str, upload: Path, record: dict[str, Any]) -> Path:
        """Keep an accepted job's upload and ``record`` (JSON: what :meth:`adopt_pending` gives
        back) until :meth:`unpend`; returns the upload's new path. The upload moves first and
        the record is written last, so a record always has its upload."""
        d = self._dir(rid)
        assert d is not None
        dst = self.pending / f"{rid}.upload"
        os.replace(upload, dst)
        try:
            atomic_write(self.pending / f"{rid}.json", json.dumps(record).encode())
        except BaseException:
            dst.unlink(missing_ok=True)
            raise
        return dst

    def unpend(self, rid: str, upload: bool = True) -> None:
        """Forget a persisted job: its record (a restart no longer runs it) and, unless the
        worker still reads it, its upload."""
        if self._dir(rid) is None:
            return
        (self.pending / f"{rid}.json").unlink(missing_ok=True)
        (self.pending / f"{rid}.progress").unlink(missing_ok=True)
        if upload:
            (self.pending / f"{rid}.upload").unlink(missing_ok=True)

    def is_pending(self, rid: str) -> bool:
        """Whether this process's persisted job still has its record: a replica's DELETE
        (:meth:`withdraw`) removes it, and the worker then drops the job."""
        return (self.pending / f"{rid}.json").is_file()

    def note_progress(self, rid: str, progress: float) -> None:
        """Say how far a persisted job is, for replicas asked about it (:meth:`elsewhere`)."""
        tmp = self.pending / f".{rid}.progress"
        tmp.write_text(f"{progress:.3f}")
        os.replace(tmp, self.pending / f"{rid}.progress")

    def _records(self, rid: str) -> list[Path]:
        """The records of ``rid`` in every process's pending folder, this one's included: it
        holds the jobs it is adopting before its worker has them."""
        if self._dir(rid) is None:
            return []
        return [
            d / f"{rid}.json"
            for d in self.pending_root.iterdir()
            if ID_RE.fullmatch(d.name) and (d / f"{rid}.json").is_file()
        ]

    def elsewhere(self, rid: str) -> tuple[str, float] | None:
        """``(status, progress)`` of an accepted, unfinished job that this process's worker
        doesn't hold (ask it first): one another process sharing this result folder runs
        (``queued``, or ``running`` once it has said how far it is), one whose process has ended
        (``queued`` until a process adopts it), or one this process is adopting. None when
        there is none."""
        for rec in self._records(rid):
            if not self._alive(rec.parent.name):
                return "queued", 0.0
            try:
                return "running", min(1.0, max(0.0, float(rec.with_suffix(".progress").read_text())))
            except (OSError, ValueError):
                return "queued", 0.0
        return None

    def withdraw(self, rid: str) -> bool:
        """Cancel a job that this process's worker doesn't hold (ask it first; see
        :meth:`elsewhere`): its record goes, so the worker that runs it drops it at its next
        batch, and no restart or adoption runs it. False when there is none."""
        records = self._records(rid)
        for rec in records:
            rec.unlink(missing_ok=True)
        return bool(records)

    def adopt_pending(self) -> list[tuple[dict[str, Any], Path]]:
        """Move the persisted jobs of processes that have ended into this one's folder and return
        them (record, upload), oldest first. Their folders are removed, with any upload that has
        no record (a job whose record was never written or already removed)."""
        adopted: list[tuple[dict[str, Any], Path]] = []
        for d in self.pending_root.iterdir():
            if d == self.pending or not d.is_dir() or not ID_RE.fullmatch(d.name):
                if d.name.startswith(".") and self._expired(d, STALE_S):  # a start that died in __init__
                    shutil.rmtree(d, ignore_errors=True)
                continue
            try:
                owner = open(d / ".owner", "ab")  # noqa: SIM115 - made if its process died before making it
            except OSError:
                continue  # removed meanwhile: another process adopted it
            with owner:
                try:
                    fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)  # its process has ended
                except BlockingIOError:
                    continue  # a live replica's
                except OSError:
                    pass  # no locks on this file system (see __init__)
                adopted += self._adopt(d)
        adopted.sort(key=lambda a: _number(a[0].get("accepted_at")))
        if adopted:
            log.info("adopted %d accepted jobs of an ended process", len(adopted))
        return adopted

    def _adopt(self, d: Path) -> list[tuple[dict[str, Any], Path]]:
        out = []
        for rec in d.glob("*.json"):
            rid, upload = rec.stem, d / f"{rec.stem}.upload"
            try:
                record = json.loads(rec.read_text())
            except (OSError, ValueError):
                continue
            if (
                not isinstance(record, dict)
                or record.get("id") != rid
                or self._dir(rid) is None
                or not upload.is_file()
            ):
                continue
            try:
                os.replace(upload, self.pending / upload.name)
                os.replace(rec, self.pending / rec.name)
            except OSError as e:
                log.warning("could not take over an accepted job: %s", e.strerror or e)
                continue
            out.append((record, self.pending / upload.name))
        shutil.rmtree(d, ignore_errors=True)
        return out

    def close(self) -> None:
        """Release this process's pending folder: removed when no job is left in it, else kept
        for the next process to adopt (a drain that timed out)."""
        left = [f for f in self.pending.iterdir() if f.name != ".owner"]
        if not left:
            shutil.rmtree(self.pending, ignore_errors=True)
        self._owner.close()

    # ------------------------------------------------------------ idempotency keys
    # A key's file (named by the hex sha256 of the client's API key and its Idempotency-Key, see
    # ``app.routes.segment``) holds "<id> <fingerprint>" once its job is accepted, and
    # "<id> <fingerprint> <instance>" while the request that claimed it is being accepted by that
    # process. The fingerprint is the upload's sha256. Files an earlier version wrote hold the id
    # only. Claims and changes are made under one lock (a thread lock and ``flock`` on
    # ``keys.lock``), so two requests with one key, in one process or in replicas sharing the
    # folder, never both start a job.
    @contextmanager
    def _keys_locked(self) -> Iterator[None]:
        with self._key_lock, open(self.root / "keys.lock", "ab") as f:
            with suppress(OSError):  # no locks on this file system: one process per folder (warned at start)
                fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def key_use(self, digest: str) -> KeyUse | None:
        """Who holds an idempotency key (:meth:`_key_expired` says for how long)."""
        f = self.keys / digest
        if not DIGEST_RE.fullmatch(digest):
            return None
        try:
            parts = f.read_text().split()
        except OSError:
            return None
        if not parts or not ID_RE.fullmatch(parts[0]) or self._key_expired(f, parts[0]):
            return None
        fingerprint = parts[1] if len(parts) > 1 and DIGEST_RE.fullmatch(parts[1]) else None
        return KeyUse(parts[0], fingerprint, len(parts) > 2 and self._alive(parts[2]))

    def _key_expired(self, f: Path, rid: str) -> bool:
        """A key lasts the results' time-to-live from when it was written, and beyond that for
        as long as its job is kept: unfinished (its record in any process's pending folder, a
        queue that outlasts the time-to-live, say, or a dead replica's job not yet adopted), or
        ended with a result or error not yet expired. Otherwise a retry after the time-to-live
        would start the job again while the first one still runs or is still answered."""
        if not self._expired(f):
            return False
        if not self._expired(self.results / rid):  # a result or error kept (a missing folder is expired)
            return False
        return not self._records(rid)

    def claim_key(self, digest: str, rid: str, fingerprint: str, replacing: str | None) -> bool:
        """Give the key to ``rid`` while its request is accepted (then :meth:`bind_key`, or
        :meth:`release_key` if it isn't), if nobody holds it or it is still held by
        ``replacing`` (whose job the caller found gone, or whose claimer has ended); False when
        another request took it first."""
        assert DIGEST_RE.fullmatch(digest) and ID_RE.fullmatch(rid) and DIGEST_RE.fullmatch(fingerprint)
        with self._keys_locked():
            use = self.key_use(digest)
            if use is not None and use.rid != replacing:
                return False
            atomic_write(self.keys / digest, f"{rid} {fingerprint} {self.instance}".encode())
            return True

    def bind_key(self, digest: str, rid: str, fingerprint: str) -> None:
        """``rid``'s job is accepted: the key answers it from now on, in any process."""
        with self._keys_locked():
            use = self.key_use(digest)
            if use is None or use.rid == rid:
                atomic_write(self.keys / digest, f"{rid} {fingerprint}".encode())

    def release_key(self, digest: str, rid: str) -> None:
        """``rid``'s request was not accepted: free its claim on the key."""
        with self._keys_locked():
            use = self.key_use(digest)
            if use is not None and use.rid == rid:
                (self.keys / digest).unlink(missing_ok=True)

    def sweep(self) -> int:
        """Delete expired results, idempotency keys and stale partial writes; returns how many
        results were removed."""
        for f in self.keys.iterdir():
            if self._expired(f):
                with self._keys_locked():  # not while a request claims it again
                    if self.key_use(f.name) is None:  # its job is gone too (_key_expired), or unreadable
                        f.unlink(missing_ok=True)
        n = 0
        for d in self.results.iterdir():
            if d.name.startswith(".") and self._expired(d, STALE_S):
                shutil.rmtree(d, ignore_errors=True)
            elif d.is_dir() and ID_RE.fullmatch(d.name) and self._expired(d):
                shutil.rmtree(d, ignore_errors=True)
                n += 1
        if n:
            log.info("retention sweep removed %d expired results", n)
        return n


def _number(v: object) -> float:
    """A record's time, or 0 where another version wrote something else."""
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0
