"""Runs one task for one job: claim → stage (service.jobs.stages; math lives in
compressor/solver) → record the outcome → release what waits on it. The Celery tasks and the
in-process queue both call `run_task`; only transient errors (database or broker unreachable)
propagate, so the caller retries them with backoff; everything else becomes a failed job with a
clear message."""

from __future__ import annotations

import logging
import time

from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DisconnectionError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from service.db.models import Job, JobStatus
from service.db.session import Database, get_database
from service.jobs import owner, state
from service.jobs.context import StageContext
from service.jobs.queue import CeleryQueue, InProcessQueue, Queue
from service.jobs.registry import TASK_OF_KIND, spec_of, stage_of
from service.settings import Settings

log = logging.getLogger(__name__)

MAX_TRANSIENT_RETRIES = 5


class TransientError(Exception):
    """Raise from a stage to ask for a retry with backoff."""


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TransientError | OperationalError | DisconnectionError | PoolTimeout
                      | ConnectionError | RedisConnectionError | RedisTimeoutError
                      | KombuOperationalError)


def _classify(exc: Exception) -> tuple[str, str]:
    if isinstance(exc, state.JobFailed):
        return exc.code, str(exc)
    if isinstance(exc, ValueError):   # ModelLoadError, budget errors, bad constraints
        code = {"InfeasibleBudget": "infeasible_budget", "BudgetError": "invalid_budget",
                "ModelLoadError": "invalid_model"}.get(type(exc).__name__, "invalid_input")
        return code, str(exc) or type(exc).__name__
    if isinstance(exc, MemoryError):
        return "out_of_memory", "the worker ran out of memory"
    return "internal_error", f"{type(exc).__name__}: {exc}"


def release(db: Database, queue: Queue | None, job_id: str) -> None:
    """Enqueue every queued job that waits on `job_id`, and its parked profile job when it was
    the last shard to finish (safe to repeat: claims are idempotent). The chord already sends
    that profile job; this covers a shard the sweeper re-sent outside its chord (its worker
    died), so the profile does not wait for the sweeper's next look at queued jobs."""
    if queue is None:
        return
    for kind, dep_id in [*state.waiting_dependents(db, job_id), *state.ready_parent(db, job_id)]:
        queue.enqueue(TASK_OF_KIND[kind], dep_id)


def run_task(task_name: str, job_id: str, settings: Settings, queue: Queue | None = None) -> str:
    """Returns the job's outcome for this delivery: succeeded, failed, cancelled (its team
    cancelled it while it ran: the stage stopped at its next report), waiting (back to queued
    while the tasks it fanned out run; their chord runs it again), skipped (finished, or
    waiting on a dependency that will release it), or busy: another worker holds a fresh lease
    on it — alive, or killed moments ago; the caller checks again once the lease could have
    expired (Celery: a delayed retry) so a dead worker's job does not wait for the sweeper."""
    spec = spec_of(task_name)
    db = get_database(settings.resolved_database_url)
    stage_name, fn = spec.stage_name, stage_of(task_name)
    # in-process: hold this process's liveness lock before its id goes on a job, so that a
    # restarted server can tell our jobs (never touched while we live) from a dead server's
    owner_id = owner.hold(db) if isinstance(queue, InProcessQueue) else None
    claimed = state.claim(db, job_id, stage_name, lease_s=settings.job_lease_s, owner=owner_id)
    if claimed is None:
        with db.session() as s:
            job = s.get(Job, job_id)
            status = job.status if job is not None else None
        if status == JobStatus.SUCCEEDED:  # a redelivery after success: release its dependents
            release(db, queue, job_id)
        return "busy" if status == JobStatus.RUNNING else "skipped"
    log.info("job %s (%s) attempt %d: %s", job_id, claimed.kind, claimed.attempt, task_name)
    ctx = StageContext(db, settings, job_id, queue, state.Reporter(db, job_id))
    try:
        with state.Heartbeat(db, job_id, every_s=max(settings.job_lease_s / 4, 0.5)):
            out = fn(ctx)
    except state.JobCancelled:
        log.info("job %s: cancelled; stopped", job_id)
        return "cancelled"
    except Exception as exc:
        if is_transient(exc):
            log.warning("job %s: transient error, will retry: %s", job_id, exc)
            try:
                state.requeue(db, job_id, str(exc))
            except Exception:  # the database may be the thing that is down
                log.warning("job %s: could not record the retry", job_id)
            raise
        code, message = _classify(exc)
        if code == "internal_error":
            log.exception("job %s failed", job_id)
        else:
            log.warning("job %s failed (%s): %s", job_id, code, message)
        state.fail(db, job_id, message, code)
        return "failed"
    if out.waiting is not None:   # parked first, so a body that runs at once finds it queued
        state.park(db, job_id, out.waiting)
        if out.fan_out is not None and queue is not None:
            queue.fan_out(*out.fan_out)
        return "waiting"
    state.succeed(db, job_id, out.result, **out.links)
    release(db, queue, job_id)
    for task, follow_id in out.follow_ups:
        if queue is not None:
            queue.enqueue(task, follow_id)
    return "succeeded"


def run_with_retries(task_name: str, job_id: str, settings: Settings,
                     queue: Queue | None = None) -> str:
    """The in-process queue's retry policy (Celery's tasks do the same with self.retry)."""
    for attempt in range(MAX_TRANSIENT_RETRIES + 1):
        try:
            return run_task(task_name, job_id, settings, queue)
        except Exception as exc:
            if not is_transient(exc) or attempt == MAX_TRANSIENT_RETRIES:
                raise
            time.sleep(backoff(attempt))
    raise AssertionError("unreachable")


def backoff(retries: int) -> float:
    return min(0.5 * 2 ** retries, 30.0)


def make_queue(settings: Settings) -> Queue:
    """Celery when a Redis URL is set, else the in-process queue running this module's tasks."""
    if settings.redis_url:
        return CeleryQueue(settings)
    return InProcessQueue(settings, run=run_with_retries)
