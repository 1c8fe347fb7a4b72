"""schemathesis against the service's own OpenAPI schema: generated requests to every operation,
on a live server with the tiny model, and not one may get a 5xx. Every 4xx must carry the one
error shape."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from app.main import create_app
from tests.app.conftest import LiveServer, make_settings
from tests.conftest import make_tiny_checkpoint


@pytest.fixture(scope="module")
def live_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp: Path = tmp_path_factory.mktemp("schemathesis")
    app = create_app(
        make_settings(
            tmp, checkpoint=make_tiny_checkpoint(tmp), max_upload_bytes=1 << 20, max_decompressed_bytes=8 << 20
        )
    )
    with LiveServer(app) as srv:
        yield srv.url


# The schema is the app's own, taken without starting it; the requests go to the live server.
with tempfile.TemporaryDirectory() as _folder:
    schema = schemathesis.openapi.from_dict(create_app(make_settings(Path(_folder))).openapi())


@schema.parametrize()
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_one_error_shape(case: schemathesis.Case, live_url: str) -> None:
    response = case.call(base_url=live_url, timeout=60)
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text}"
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"code", "message", "request_id"}, body
