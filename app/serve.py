"""``kitseg-serve``: uvicorn with one worker process (one process per GPU: each would load its own model).

On SIGTERM or SIGINT the service drains: ``/ready`` turns 503 at once (so a load balancer stops
sending), new segmentations get 503 with Retry-After, the requests already accepted finish
(for up to ``KITSEG_DRAIN_TIMEOUT_S``), then the worker stops and the process exits. uvicorn
re-raises the signal at the end, so the exit status is the conventional 143 (128 + SIGTERM).
"""

from __future__ import annotations

import argparse
import logging
import os
from types import FrameType

import uvicorn

log = logging.getLogger("kitseg.serve")


class DrainingServer(uvicorn.Server):
    """A uvicorn server that marks the app as draining the moment a shutdown signal arrives."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        app = self.config.app
        state = getattr(app, "state", None)
        if state is not None and not getattr(state, "draining", False):
            state.draining = True
            worker = getattr(state, "worker", None)
            if worker is not None:
                worker.accepting = False
            log.info("signal %d: draining (ready=false, new work refused, accepted work finishes)", sig)
        super().handle_exit(sig, frame)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="kitseg-serve", description="Run the kitseg API (configure with KITSEG_* env vars)"
    )
    ap.add_argument("--host", default=os.environ.get("KITSEG_HOST", "127.0.0.1"))
    ap.add_argument("--port", type=int, default=int(os.environ.get("KITSEG_PORT", "8000")))
    a = ap.parse_args(argv)
    from app.main import app  # settings are read here, after argument parsing

    drain_s = app.state.settings.drain_timeout_s

    config = uvicorn.Config(
        app,
        host=a.host,
        port=a.port,
        workers=1,
        timeout_graceful_shutdown=int(drain_s),
        proxy_headers=False,
        root_path=app.state.settings.root_path,
    )
    DrainingServer(config).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
