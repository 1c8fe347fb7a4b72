"""The app factory. ``uvicorn app.main:app`` serves it; run one process per GPU.

The lifespan loads the checkpoint (the bundled demo model when none is configured), warms the
model up, starts the one worker that owns the device (which first runs one whole synthetic job)
and a retention sweeper, and only then reports ready. A checkpoint that fails to load stops
startup with its message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import fastapi_offline
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.types import Scope

import segcore
from app.deps import api_key_ok, require_api_key, root_path
from app.errors import register_error_handlers
from app.metrics import Metrics
from app.middleware import JsonCORSMiddleware, RequestContextMiddleware, configure_logging
from app.routes import health, segment
from app.settings import Settings, get_settings
from app.store import ResultStore
from app.upload import UploadDecodeMiddleware, UploadDecoder, decoder_for
from app.worker import InferenceWorker
from segcore.errors import CheckpointError
from segcore.inference import Engine

log = logging.getLogger("kitseg.app")


def _load(settings: Settings) -> Engine:
    compile = settings.compile
    if not settings.warmup:
        # The warm-up is where compiling is paid for, once, before the service says it is ready.
        # Without it the first request would pay (10-50 s on a 2-core CPU): auto stays eager.
        if compile == "auto":
            compile = "off"
        elif compile == "on":
            log.warning("KITSEG_COMPILE=on with KITSEG_WARMUP=false: the first request compiles the network")
    engine = Engine.from_checkpoint(
        [str(p) for p in settings.checkpoint_paths],
        device=settings.device,
        batch_size=settings.batch_size,
        precision=settings.precision,
        mirror=settings.mirror,
        backend=settings.backend,
        body_crop=settings.body_crop,
        compile=compile,
    )
    if settings.warmup:
        if engine.compiled:
            log.info(
                "compiling the network (torch.compile; KITSEG_COMPILE=off skips it): 40-50 s on a "
                "2-core CPU with a fresh inductor cache, 10-20 s with a warm one"
            )
        engine.warmup()
    return engine


async def sweep_once(app: FastAPI) -> None:
    """The periodic housekeeping: expired results go, and the accepted jobs and spooled uploads of
    a replica that has ended (one sharing the result folder: crashed, killed, scaled down) are
    taken over now, not at this process's next start."""
    store: ResultStore = app.state.store
    worker: InferenceWorker = app.state.worker
    with suppress(Exception):
        await run_in_threadpool(store.sweep)
    if not worker.accepting:  # draining: what an ended replica left waits for the next start
        return
    with suppress(Exception):
        await run_in_threadpool(store.sweep_spool)
        adopted = await run_in_threadpool(store.adopt_pending)
        resumed = await run_in_threadpool(worker.restore, adopted) if adopted else 0
        if app.state.metrics is not None:
            app.state.metrics.resumed.inc(resumed)


async def _sweeper(app: FastAPI, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        await sweep_once(app)


def _mount_docs(app: FastAPI) -> None:
    """Swagger UI and ReDoc from local files (hospital networks often have no internet; the
    default pages load their JavaScript from a CDN and stay blank without one)."""
    static = Path(fastapi_offline.__file__).parent / "static"
    app.mount("/static-docs", StaticFiles(directory=static), name="static-docs")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = root_path(request)  # behind a proxy's path prefix
        return get_swagger_ui_html(
            openapi_url=root + (app.openapi_url or "/openapi.json"),
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}/static-docs/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/static-docs/swagger-ui.css",
            swagger_favicon_url=f"{root}/static-docs/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = root_path(request)
        return get_redoc_html(
            openapi_url=root + (app.openapi_url or "/openapi.json"),
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}/static-docs/redoc.standalone.js",
            redoc_favicon_url=f"{root}/static-docs/favicon.png",
        )


def create_app(settings: Settings | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        s = settings or get_settings()
        app.state.settings = s
        configure_logging(s.log_level)
        app.state.ready = False
        app.state.draining = False
        store = ResultStore(s.result_dir, s.result_ttl_s)
        app.state.store = store
        try:
            engine = await run_in_threadpool(_load, s)
            worker = InferenceWorker(engine, s, store, metrics=app.state.metrics)
            worker.start()
            await run_in_threadpool(worker.wait_warm)
            # Accepted jobs a process that died left behind (wait=false), before anything new.
            resumed = worker.restore(await run_in_threadpool(store.adopt_pending))
        except (CheckpointError, RuntimeError, OSError, ValueError) as e:
            log.error("startup failed: %s", e)
            store.close()
            raise RuntimeError(f"kitseg cannot start: {e}") from e
        app.state.worker = worker
        if app.state.metrics is not None:
            app.state.metrics.watch(
                queued=worker.queue.qsize,
                busy=lambda: float(worker.busy.is_set()),
                ready=lambda: float(app.state.ready and not getattr(app.state, "draining", False)),
            )
            app.state.metrics.resumed.inc(resumed)
            if engine.device.type == "cuda":
                dev = engine.device
                app.state.metrics.watch_gpu(
                    allocated=lambda: float(torch.cuda.memory_allocated(dev)),
                    reserved=lambda: float(torch.cuda.memory_reserved(dev)),
                    peak=lambda: float(torch.cuda.max_memory_allocated(dev)),
                )
        sweeper = asyncio.create_task(_sweeper(app, max(5.0, min(60.0, s.result_ttl_s / 4))))
        app.state.ready = True
        log.info(
            "ready: model %s on %s (%s%s, %s%s)%s",
            engine.meta.name,
            engine.device,
            engine.backend,
            ", compiled" if engine.compiled else "",
            engine.precision,
            ", mirrored" if engine.mirror else "",
            " [demo model: synthetic phantoms, not for clinical use]" if s.is_demo else "",
        )
        try:
            yield
        finally:
            app.state.ready = False
            sweeper.cancel()
            await run_in_threadpool(worker.stop)
            if s.purge_results_on_shutdown:
                await run_in_threadpool(store.purge)
            store.close()  # what the drain didn't finish stays for the next start
            log.info("stopped")

    s0 = settings or get_settings()
    app = FastAPI(
        title="kitseg",
        version=segcore.__version__,
        summary="Kidney and kidney-tumor CT segmentation (KiTS labels: kidney, tumor, cyst)",
        description=(
            "Upload a CT volume (`.nii` / `.nii.gz`) to **POST /segment**; the response has per-class statistics "
            "and a `mask_url` for a uint8 NIfTI mask on the input's own grid. With no checkpoint configured the "
            "service runs a demo model trained on synthetic phantoms: not for clinical use."
        ),
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    _mount_docs(app)
    app.state.settings = s0
    app.state.metrics = Metrics() if s0.metrics else None
    register_error_handlers(app)

    def make_decoder(scope: Scope) -> UploadDecoder | None:
        s: Settings = app.state.settings
        store: ResultStore | None = getattr(app.state, "store", None)
        if not s.decode_during_upload or store is None or not getattr(app.state, "ready", False):
            return None
        headers = Headers(scope=scope)
        if not api_key_ok(headers, s):  # no work for requests that will get 401
            return None
        return decoder_for(
            headers.get("content-type", ""), store.spool_path, s.max_upload_bytes, s.max_decompressed_bytes
        )

    # Inside the request-context middleware, so the decoder sees the body only after its size
    # and time limits.
    app.add_middleware(UploadDecodeMiddleware, make=make_decoder)
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=s0.max_upload_bytes,
        body_timeout_s=s0.upload_timeout_s,
        metrics=app.state.metrics,
    )
    if s0.cors_origins:  # outermost: every response, errors included, carries the CORS headers
        app.add_middleware(JsonCORSMiddleware, origins=s0.cors_origins, private_network=s0.cors_private_network)
    app.include_router(health.router)
    app.include_router(segment.router, dependencies=[Depends(require_api_key)])
    return app


app = create_app()
