"""Results on disk: ``<result_dir>/results/<id>/{result.json, mask.nii.gz}`` with a time-to-live.

Ids are 32 lowercase hex characters (uuid4) and are checked against that pattern before any
path is built, so an id can never reach outside the result folder. Writes go to a temp file and
are renamed into place. Uploads are spooled in ``<result_dir>/spool`` under random names: an
uploaded filename is never used in a path.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from segcore.io import atomic_write

log = logging.getLogger("kitseg.store")
ID_RE = re.compile(r"^[0-9a-f]{32}$")


CLOSED = "the service is shutting down and has purged its results"


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
        # Uploads spooled by a previous process that died are never going to be processed.
        for f in self.spool.iterdir():
            f.unlink(missing_ok=True)

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    def spool_path(self) -> Path:
        return self.spool / f"{uuid.uuid4().hex}.upload"

    def _dir(self, rid: str) -> Path | None:
        if not ID_RE.fullmatch(rid):
            return None
        return self.results / rid

    def write(
        self, rid: str, result: dict[str, Any], mask_gz: bytes, finalize: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        """Write the mask, then ``result.json`` (after ``finalize`` may add to it), then rename the
        folder into place: a result is either complete or absent."""
        d = self._dir(rid)
        assert d is not None
        tmp = self.results / f".{rid}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            atomic_write(tmp / "mask.nii.gz", mask_gz)
            if finalize is not None:
                finalize(result)
            atomic_write(tmp / "result.json", json.dumps(result).encode())
            with self._lock:
                if self._closed:
                    raise StoreClosed(CLOSED)
                os.replace(tmp, d)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if self._closed and isinstance(e, OSError):  # the purge removed the partial write under it
                raise StoreClosed(CLOSED) from e
            raise

    def _expired(self, d: Path) -> bool:
        try:
            return time.time() - d.stat().st_mtime > self.ttl_s
        except FileNotFoundError:
            return True

    def get(self, rid: str) -> dict[str, Any] | None:
        d = self._dir(rid)
        if d is None or not (d / "result.json").is_file():
            return None
        if self._expired(d):
            self.delete(rid)
            return None
        data: dict[str, Any] = json.loads((d / "result.json").read_text())
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
        log.info("shutdown purge removed %d results", n)
        return n

    def sweep(self) -> int:
        """Delete expired results and stale partial writes; returns how many were removed."""
        n = 0
        for d in self.results.iterdir():
            if d.name.startswith(".") and time.time() - d.stat().st_mtime > 3600:
                shutil.rmtree(d, ignore_errors=True)
            elif d.is_dir() and ID_RE.fullmatch(d.name) and self._expired(d):
                shutil.rmtree(d, ignore_errors=True)
                n += 1
        if n:
            log.info("retention sweep removed %d expired results", n)
        return n
