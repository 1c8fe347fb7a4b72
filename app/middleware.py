"""ASGI middleware: request ids, one structured log line per request, a body-size cap, and CORS.

The cap is enforced on the byte stream itself, so it holds for chunked uploads without a
Content-Length too; Starlette puts no size limit on multipart file parts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.metrics import Metrics

log = logging.getLogger("kitseg.access")
_RID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Multipart framing (boundary, part headers) on top of the file itself.
MULTIPART_OVERHEAD = 64 * 1024


def _request_id(sent: str) -> str:
    """The client's X-Request-ID when it is a plain token, else a new one."""
    return sent if _RID_RE.fullmatch(sent) else uuid.uuid4().hex


class JsonFormatter(logging.Formatter):
    """One JSON object per line; only whitelisted fields, never voxel data or file names."""

    FIELDS = ("request_id", "method", "path", "status", "duration_ms", "bytes_in", "result_id", "code")

    def format(self, record: logging.LogRecord) -> str:
        d: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for f in self.FIELDS:
            if hasattr(record, f):
                d[f] = getattr(record, f)
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return json.dumps(d)


def configure_logging(level: str) -> None:
    root = logging.getLogger("kitseg")
    if not any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        h = logging.StreamHandler()
        h.setFormatter(JsonFormatter())
        root.addHandler(h)
        root.propagate = False
    root.setLevel(level.upper())


class RequestContextMiddleware:
    def __init__(
        self, app: ASGIApp, max_body_bytes: int, body_timeout_s: float = 300.0, metrics: Metrics | None = None
    ) -> None:
        self.app = app
        self.max_body = max_body_bytes + MULTIPART_OVERHEAD
        self.body_timeout_s = body_timeout_s
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        rid = _request_id(headers.get("x-request-id", ""))
        scope.setdefault("state", {})["request_id"] = rid
        t0 = time.perf_counter()
        status = {"code": 0}
        received = {"n": 0}
        too_large = False
        cl = headers.get("content-length")
        if cl is not None and cl.isdigit() and int(cl) > self.max_body:
            too_large = True

        deadline = t0 + self.body_timeout_s
        body_done = {"v": False}

        async def limited_receive() -> Message:
            if body_done["v"]:
                return await receive()  # after the body: disconnect polling, no deadline
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - time.perf_counter()))
            except TimeoutError:
                # A client that trickles its upload would otherwise hold a connection and a
                # spool file for as long as it likes.
                raise HTTPException(408, f"request body not received within {self.body_timeout_s:.0f} s") from None
            if msg["type"] != "http.request" or not msg.get("more_body", False):
                body_done["v"] = True
            if msg["type"] == "http.request":
                received["n"] += len(msg.get("body", b""))
                if received["n"] > self.max_body:
                    raise HTTPException(413, f"request body exceeds {self.max_body} bytes")
            return msg

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                hdrs = list(message.get("headers", []))
                if not any(k.lower() == b"x-request-id" for k, _ in hdrs):
                    hdrs.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": hdrs}
            await send(message)

        try:
            if too_large:
                body = json.dumps(
                    {
                        "code": "payload_too_large",
                        "message": f"request body is {cl} bytes, over the limit of {self.max_body}",
                        "request_id": rid,
                    }
                ).encode()
                await send_wrapper(
                    {
                        "type": "http.response.start",
                        "status": 413,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
            await self.app(scope, limited_receive, send_wrapper)
        finally:
            seconds = time.perf_counter() - t0
            if self.metrics is not None:
                self.metrics.observe_request(scope, status["code"], seconds)
            log.info(
                "request",
                extra={
                    "request_id": rid,
                    "method": scope.get("method"),
                    "path": scope.get("path"),
                    "status": status["code"],
                    "duration_ms": round(1000 * seconds, 1),
                    "bytes_in": received["n"],
                },
            )


#: what a browser page on another origin may send, and read back, when KITSEG_CORS_ORIGINS allows it
CORS_ALLOW_HEADERS = ("X-API-Key", "Authorization", "Content-Type", "Accept", "X-Request-ID")
CORS_EXPOSE_HEADERS = ("X-Request-ID", "X-Kitseg-Statistics", "X-Kitseg-Result", "Location", "Retry-After")


class JsonCORSMiddleware(CORSMiddleware):
    """Starlette's CORS middleware, outside every other layer so that errors (401, 413, 503) carry
    its headers too and a page can read them; a refused preflight answers in the API's error
    shape instead of Starlette's plain text."""

    def __init__(self, app: ASGIApp, origins: list[str], private_network: bool = False) -> None:
        super().__init__(
            app,
            allow_origins=origins,
            allow_methods=("GET", "POST", "DELETE"),
            allow_headers=CORS_ALLOW_HEADERS,
            expose_headers=CORS_EXPOSE_HEADERS,
            allow_private_network=private_network,
        )

    def preflight_response(self, request_headers: Headers) -> Response:
        resp = super().preflight_response(request_headers)
        if resp.status_code < 400:
            return resp
        rid = _request_id(request_headers.get("x-request-id", ""))
        refused = bytes(resp.body).decode("utf-8", "replace")  # "Disallowed CORS origin, headers"
        keep = {k: v for k, v in resp.headers.items() if k.lower().startswith("access-control-") or k.lower() == "vary"}
        return JSONResponse(
            {
                "code": "bad_request",
                "message": f"{refused} (KITSEG_CORS_ORIGINS lists the origins that may call this API; methods "
                f"GET, POST, DELETE; headers {', '.join(CORS_ALLOW_HEADERS)})",
                "request_id": rid,
            },
            status_code=400,
            headers={**keep, "X-Request-ID": rid},
        )
