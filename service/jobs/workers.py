"""Which processes run jobs, as their own heartbeats say: each Celery worker (a consumer
bootstep, workers/health.py) and each embedded server's in-process pool upserts its row in
`workers` every few seconds; `GET /v1/status` counts queued and running jobs per queue and lists
the workers seen within a window. A table written by heartbeats, not a scheduler: nothing here
assigns work."""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select

from service.db.models import Job, JobStatus, WorkerRow, utcnow
from service.db.session import Database
from service.db.upsert import upsert
from service.jobs.registry import TASK_OF_KIND, TASKS, QueueName

log = logging.getLogger(__name__)


def worker_id(tag: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{tag}"


def beat(db: Database, wid: str, kind: str, queues: list[str]) -> None:
    """Record that worker `wid` is alive now (an idempotent upsert)."""
    now = utcnow()
    with db.session() as s:
        upsert(s, WorkerRow.__table__, [{"id": wid, "kind": kind, "host": socket.gethostname(),
                                         "pid": os.getpid(), "queues": queues,
                                         "started_at": now, "seen_at": now}],
               keys=["id"], update_cols=["seen_at", "queues"])


class WorkerBeat:
    """Calls `beat` every `every_s` seconds from a daemon thread until stopped."""

    def __init__(self, db: Database, wid: str, kind: str, queues: list[str],
                 every_s: float) -> None:
        self.db, self.wid, self.kind, self.queues, self.every_s = db, wid, kind, queues, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bitplan-worker-beat")

    def _run(self) -> None:
        while True:
            try:
                beat(self.db, self.wid, self.kind, self.queues)
            except Exception:  # the database may be down (or not migrated yet); beat again
                log.warning("worker heartbeat not recorded", exc_info=True)
            if self._stop.wait(self.every_s):
                return

    def start(self) -> WorkerBeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass(frozen=True)
class QueueCounts:
    queued: int
    running: int
    mine_queued: int
    mine_running: int


def queue_counts(db: Database, team_id: str) -> dict[str, QueueCounts]:
    """Queued and running jobs per queue (all teams, and this team's own), from the jobs table
    (the broker's own depth would miss jobs waiting on a dependency)."""
    queue_of = {kind: TASKS[task].queue.value for kind, task in TASK_OF_KIND.items()}
    counts = {q.value: [0, 0, 0, 0] for q in QueueName}
    with db.session() as s:
        rows = s.execute(select(Job.kind, Job.status, Job.team_id, func.count())
                         .where(Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
                         .group_by(Job.kind, Job.status, Job.team_id)).all()
    for kind, status, owner_team, n in rows:
        mine = owner_team == team_id
        c = counts.setdefault(queue_of.get(kind, "other"), [0, 0, 0, 0])
        i = 0 if status == JobStatus.QUEUED else 1
        c[i] += n
        if mine:
            c[i + 2] += n
    return {q: QueueCounts(*c) for q, c in counts.items()}


def recent_workers(db: Database, within_s: float) -> list[WorkerRow]:
    since: datetime = utcnow() - timedelta(seconds=within_s)
    with db.session() as s:
        return list(s.scalars(select(WorkerRow).where(WorkerRow.seen_at >= since)
                              .order_by(WorkerRow.seen_at.desc())))
