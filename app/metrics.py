"""Prometheus metrics, served at ``GET /metrics`` (prometheus-client's text format).

What a deployment watches: requests by route and status and their durations, every job's stages
(the breakdown of ``timings_ms``) and outcome, the queue, readiness, jobs taken over from a
process that died, the process (memory, CPU, open files) and, on a CUDA worker, GPU memory. Labels are route templates (``/segmentations/{rid}``), methods, statuses, stage
names and error codes: never a result id, a file name or anything from a volume.

Each app has its own registry, so several apps in one process (the tests) don't share counts.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from starlette.types import Scope

#: seconds; a request is a health check (ms) or a segmentation (0.1 s on a GPU, minutes on a CPU)
REQUEST_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
CONTENT_TYPE = CONTENT_TYPE_LATEST


def route_template(scope: Scope) -> str:
    """The matched route's path template, or ``unmatched`` (a 404 for an unknown path): never
    the path itself, whose ids would make a new series per result."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else "unmatched"


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.requests = Counter(
            "kitseg_http_requests",
            "HTTP requests by method, route and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "kitseg_http_request_duration_seconds",
            "time from the request's first byte to its answer's last, by method and route",
            ["method", "route"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "kitseg_job_stage_seconds",
            "time of each stage of a finished segmentation job (the result's timings_ms)",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.jobs = Counter(
            "kitseg_jobs", "segmentation jobs by outcome: ok, cancelled, or the error's code", ["outcome"], registry=r
        )
        self.queued = Gauge("kitseg_queue_jobs", "jobs waiting for the worker", registry=r)
        self.busy = Gauge("kitseg_worker_busy", "1 while the worker runs a job", registry=r)
        self.ready = Gauge(
            "kitseg_ready", "1 when the model is loaded and warm and the service accepts work", registry=r
        )
        self.resumed = Counter(
            "kitseg_jobs_resumed",
            "accepted wait=false jobs that an ended process (killed, crashed) left and this one took over at start",
            registry=r,
        )

    def observe_request(self, scope: Scope, status: int, seconds: float) -> None:
        method, route = str(scope.get("method", "")), route_template(scope)
        self.requests.labels(method, route, str(status)).inc()
        self.request_seconds.labels(method, route).observe(seconds)

    def observe_job(self, outcome: str, timings_ms: dict[str, float] | None = None) -> None:
        self.jobs.labels(outcome).inc()
        for stage, ms in (timings_ms or {}).items():
            if stage != "total":
                self.stage_seconds.labels(stage).observe(ms / 1000.0)

    def watch(self, queued: Callable[[], float], busy: Callable[[], float], ready: Callable[[], float]) -> None:
        """Read the gauges from the service's state at each scrape."""
        self.queued.set_function(queued)
        self.busy.set_function(busy)
        self.ready.set_function(ready)

    def watch_gpu(
        self, allocated: Callable[[], float], reserved: Callable[[], float], peak: Callable[[], float]
    ) -> None:
        """On a CUDA worker: the device memory torch's caching allocator holds, read at each
        scrape (``torch.cuda.memory_allocated``, ``memory_reserved``, ``max_memory_allocated``)."""
        r = self.registry
        for name, doc, read in (
            ("allocated", "GPU memory in tensors now", allocated),
            ("reserved", "GPU memory torch's caching allocator holds (what nvidia-smi counts for it)", reserved),
            ("peak", "the most GPU memory in tensors at once since the start", peak),
        ):
            Gauge(f"kitseg_gpu_memory_{name}_bytes", doc, registry=r).set_function(read)

    def render(self) -> bytes:
        return generate_latest(self.registry)
