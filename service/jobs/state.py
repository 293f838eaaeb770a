"""The job state machine: queued → running → succeeded | failed, with stage and progress.

Claiming is idempotent: a terminal job is never run again (a redelivered task is a no-op), a job
whose dependency has not succeeded waits, and a `running` job may be claimed again (its worker
died and the broker redelivered it with acks_late; every stage's writes are upserts).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.db.models import TERMINAL, Job, JobStatus, utcnow
from service.db.session import Database, serialize_on

log = logging.getLogger(__name__)
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class Claim:
    job_id: str
    kind: str
    attempt: int


class JobFailed(Exception):
    """A job that cannot succeed; `code` and the message are shown to the user."""

    def __init__(self, message: str, code: str = "job_failed") -> None:
        super().__init__(message)
        self.code = code


class JobCancelled(Exception):
    """Raised inside a running stage (at its next progress report) once its team cancelled the
    job; the runner records nothing more and the stage removes what it had half written."""


def _lock(s: Session, job_id: str) -> Job | None:
    """The job, locked until commit (FOR UPDATE; on SQLite the database's write lock), so two
    claims of one job cannot both see it free."""
    serialize_on(s, Job.id, job_id)
    return s.scalar(select(Job).where(Job.id == job_id))


def _history(job: Job, stage: str) -> list:
    hist = list(job.history or [])
    if not hist or hist[-1][0] != stage:
        hist.append([stage, utcnow().isoformat()])
    return hist


def _aware(t: datetime | None) -> datetime | None:
    return t.replace(tzinfo=UTC) if t is not None and t.tzinfo is None else t


def claim(db: Database, job_id: str, stage: str, lease_s: float = 20.0,
          owner: str | None = None) -> Claim | None:
    """Mark the job running and return it, or None when there is nothing to do (yet): it is
    finished, waits on another job, or runs elsewhere with a fresh heartbeat (a duplicate
    delivery). A running job whose heartbeat is older than `lease_s` is claimed again.
    `owner`: the in-process owner id (service.jobs.owner) whose lock this process holds."""
    with db.session() as s:
        job = _lock(s, job_id)
        if job is None:
            log.warning("job %s does not exist; dropping the task", job_id)
            return None
        if job.status in TERMINAL:
            log.info("job %s already %s; redelivery is a no-op", job_id, job.status)
            return None
        beat = _aware(job.heartbeat_at)
        if job.status == JobStatus.RUNNING and beat is not None and \
                (utcnow() - beat).total_seconds() < lease_s:
            log.info("job %s is running elsewhere (%s); duplicate delivery skipped", job_id,
                     job.worker)
            return None
        if job.depends_on:
            dep = s.get(Job, job.depends_on)
            if dep is not None and dep.status == JobStatus.FAILED:
                _fail(job, f"{dep.kind} job {dep.id} failed: {dep.error}", "dependency_failed")
                return None
            if dep is not None and dep.status == JobStatus.CANCELLED:
                _fail(job, f"{dep.kind} job {dep.id} was cancelled", "dependency_cancelled")
                return None
            if dep is not None and dep.status != JobStatus.SUCCEEDED:
                log.info("job %s waits for %s (%s)", job_id, dep.id, dep.status)
                return None
        job.status = JobStatus.RUNNING
        job.attempts += 1
        job.stage = stage
        job.history = _history(job, stage)
        job.worker = WORKER_ID
        job.owner = owner
        job.started_at = job.started_at or utcnow()
        job.heartbeat_at = job.updated_at = utcnow()
        job.error = job.error_code = None
        return Claim(job.id, job.kind, job.attempts)


def heartbeat(db: Database, job_id: str) -> None:
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING)
                  .values(heartbeat_at=utcnow()))


class Heartbeat:
    """Keeps a running job's heartbeat fresh from a background thread while its stage runs."""

    def __init__(self, db: Database, job_id: str, every_s: float) -> None:
        self.db, self.job_id, self.every_s = db, job_id, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"heartbeat-{job_id[:8]}")

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                heartbeat(self.db, self.job_id)
            except Exception:  # a missed beat is not fatal
                log.warning("job %s: heartbeat failed", self.job_id, exc_info=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def set_progress(db: Database, job_id: str, stage: str, progress: float) -> None:
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None or job.status in TERMINAL:
            return
        job.progress = min(max(float(progress), 0.0), 1.0)
        if stage != job.stage:
            job.stage = stage
            job.history = _history(job, stage)
        job.heartbeat_at = job.updated_at = utcnow()


def succeed(db: Database, job_id: str, result: dict | None = None, **links: str | None) -> None:
    with db.session() as s:
        job = _lock(s, job_id)
        if job is None or job.status == JobStatus.CANCELLED:   # cancelled at the very end
            return
        job.status = JobStatus.SUCCEEDED
        job.stage = "done"
        job.history = _history(job, "done")
        job.progress = 1.0
        job.result = result or {}
        for k, v in links.items():
            setattr(job, k, v)
        job.error = job.error_code = None
        job.finished_at = job.updated_at = utcnow()


def park(db: Database, job_id: str, stage: str) -> None:
    """Running → queued under `stage`: the job waits for the shards it fanned out, whose chord
    (or, failing that, a sweeper) sends it again."""
    with db.session() as s:
        job = _lock(s, job_id)
        if job is None or job.status != JobStatus.RUNNING:
            return
        job.status = JobStatus.QUEUED
        job.stage = stage
        job.history = _history(job, stage)
        job.owner = None
        job.updated_at = utcnow()


def children(db: Database, job_id: str) -> list[Job]:
    """The shard jobs of `job_id`, oldest first (detached rows)."""
    with db.session() as s:
        return list(s.scalars(select(Job).where(Job.parent_id == job_id)
                              .order_by(Job.created_at, Job.id)))


def _fail(job: Job, message: str, code: str) -> None:
    job.status = JobStatus.FAILED
    job.error = message[:4000]
    job.error_code = code
    job.history = _history(job, "failed")
    job.finished_at = job.updated_at = utcnow()


def fail(db: Database, job_id: str, message: str, code: str = "job_failed") -> list[str]:
    """Fail the job, every job waiting on it, and — for a profile shard — the profile job it
    belongs to (and so that one's dependents); returns the ids failed."""
    failed: list[str] = []
    with db.session() as s:
        pending = [(job_id, message, code)]
        while pending:
            jid, msg, why = pending.pop()
            job = _lock(s, jid)
            if job is None or job.status in TERMINAL:
                continue
            _fail(job, msg, why)
            failed.append(jid)
            pending += [(dep, f"depends on job {job_id}, which failed: {message}",
                         "dependency_failed")
                        for dep in s.scalars(select(Job.id).where(Job.depends_on == jid))]
            if job.parent_id:
                pending.append((job.parent_id, f"profile shard {jid} failed: {msg}", why))
    return failed


def cancel(db: Database, job_id: str) -> str:
    """Cancel a queued or running job; returns its status before. A queued job never starts; a
    running one stops at its next progress report (`check_cancelled`). A cancelled compress
    job gives its dedup key back, so compressing the plan again starts a fresh job (which
    resumes from the per-linear work already stored)."""
    with db.session() as s:
        job = _lock(s, job_id)
        if job is None:
            raise KeyError(job_id)
        before = job.status
        if job.status in TERMINAL:
            return before
        job.status = JobStatus.CANCELLED
        job.history = _history(job, "cancelled")
        if job.dedup_key and job.dedup_key.startswith("compress:"):
            job.dedup_key = None
        job.finished_at = job.updated_at = utcnow()
        for shard in s.scalars(select(Job).where(Job.parent_id == job_id,
                                                 Job.status.not_in(TERMINAL))):
            shard.status = JobStatus.CANCELLED   # a running shard stops at its next report
            shard.history = _history(shard, "cancelled")
            shard.finished_at = shard.updated_at = utcnow()
        return before


def check_cancelled(db: Database, job_id: str) -> None:
    """JobCancelled when the job has been cancelled (one indexed read)."""
    with db.session() as s:
        status = s.scalar(select(Job.status).where(Job.id == job_id))
    if status == JobStatus.CANCELLED:
        raise JobCancelled(f"job {job_id} was cancelled")


def requeue(db: Database, job_id: str, message: str) -> None:
    """A transient failure: back to queued so the retry (or a sweeper) can claim it."""
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING)
                  .values(status=JobStatus.QUEUED, error=f"retrying: {message}"[:4000],
                          updated_at=utcnow()))


def waiting_dependents(db: Database, job_id: str) -> list[tuple[str, str]]:
    """(kind, id) of queued jobs that wait on `job_id` — released when it succeeds."""
    with db.session() as s:
        rows = s.execute(select(Job.kind, Job.id).where(Job.depends_on == job_id,
                                                        Job.status == JobStatus.QUEUED)).all()
    return [(k, i) for k, i in rows]


def ready_parent(db: Database, job_id: str) -> list[tuple[str, str]]:
    """(kind, id) of the queued parent of `job_id` when every one of its shards succeeded."""
    with db.session() as s:
        parent_id = s.scalar(select(Job.parent_id).where(Job.id == job_id))
        if parent_id is None:
            return []
        parent = s.get(Job, parent_id)
        left = s.scalar(select(func.count()).select_from(Job).where(
            Job.parent_id == parent_id, Job.status != JobStatus.SUCCEEDED))
        if parent is None or parent.status != JobStatus.QUEUED or left:
            return []
        return [(parent.kind, parent.id)]


class Reporter:
    """The progress callback handed to stages: writes at most every `interval` seconds, and
    always when the stage name changes."""

    def __init__(self, db: Database, job_id: str, interval: float = 0.5,
                 span: tuple[float, float] = (0.0, 1.0)) -> None:
        self.db, self.job_id, self.interval, self.span = db, job_id, interval, span
        self._last = 0.0
        self._stage: str | None = None

    def __call__(self, stage: str, fraction: float) -> None:
        # every report is a point where a cancelled job stops (per linear while compressing)
        check_cancelled(self.db, self.job_id)
        now = time.monotonic()
        if stage == self._stage and now - self._last < self.interval and fraction < 1.0:
            return
        lo, hi = self.span
        self._stage, self._last = stage, now
        set_progress(self.db, self.job_id, stage, lo + (hi - lo) * max(0.0, min(1.0, fraction)))
