"""Worker liveness: a consumer bootstep that touches a heartbeat file from the consumer's own
event loop. The file stays fresh only while that loop runs (a hung or broker-less worker stops
touching it, and the step removes it when the consumer stops); `bitplan worker-health` checks
its age. Long tasks run in the pool, so they do not stop the beat. A second step records the
worker in the database's `workers` table for `GET /v1/status`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from celery import Celery, bootsteps

from service.db.session import Database
from service.jobs.workers import WorkerBeat, worker_id

log = logging.getLogger(__name__)


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(str(os.getpid()))
    tmp.replace(path)   # atomic: the health check never reads a half-written file


def add_heartbeat(app: Celery, path: str | Path, interval_s: float) -> None:
    """Register the heartbeat step on `app`'s consumer (before the worker starts)."""
    target = Path(path)

    class Heartbeat(bootsteps.StartStopStep):
        requires = {"celery.worker.consumer.tasks:Tasks"}   # beat once tasks are consumed

        def __init__(self, parent, **kwargs) -> None:
            super().__init__(parent, **kwargs)
            self.tref = None

        def start(self, c) -> None:
            self._beat()
            self.tref = c.timer.call_repeatedly(interval_s, self._beat)

        def stop(self, c) -> None:
            if self.tref is not None:
                self.tref.cancel()
                self.tref = None
            target.unlink(missing_ok=True)

        shutdown = stop

        def _beat(self) -> None:
            try:
                touch(target)
            except OSError as exc:   # a full disk must not kill the consumer; the check fails
                log.warning("heartbeat %s not written: %s", target, exc)

    app.steps["consumer"].add(Heartbeat)


def add_worker_beat(app: Celery, db: Database, every_s: float) -> None:
    """Register a consumer step that records this worker in the `workers` table every
    `every_s` seconds (service.jobs.workers), so `GET /v1/status` lists it with its queues."""

    class WorkerRowBeat(bootsteps.StartStopStep):
        requires = {"celery.worker.consumer.tasks:Tasks"}

        def __init__(self, parent, **kwargs) -> None:
            super().__init__(parent, **kwargs)
            self.beat: WorkerBeat | None = None

        def start(self, c) -> None:
            try:
                queues = sorted(q.name for q in c.task_consumer.queues)
            except AttributeError:   # no consumer queues known yet
                queues = []
            self.beat = WorkerBeat(db, worker_id("celery"), "celery", queues, every_s).start()

        def stop(self, c) -> None:
            if self.beat is not None:
                self.beat.stop()
                self.beat = None

        shutdown = stop

    app.steps["consumer"].add(WorkerRowBeat)
