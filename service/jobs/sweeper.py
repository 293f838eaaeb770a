"""Re-enqueue jobs that nobody is running: queued jobs whose message may be gone (the in-process
queue died with its process, or a broker lost its data) and running jobs whose heartbeat went
stale (their worker died). Safe to repeat: claims are idempotent and duplicates are skipped."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from sqlalchemy import or_, select

from service.db.models import Job, JobStatus, utcnow
from service.db.session import Database
from service.jobs.queue import Queue

log = logging.getLogger(__name__)


def stalled_jobs(db: Database, lease_s: float, queued_older_than_s: float = 0.0
                 ) -> list[tuple[str, str]]:
    """(kind, id) of jobs to hand to the queue again."""
    from service.jobs.runner import KIND_TASK

    now = utcnow()
    stale = now - timedelta(seconds=lease_s)
    old = now - timedelta(seconds=queued_older_than_s)
    with db.session() as s:
        rows = s.execute(select(Job.kind, Job.id, Job.depends_on, Job.status).where(or_(
            (Job.status == JobStatus.QUEUED) & (Job.updated_at <= old),
            (Job.status == JobStatus.RUNNING) & (or_(Job.heartbeat_at.is_(None),
                                                     Job.heartbeat_at <= stale))))).all()
        out = []
        for kind, job_id, dep, _status in rows:
            if dep is not None:
                dep_status = s.scalar(select(Job.status).where(Job.id == dep))
                if dep_status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, None):
                    continue        # still waiting: its dependency will release it
            if kind in KIND_TASK:
                out.append((kind, job_id))
    return out


def sweep(db: Database, queue: Queue, lease_s: float, queued_older_than_s: float = 0.0) -> int:
    from service.jobs.runner import KIND_TASK

    jobs = stalled_jobs(db, lease_s, queued_older_than_s)
    for kind, job_id in jobs:
        queue.enqueue(KIND_TASK[kind], job_id)
    if jobs:
        log.info("re-enqueued %d stalled job(s)", len(jobs))
    return len(jobs)


class SweepLoop:
    """Runs `sweep` every `interval_s` on a daemon thread (Celery mode: the broker may lose
    messages when Redis restarts without persistence, and a killed worker's running job waits
    for its lease to expire). Queued jobs are re-sent only once they are `requeue_after_s` old,
    so a healthy backlog is not flooded with duplicates (which would be no-ops anyway)."""

    def __init__(self, db: Database, queue: Queue, lease_s: float, interval_s: float,
                 requeue_after_s: float) -> None:
        self.db, self.queue = db, queue
        self.lease_s, self.interval_s, self.requeue_after_s = lease_s, interval_s, requeue_after_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bitplan-sweeper")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                sweep(self.db, self.queue, self.lease_s, self.requeue_after_s)
            except Exception:  # noqa: BLE001 - the database or broker may be down; try again
                log.warning("sweep failed; retrying in %.0fs", self.interval_s, exc_info=True)

    def start(self) -> SweepLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
