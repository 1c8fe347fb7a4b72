"""``kitseg-serve``: uvicorn with one worker process (one process per GPU: each would load its own model)."""

from __future__ import annotations

import argparse
import os

import uvicorn


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="kitseg-serve", description="Run the kitseg API (configure with KITSEG_* env vars)"
    )
    ap.add_argument("--host", default=os.environ.get("KITSEG_HOST", "127.0.0.1"))
    ap.add_argument("--port", type=int, default=int(os.environ.get("KITSEG_PORT", "8000")))
    a = ap.parse_args(argv)
    uvicorn.run("app.main:app", host=a.host, port=a.port, workers=1, timeout_graceful_shutdown=60, proxy_headers=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
