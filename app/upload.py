"""Decoding a ``.nii.gz`` upload while it arrives, so that gunzip is not paid after the last byte.

A gzip stream decodes on one core at about 1.4-1.7 Gbit/s of input here (docs/benchmarks.md),
which is most of the server's time on a GPU and about a tenth of it on this CPU. Over any slower
link the bytes can be decoded as they come in. :class:`UploadDecodeMiddleware` copies each body
chunk of ``POST /segment`` to an :class:`UploadDecoder`, whose thread parses the multipart body
(with python-multipart, as Starlette does) and writes the file part, gunzipped, to a spool file.

It is only an optimisation, and never decides anything: Starlette still parses and validates
the request as before, and the route uses the decoded file only if the decoder saw exactly one
``file`` part of the same size and decoded it completely within the limits. Otherwise (not
gzip-framed as expected, corrupt, not NIfTI, longer than its header declares, over a limit, a
malformed body) the route spools the upload as Starlette received it, and the loader answers
with the same error as always. The decoded file
is an uncompressed NIfTI in the spool folder, so a queued request still costs disk, not memory;
whatever the route doesn't claim is deleted when the request ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isal import isal_zlib
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from segcore.io import GZIP_MAGIC, HEAD_BYTES, declared_file_bytes

#: body bytes queued for the decoder before the server stops reading the socket and waits: the
#: decoder's memory stays bounded when it is slower than the link (loopback)
BACKLOG_BYTES = 8 << 20
#: longest the body's reading waits for the decoder to catch up before giving it up
CATCH_UP_S = 10.0
#: decoded bytes allowed past what the NIfTI header declares (the loader reads and discards them)
TRAILING_SLACK = 1 << 20
#: queued body bytes the decoder takes in one go when it has fallen behind
COALESCE_BYTES = 4 << 20
#: most bytes one decompress call may produce (a gzip bomb is refused by size, not held in memory)
MAX_CHUNK_OUT = 8 << 20
#: compressed bytes given to the decompressor at a time
IN_SLICE = 1 << 20
#: uploads decoded at once; more go the plain way. The threads live as long as the process, so
#: their malloc arenas are reused instead of one more per request.
DECODERS = 2
_SLOTS = threading.BoundedSemaphore(DECODERS)
_JOBS: queue.SimpleQueue[UploadDecoder] = queue.SimpleQueue()
_THREADS: list[threading.Thread] = []
_THREADS_LOCK = threading.Lock()


def _decoder_thread() -> None:
    while True:
        _JOBS.get()._run()


def _submit(dec: UploadDecoder) -> None:
    """Run ``dec`` on one of :data:`DECODERS` daemon threads (started on first use; daemon, so that
    a decoder left waiting can never hold up the interpreter's exit)."""
    with _THREADS_LOCK:
        if len(_THREADS) < DECODERS:
            t = threading.Thread(target=_decoder_thread, name=f"kitseg-upload-decoder-{len(_THREADS)}", daemon=True)
            t.start()
            _THREADS.append(t)
    _JOBS.put(dec)


class Busy(Exception):
    """Every decoder thread is taken: this upload goes the plain way."""


class _Unusable(Exception):
    """The upload went over a limit: stop, and let the route take Starlette's copy."""


@dataclass(frozen=True)
class Decoded:
    """The decoded upload: ``path`` holds the file part, gunzipped when it was gzip."""

    path: Path
    upload_bytes: int
    decoded_bytes: int


class UploadDecoder:
    """Parses one multipart body on a decoder thread and writes its ``file`` part, decoded, to ``dst``.

    Raises :class:`Busy` when all :data:`DECODERS` threads are taken.

    ``feed`` and ``end`` are called from the event loop and never block or raise; :attr:`result`
    resolves to a :class:`Decoded`, or to None when the upload can't be used (the route then
    falls back to Starlette's copy).
    """

    def __init__(self, boundary: bytes, dst: Path, max_upload_bytes: int, max_decoded_bytes: int) -> None:
        self.dst = dst
        self.max_upload = max_upload_bytes
        self.max_decoded = max_decoded_bytes
        self.result: cf.Future[Decoded | None] = cf.Future()
        self._q: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._backlog = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._claimed = False
        if not _SLOTS.acquire(blocking=False):
            raise Busy
        try:
            self._start(boundary)
        except BaseException:
            _SLOTS.release()
            raise

    def _start(self, boundary: bytes) -> None:
        self._parser = MultipartParser(
            boundary,
            callbacks={
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
        )
        self._field = b""
        self._value = b""
        self._disposition = b""
        self._in_file = False
        self._files = 0
        self._file_done = False
        self._body_done = False
        self._upload_n = 0
        self._decoded_n = 0
        self._head = b""  # the file part's first bytes, until gzip or not is known
        self._gzip: bool | None = None
        self._dec: Any = None  # the current gzip member's decompressor
        self._first = b""  # the decoded file's first HEAD_BYTES: its NIfTI header
        self._declared: int | None = None
        # Opened here, so that a discard can never race the thread into creating it afterwards.
        self._out = open(self.dst, "wb")  # noqa: SIM115 (the thread closes it)
        try:
            _submit(self)
        except RuntimeError:  # no thread can be started (the interpreter is shutting down)
            self._out.close()
            self.dst.unlink(missing_ok=True)
            raise

    # -- the event loop's side --------------------------------------------------------------
    def feed(self, chunk: bytes) -> None:
        if self._stop.is_set():
            return  # finished or given up: nothing reads the queue any more
        with self._lock:
            self._backlog += len(chunk)
        self._q.put(chunk)

    def end(self) -> None:
        self._q.put(None)

    def abort(self) -> None:
        """Stop decoding (client gone, request over); the result becomes None unless it was ready."""
        self._stop.set()
        self._q.put(None)

    @property
    def backlog(self) -> int:
        with self._lock:
            return self._backlog

    def claim(self) -> None:
        """The route takes ``dst`` over (and deletes it itself)."""
        self._claimed = True

    def discard(self) -> None:
        """Delete ``dst`` unless the route claimed it; safe while the thread still writes."""
        if not self._claimed:
            self.dst.unlink(missing_ok=True)

    # -- the decoder thread --------------------------------------------------------------------
    def _run(self) -> None:
        ok = False
        try:
            end = False
            while not end:
                chunk = self._q.get()
                if chunk is None or self._stop.is_set():
                    break
                # Whatever else is queued goes in the same call, up to COALESCE_BYTES: every call
                # into C hands the GIL back and has to win it again from the event loop, which
                # costs more than the work when the calls are small (docs/benchmarks.md).
                parts, size = [chunk], len(chunk)
                while size < COALESCE_BYTES:
                    try:
                        more = self._q.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        end = True
                        break
                    parts.append(more)
                    size += len(more)
                with self._lock:
                    self._backlog -= size
                self._parser.write(parts[0] if len(parts) == 1 else b"".join(parts))
                if self._stop.is_set():
                    break
            if not self._stop.is_set():
                self._parser.finalize()
                ok = self._body_done and self._files == 1 and self._file_done and self._dec is None
        except Exception:  # anything unexpected: the route falls back to Starlette's copy
            ok = False
        finally:
            self._stop.set()
            try:
                self._out.close()
            except OSError:
                ok = False
            with self._lock:
                self._backlog = 0
            _SLOTS.release()  # before the result, so that the next request finds the slot free
            self.result.set_result(Decoded(self.dst, self._upload_n, self._decoded_n) if ok else None)

    def _part_begin(self) -> None:
        self._disposition = b""
        self._in_file = False

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if self._field.lower() == b"content-disposition":
            self._disposition = self._value
        self._field = self._value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        # As Starlette: a part with a filename is a file; the route wants exactly one, named "file".
        if options.get(b"name") == b"file" and b"filename" in options:
            self._files += 1
            self._in_file = self._files == 1

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._in_file or self._stop.is_set():
            return
        # Views, and the decompressor fed a slice at a time: a test client sends the whole body
        # as one chunk, and copies of it (or of a long unconsumed_tail) would grow the heap.
        piece = memoryview(data)[start:end]
        self._upload_n += len(piece)
        if self._upload_n > self.max_upload:
            raise _Unusable
        if self._gzip is None:
            if len(self._head) + len(piece) < len(GZIP_MAGIC):
                self._head += bytes(piece)
                return
            first = self._head + bytes(piece[: len(GZIP_MAGIC) - len(self._head)])
            self._gzip = first == GZIP_MAGIC
            if self._head:
                self._emit(memoryview(self._head))
                self._head = b""
        self._emit(piece)

    def _emit(self, data: memoryview) -> None:
        if not self._gzip:
            self._write(data)
            return
        for i in range(0, len(data), IN_SLICE):
            self._inflate(data[i : i + IN_SLICE])

    def _inflate(self, data: memoryview | bytes) -> None:
        # One gzip member after another (pigz and bgzip write several); max_length bounds each
        # call's output, and unconsumed_tail carries the input it didn't reach. A full output
        # with no tail left may still have more pending: call again with the (empty) tail.
        while True:
            if self._dec is None:
                if not len(data):
                    return
                self._dec = isal_zlib.decompressobj(wbits=31)
            out = self._dec.decompress(data, MAX_CHUNK_OUT)
            self._write(out)
            if self._dec.eof:
                data = self._dec.unused_data
                self._dec = None
            elif self._dec.unconsumed_tail or len(out) == MAX_CHUNK_OUT:
                data = self._dec.unconsumed_tail
            else:
                return

    def _write(self, out: bytes | memoryview) -> None:
        if not out:
            return
        if self._declared is None and self._decoded_n < HEAD_BYTES:
            self._first += bytes(out[: HEAD_BYTES - self._decoded_n])
            if len(self._first) >= HEAD_BYTES:
                self._bound_by_header()
        self._decoded_n += len(out)
        if self._decoded_n > self.max_decoded:
            raise _Unusable
        self._out.write(out)

    def _bound_by_header(self) -> None:
        """Stop at what the NIfTI header declares (plus slack): a bomb after an honest header
        then costs no more disk than the image. Not a NIfTI: stop now; the loader will say so."""
        try:
            self._declared = declared_file_bytes(self._first)
        except Exception:
            raise _Unusable from None
        self.max_decoded = min(self.max_decoded, self._declared + TRAILING_SLACK)

    def _part_end(self) -> None:
        if self._in_file:
            if self._head:  # a file of one byte: not gzip
                self._gzip = False
                self._write(self._head)
                self._head = b""
            self._file_done = True
            self._in_file = False

    def _end(self) -> None:
        self._body_done = True


def decoder_for(
    content_type: str, dst: Callable[[], Path], max_upload_bytes: int, max_decoded_bytes: int
) -> UploadDecoder | None:
    """A decoder for a body of ``content_type``, or None when it isn't ``multipart/form-data``
    with a usable boundary (Starlette will refuse it; nothing to do here)."""
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary", b"")
    if kind != b"multipart/form-data" or not 1 <= len(boundary) <= 200:
        return None
    try:
        return UploadDecoder(boundary, dst(), max_upload_bytes, max_decoded_bytes)
    except (Busy, OSError, ValueError, RuntimeError):
        return None  # all decoders busy, no spool space, or a boundary python-multipart refuses


def _route_path(scope: Scope) -> str:
    """The path the routes match: without the ``root_path`` that uvicorn (``--root-path``, behind a
    proxy's path prefix) puts in front of it."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and (path == root or path.startswith(root + "/")):
        return str(path[len(root) :])
    return str(path)


class UploadDecodeMiddleware:
    """Copies the body of ``POST /segment`` to an :class:`UploadDecoder` as it is received.

    ``make``: the request's decoder, or None to leave it alone (decoding off, not ready, no
    valid API key, not multipart). The decoder is in ``request.state.upload_decoder``.
    """

    def __init__(self, app: ASGIApp, make: Callable[[Scope], UploadDecoder | None]) -> None:
        self.app = app
        self.make = make

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or _route_path(scope).rstrip("/") != "/segment":
            await self.app(scope, receive, send)
            return
        dec = self.make(scope)
        if dec is None:
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})["upload_decoder"] = dec

        async def tee() -> Message:
            msg = await receive()
            if msg["type"] == "http.request":
                body = msg.get("body", b"")
                if body:
                    dec.feed(body)
                if not msg.get("more_body", False):
                    dec.end()
                give_up = time.monotonic() + CATCH_UP_S
                while dec.backlog > BACKLOG_BYTES and not dec.result.done():
                    if time.monotonic() > give_up:  # a decoder this far behind isn't worth waiting for
                        dec.abort()
                        break
                    await asyncio.sleep(0.002)  # let the decoder catch up before reading on
            else:
                dec.abort()
            return msg

        try:
            await self.app(scope, tee, send)
        finally:
            dec.abort()
            dec.discard()
