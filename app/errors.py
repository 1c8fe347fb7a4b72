"""HTTP errors: one JSON shape ``{"code", "message", "request_id"}`` for every failure.

Domain exceptions from ``segcore`` and this package are mapped here, and only here, to status
codes; unexpected exceptions become a 500 without a traceback in the body.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from segcore.errors import InvalidVolume, KitsegError, NotNifti, VolumeTooLarge

log = logging.getLogger("kitseg.errors")


class APIError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class PayloadTooLarge(APIError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(APIError):
    status, code = 415, "unsupported_media_type"


class BadUpload(APIError):
    status, code = 422, "bad_upload"


class NotFound(APIError):
    status, code = 404, "not_found"


class NotFinished(APIError):
    status, code = 409, "not_finished"


class KeyInUse(APIError):
    """A POST with an Idempotency-Key that another request, still being accepted, holds."""

    status, code = 409, "idempotency_key_in_use"


class KeyReused(APIError):
    """A POST with an Idempotency-Key that was sent with another file."""

    status, code = 422, "idempotency_key_reused"


class Unauthorized(APIError):
    status, code = 401, "unauthorized"


class Overloaded(APIError):
    status, code = 503, "overloaded"


class NotReady(APIError):
    status, code = 503, "not_ready"


class DeadlineExceeded(APIError):
    status, code = 504, "deadline_exceeded"


class InsufficientStorage(APIError):
    status, code = 507, "insufficient_storage"


class OutOfMemory(APIError):
    status, code = 507, "out_of_memory"


DOMAIN_STATUS: dict[type[KitsegError], tuple[int, str]] = {
    VolumeTooLarge: (413, "payload_too_large"),
    NotNifti: (415, "unsupported_media_type"),
    InvalidVolume: (422, "invalid_volume"),
}


def request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", "-"))


def error_response(
    request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"code": code, "message": message, "request_id": request_id(request)},
        status_code=status,
        headers={**(headers or {}), "X-Request-ID": request_id(request)},
    )


def domain_status(exc: KitsegError) -> tuple[int, str]:
    for klass, (status, code) in DOMAIN_STATUS.items():
        if isinstance(exc, klass):
            return status, getattr(exc, "code", code) if klass is InvalidVolume else code
    return 500, "internal_error"


def describe(exc: BaseException) -> tuple[int, str, str, dict[str, str]]:
    """``(status, code, message, headers)`` for a failed job, as the handlers below answer it;
    for a job whose client doesn't wait (``POST /segment?wait=false``), kept until it asks."""
    if isinstance(exc, APIError):
        return exc.status, exc.code, exc.message, exc.headers
    if isinstance(exc, KitsegError):
        status, code = domain_status(exc)
        return status, code, str(exc), {}
    return 500, "internal_error", "internal server error; see the server log for this request_id", {}


def register_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    @app.exception_handler(KitsegError)
    async def _known(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request, *describe(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()))
            parts.append(f"{loc}: {e.get('msg', 'invalid')}")
        return error_response(request, 422, "validation_error", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {
            400: "bad_request",
            404: "not_found",
            405: "method_not_allowed",
            408: "request_timeout",
            413: "payload_too_large",
        }.get(exc.status_code, "http_error")
        return error_response(request, exc.status_code, code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"request_id": request_id(request)})
        return error_response(
            request, 500, "internal_error", "internal server error; see the server log for this request_id"
        )
