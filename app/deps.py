"""Dependency aliases, declared once."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Annotated

from fastapi import Depends, Request

from app.errors import NotReady, Unauthorized
from app.settings import Settings
from app.store import ResultStore
from app.worker import InferenceWorker


def root_path(request: Request) -> str:
    """The path prefix a reverse proxy serves the API under (``KITSEG_ROOT_PATH``, uvicorn's
    ``--root-path``), for the links a response or a docs page carries; empty without one."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def get_app_settings(request: Request) -> Settings:
    s: Settings = request.app.state.settings
    return s


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_worker(request: Request) -> InferenceWorker:
    worker: InferenceWorker | None = getattr(request.app.state, "worker", None)
    if worker is None or not getattr(request.app.state, "ready", False):
        raise NotReady("the model is not loaded yet (or the server is shutting down)", {"Retry-After": "5"})
    return worker


WorkerDep = Annotated[InferenceWorker, Depends(get_worker)]


def get_store(request: Request) -> ResultStore:
    store: ResultStore | None = getattr(request.app.state, "store", None)
    if store is None:
        raise NotReady("the result store is not initialised yet", {"Retry-After": "5"})
    return store


StoreDep = Annotated[ResultStore, Depends(get_store)]


def presented_api_key(headers: Mapping[str, str]) -> str:
    """The API key ``headers`` (lower-case names) carry, in ``X-API-Key`` or as a bearer token."""
    key = headers.get("x-api-key", "")
    auth = headers.get("authorization", "")
    if not key and auth.lower().startswith("bearer "):
        key = auth[7:].strip()
    return key


def api_key_ok(headers: Mapping[str, str], settings: Settings) -> bool:
    """Whether ``headers`` (lower-case names) carry one of ``KITSEG_API_KEYS``, or none is required."""
    if not settings.api_keys:
        return True
    key = presented_api_key(headers)
    return bool(key) and any(hmac.compare_digest(key.encode(), k.encode()) for k in settings.api_keys)


def require_api_key(request: Request, settings: SettingsDep) -> None:
    """When ``KITSEG_API_KEYS`` is set, require ``X-API-Key`` or ``Authorization: Bearer``."""
    if not api_key_ok(request.headers, settings):
        raise Unauthorized(
            "missing or invalid API key (send X-API-Key or Authorization: Bearer)", {"WWW-Authenticate": "Bearer"}
        )
