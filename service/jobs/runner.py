"""Runs one task for one job: claim → stage (math lives in compressor/solver, glue in
service.pipeline) → record the outcome → release what waits on it. The Celery tasks and the
in-process queue both call `run_task`; only transient errors (database or broker unreachable)
propagate, so the caller retries them with backoff; everything else becomes a failed job with a
clear message."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from service.db.models import Job, JobStatus
from service.db.session import Database, get_database
from service.jobs import owner, state
from service.jobs.queue import TASK_QUEUES, InProcessQueue, Queue
from service.settings import Settings

log = logging.getLogger(__name__)

KIND_TASK = {"profile": "bitplan.profile", "fit": "bitplan.fit", "plan": "bitplan.solve",
             "compress": "bitplan.compress", "evaluate": "bitplan.evaluate"}
MAX_TRANSIENT_RETRIES = 5


class TransientError(Exception):
    """Raise from a stage to ask for a retry with backoff."""


@dataclass
class StageContext:
    db: Database
    settings: Settings
    job_id: str
    queue: Queue | None
    report: Callable[[str, float], None]


@dataclass
class StageResult:
    result: dict = field(default_factory=dict)
    links: dict = field(default_factory=dict)          # profile_id / plan_id / artifact_id
    follow_ups: list[tuple[str, str]] = field(default_factory=list)   # (task, job id)


def is_transient(exc: BaseException) -> bool:
    from sqlalchemy.exc import DisconnectionError, OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    if isinstance(exc, TransientError | OperationalError | DisconnectionError | PoolTimeout
                  | ConnectionError):
        return True
    try:
        import redis.exceptions as rx

        if isinstance(exc, rx.ConnectionError | rx.TimeoutError):
            return True
    except ImportError:  # pragma: no cover
        pass
    try:
        from kombu.exceptions import OperationalError as KombuOperationalError

        if isinstance(exc, KombuOperationalError):
            return True
    except ImportError:  # pragma: no cover
        pass
    return False


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


def _stages() -> dict[str, tuple[str, Callable[[StageContext], StageResult]]]:
    from service import pipeline

    return {"bitplan.profile": ("profile", pipeline.profile_stage),
            "bitplan.fit": ("fit", pipeline.fit_stage),
            "bitplan.solve": ("solve", pipeline.solve_stage),
            "bitplan.compress": ("compress", pipeline.compress_stage),
            "bitplan.evaluate": ("evaluate", pipeline.evaluate_stage)}


def release(db: Database, queue: Queue | None, job_id: str) -> None:
    """Enqueue every queued job that waits on `job_id` (safe to repeat: claims are idempotent)."""
    if queue is None:
        return
    for kind, dep_id in state.waiting_dependents(db, job_id):
        queue.enqueue(KIND_TASK[kind], dep_id)


def run_task(task_name: str, job_id: str, settings: Settings, queue: Queue | None = None) -> str:
    """Returns the job's outcome for this delivery: succeeded, failed, skipped (finished, or
    waiting on a dependency that will release it), or busy: another worker holds a fresh lease
    on it — alive, or killed moments ago; the caller checks again once the lease could have
    expired (Celery: a delayed retry) so a dead worker's job does not wait for the sweeper."""
    if task_name not in TASK_QUEUES:
        raise ValueError(f"unknown task {task_name!r}")
    db = get_database(settings.resolved_database_url)
    stage_name, fn = _stages()[task_name]
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
    except Exception as exc:
        if is_transient(exc):
            log.warning("job %s: transient error, will retry: %s", job_id, exc)
            try:
                state.requeue(db, job_id, str(exc))
            except Exception:  # noqa: BLE001 - the database may be the thing that is down
                log.warning("job %s: could not record the retry", job_id)
            raise
        code, message = _classify(exc)
        if code == "internal_error":
            log.exception("job %s failed", job_id)
        else:
            log.warning("job %s failed (%s): %s", job_id, code, message)
        state.fail(db, job_id, message, code)
        return "failed"
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
