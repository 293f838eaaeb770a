"""Re-enqueue jobs that nobody is running: queued jobs whose message may be gone (the in-process
queue died with its process, or a broker lost its data), running jobs whose in-process owner is
provably dead (service.jobs.owner: at once, whatever their heartbeat), and running jobs whose
heartbeat went stale (their worker died). Safe to repeat: claims are atomic and idempotent, and
a job with a fresh heartbeat is never taken."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from sqlalchemy import or_, select, update

from service.db.models import TERMINAL, Job, JobStatus, utcnow
from service.db.session import Database
from service.jobs import owner
from service.jobs.queue import Queue
from service.jobs.registry import TASK_OF_KIND

log = logging.getLogger(__name__)


def reclaim_orphans(db: Database) -> list[tuple[str, str]]:
    """(kind, id) of running jobs whose owner's lock nobody holds, now queued again. The update
    is conditional on the same owner, so two sweepers (or a claim in between) cannot both win."""
    with db.session() as s:
        rows = s.execute(select(Job.kind, Job.id, Job.owner).where(
            Job.status == JobStatus.RUNNING, Job.owner.is_not(None),
            Job.owner != owner.OWNER_ID)).all()
    dead = {o for o in {r.owner for r in rows} if owner.is_dead(db, o)}
    out = []
    for kind, job_id, job_owner in rows:
        if job_owner not in dead:
            continue
        with db.session() as s:
            n = s.execute(update(Job).where(
                Job.id == job_id, Job.status == JobStatus.RUNNING, Job.owner == job_owner)
                .values(status=JobStatus.QUEUED, owner=None, updated_at=utcnow())).rowcount
        if n:
            log.info("job %s: its owner %s is gone; re-queued", job_id, job_owner)
            out.append((kind, job_id))
    return out


def stalled_jobs(db: Database, lease_s: float, queued_older_than_s: float = 0.0
                 ) -> list[tuple[str, str]]:
    """(kind, id) of jobs to hand to the queue again."""
    now = utcnow()
    stale = now - timedelta(seconds=lease_s)
    old = now - timedelta(seconds=queued_older_than_s)
    with db.session() as s:
        rows = s.execute(select(Job.kind, Job.id, Job.depends_on, Job.status).where(or_(
            (Job.status == JobStatus.QUEUED) & (Job.updated_at <= old),
            (Job.status == JobStatus.RUNNING) & (or_(Job.heartbeat_at.is_(None),
                                                     Job.heartbeat_at <= stale))))).all()
        out = []
        for kind, job_id, dep, status in rows:
            if dep is not None:
                dep_status = s.scalar(select(Job.status).where(Job.id == dep))
                if dep_status not in (*TERMINAL, None):
                    continue        # still waiting: its dependency will release it
            if kind in TASK_OF_KIND:
                out.append((kind, job_id))
                if status == JobStatus.QUEUED:   # re-sent: not again for another interval
                    s.execute(update(Job).where(Job.id == job_id,
                                                Job.status == JobStatus.QUEUED)
                              .values(updated_at=now))
    return out


def sweep(db: Database, queue: Queue, lease_s: float, queued_older_than_s: float = 0.0) -> int:
    jobs = reclaim_orphans(db)
    jobs += [j for j in stalled_jobs(db, lease_s, queued_older_than_s) if j not in jobs]
    for kind, job_id in jobs:
        queue.enqueue(TASK_OF_KIND[kind], job_id)
    if jobs:
        log.info("re-enqueued %d stalled job(s)", len(jobs))
    return len(jobs)


class SweepLoop:
    """Runs `sweep` every `interval_s` on a daemon thread, in both modes: a killed Celery
    worker's running job, or an in-process one whose heartbeat stopped, is re-sent once its
    lease expires; a broker that lost messages (Redis restarted without persistence) gets them
    again. Queued jobs are re-sent only once they are `requeue_after_s` old (and then not again
    for as long), so a healthy backlog is not flooded with duplicates."""

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
            except Exception:  # the database or broker may be down; try again
                log.warning("sweep failed; retrying in %.0fs", self.interval_s, exc_info=True)

    def start(self) -> SweepLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
