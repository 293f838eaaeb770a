"""The FastAPI app factory: `create_app(settings)` wires the database, the queue, the error
handlers and the /v1 routes. OpenAPI lives at /docs."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.api import errors, ui
from service.api.media import JsonBodies
from service.api.routes import admin, artifacts, health, jobs, models, plans
from service.api.schemas import ErrorResponse
from service.db.session import get_database
from service.jobs.queue import QUEUES, InProcessQueue, Queue
from service.jobs.runner import make_queue
from service.jobs.sweeper import SweepLoop, sweep
from service.jobs.workers import WorkerBeat, worker_id
from service.settings import Settings, get_settings

log = logging.getLogger(__name__)


class BodyLimit:
    """Pure ASGI middleware: 413 for request bodies over `limit` bytes (declared or streamed)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and not length.isdigit():
            return await self._reject(send, 400, "bad_request",
                                      "Content-Length must be a non-negative integer")
        if length is not None and int(length) > self.limit:
            return await self._reject(send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return msg

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send, status: int = 413, code: str = "payload_too_large",
                      message: str | None = None) -> None:
        message = message or f"request body over {self.limit} bytes"
        body = json.dumps({"error": {"code": code, "message": message}}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def create_app(settings: Settings | None = None, *, queue: Queue | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sweeper = beat = None
        if isinstance(app.state.queue, InProcessQueue):
            # this process runs jobs: it shows in GET /v1/status while its heartbeat is fresh
            beat = WorkerBeat(app.state.db, worker_id("inprocess"), "inprocess",
                              list(QUEUES), settings.worker_heartbeat_s).start()
            # embedded: resume at once what a restart cut (queued jobs, and the running jobs of
            # the dead server that owned them), without waiting for any lease
            threading.Thread(target=_resume, args=(app,), daemon=True,
                             name="bitplan-resume").start()
        if settings.sweep_interval_s > 0:
            # both modes: re-send what a broker lost, and jobs whose worker died (lease expired)
            sweeper = SweepLoop(app.state.db, app.state.queue, settings.job_lease_s,
                                settings.sweep_interval_s, settings.requeue_after_s).start()
        yield
        if sweeper is not None:
            sweeper.stop()
        if beat is not None:
            beat.stop()
        if app.state.owns_queue:
            app.state.queue.close()

    app = FastAPI(title="bitplan", version="1",
                  description="Optimal per-layer (bits, rank) plans for CALDERA-style LLM "
                              "compression under a byte budget.",
                  lifespan=lifespan,
                  responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse},
                             404: {"model": ErrorResponse}, 422: {"model": ErrorResponse}})
    app.state.settings = settings
    app.state.db = get_database(settings.resolved_database_url)
    app.state.owns_queue = queue is None
    app.state.queue = queue if queue is not None else make_queue(settings)
    errors.install(app)
    app.include_router(health.router)
    for mod in (plans, jobs, models, artifacts, admin):
        app.include_router(mod.router, prefix="/v1")
    ui.install(app)
    app.add_middleware(JsonBodies)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app


def _resume(app: FastAPI) -> None:
    try:
        sweep(app.state.db, app.state.queue, app.state.settings.job_lease_s)
    except Exception:  # e.g. the schema is not migrated yet
        log.warning("could not resume unfinished jobs", exc_info=True)
