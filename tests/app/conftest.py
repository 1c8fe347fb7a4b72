from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from training.datasets import write_kits_case
from training.synth import make_phantom


def make_settings(tmp_path: Path, **kw: object) -> Settings:
    base: dict[str, object] = {
        "result_dir": tmp_path / "results",
        "device": "cpu",
        "warmup": False,
        # Compiling the network takes 10-40 s; the tests that compile ask for it
        # (tests/segcore/test_compile.py, test_api.py's compile tests).
        "compile": "off",
        "log_level": "WARNING",
    }
    base.update(kw)
    return Settings(**base)  # type: ignore[arg-type]


@pytest.fixture
def tiny_client(tmp_path: Path, tiny_checkpoint: Path) -> Iterator[TestClient]:
    app = create_app(
        make_settings(tmp_path, checkpoint=tiny_checkpoint, max_upload_bytes=4 << 20, max_decompressed_bytes=16 << 20)
    )
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="session")
def phantom_case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A KiTS19-layout phantom (IPL, (slices, H, W)) with a tumor."""
    root = tmp_path_factory.mktemp("phantom")
    for seed in range(100, 200):
        hu, seg, sp = make_phantom(np.random.default_rng(seed), inplane=160)
        if (seg == 2).sum() > 2000 and hu.shape[0] <= 60:
            write_kits_case(root / "case_00001", hu, seg, sp)
            return root / "case_00001"
    raise AssertionError("no phantom with a tumor found")


class LiveServer:
    def __init__(self, app: FastAPI, root_path: str = "") -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = app
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on", root_path=root_path
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("live server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
