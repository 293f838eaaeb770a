"""Thin Celery tasks: each takes a job id and hands it to service.jobs.runner, which opens its
own session, records stage and progress, and is idempotent. Only transient errors (database or
broker unreachable) reach here; they are retried with exponential backoff."""

from __future__ import annotations

import logging

from service.db.session import get_database
from service.jobs import state
from service.jobs.queue import CeleryQueue
from service.jobs.registry import Task
from service.jobs.runner import backoff, is_transient, run_task
from service.settings import get_settings
from workers.app import app

log = logging.getLogger(__name__)
MAX_RETRIES = 8
_queue: CeleryQueue | None = None


def _follow_up_queue() -> CeleryQueue:
    global _queue
    if _queue is None:
        _queue = CeleryQueue(get_settings())
    return _queue


def _run(task, task_name: str, job_id: str) -> str:
    settings = get_settings()
    try:
        outcome = run_task(task_name, job_id, settings, _follow_up_queue())
    except Exception as exc:
        if is_transient(exc) and task.request.retries < MAX_RETRIES:
            delay = backoff(task.request.retries)
            log.warning("%s(%s): transient %s; retry in %.1fs", task_name, job_id,
                        type(exc).__name__, delay)
            raise task.retry(exc=exc, countdown=delay) from exc
        if is_transient(exc):
            _give_up(job_id, exc)
        raise
    if outcome == "busy" and task.request.retries < MAX_RETRIES:
        # another worker's lease is fresh; if that worker was killed, this delivery takes the
        # job over once the lease expires (past MAX_RETRIES checks, the API's sweeper does)
        log.info("%s(%s): running elsewhere; checking again in %.0fs", task_name, job_id,
                 settings.job_lease_s)
        raise task.retry(countdown=settings.job_lease_s)
    return outcome


def _give_up(job_id: str, exc: Exception) -> None:
    try:
        state.fail(get_database(get_settings().resolved_database_url), job_id,
                   f"gave up after {MAX_RETRIES} retries: {type(exc).__name__}: {exc}",
                   "transient_exhausted")
    except Exception:  # still unreachable: a sweeper picks it up later
        log.warning("could not mark job %s failed", job_id)


def _register(task: Task) -> None:
    """One Celery task per registry entry, named as the registry names it."""
    def run(self, job_id: str) -> str:  # Celery's bound task
        return _run(self, task.value, job_id)

    run.__name__ = task.name.lower()
    app.task(name=task.value, bind=True, max_retries=MAX_RETRIES)(run)


for _task in Task:
    _register(_task)
