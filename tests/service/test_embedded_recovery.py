"""Embedded mode (in-process queue) never leaves a job `running` for good: a restarted server
re-queues at once the jobs its dead predecessor was running (their owner's lock died with it),
never those of a live process; a periodic sweep takes over jobs whose heartbeat went stale while
the server runs; and a long, healthy job is never taken from its worker."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.db.models import Job, utcnow
from service.db.session import get_database
from service.jobs import owner, sweeper
from service.jobs.queue import InProcessQueue
from tests.helpers.api import RecordingQueue, make_settings
from tests.service.test_jobs import _fit_job, _get


def _running(db, job_id: str, by: str | None, beat_age_s: float = 0.0) -> None:
    """What a worker leaves behind when its process dies mid-stage."""
    with db.session() as s:
        job = s.get(Job, job_id)
        job.status, job.stage, job.attempts, job.owner = "running", "fit", 1, by
        job.started_at = utcnow()
        job.heartbeat_at = job.updated_at = utcnow() - timedelta(seconds=beat_age_s)


def _wait_finished(db, ids: list[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_get(db, j).status in ("succeeded", "failed") for j in ids):
            return
        time.sleep(0.1)
    raise TimeoutError([(j, _get(db, j).status) for j in ids])


def test_restarted_server_reclaims_its_orphans_at_once(tmp_path, db_url):
    # a lease far longer than the test: only the dead owner's lock can explain a takeover
    settings = make_settings(tmp_path, db_url, job_lease_s=3600)
    db = get_database(db_url)
    orphan, _ = _fit_job(db)
    _running(db, orphan, by=f"previous-server:{uuid.uuid4().hex}")   # fresh heartbeat
    app = create_app(settings)
    with TestClient(app):                       # the lifespan's start-up sweep
        _wait_finished(db, [orphan], timeout=60)
        assert app.state.queue.wait_idle(30)
    job = _get(db, orphan)
    assert job.status == "succeeded", job.error
    assert job.attempts == 2 and job.result["fitted"] == 6


def test_a_live_owners_job_is_never_reclaimed(tmp_path, db_url):
    db = get_database(db_url)
    alive_id = f"other-server:{uuid.uuid4().hex}"
    alive = owner.Liveness.acquire(db, alive_id)     # another live process, as far as locks go
    try:
        held, _ = _fit_job(db)
        dead, _ = _fit_job(db)
        _running(db, held, by=alive_id)
        _running(db, dead, by=f"gone:{uuid.uuid4().hex}")
        queue = RecordingQueue()           # (a shared Postgres may hold other tests' jobs)
        sweeper.sweep(db, queue, lease_s=3600, queued_older_than_s=3600)
        assert ("bitplan.fit", dead) in queue.sent and ("bitplan.fit", held) not in queue.sent
        assert _get(db, held).status == "running" and _get(db, held).owner == alive_id
        assert _get(db, dead).status == "queued"
    finally:
        alive.release()
    queue = RecordingQueue()                          # its process is gone now
    sweeper.sweep(db, queue, lease_s=3600, queued_older_than_s=3600)
    assert ("bitplan.fit", held) in queue.sent and ("bitplan.fit", dead) not in queue.sent
    assert _get(db, held).status == "queued"


def test_periodic_sweep_takes_over_a_stale_job_while_serving(tmp_path, sqlite_url):
    settings = make_settings(tmp_path, sqlite_url, job_lease_s=2.0, sweep_interval_s=0.2)
    db = get_database(sqlite_url)
    app = create_app(settings)
    with TestClient(app):
        time.sleep(0.5)                               # the start-up sweep has come and gone
        stale, _ = _fit_job(db)
        # this very process's owner id: not an orphan, so only the lease can free it
        _running(db, stale, by=owner.OWNER_ID, beat_age_s=10)
        _wait_finished(db, [stale], timeout=30)
        assert app.state.queue.wait_idle(30)
    job = _get(db, stale)
    assert job.status == "succeeded" and job.attempts == 2, job.error


@pytest.mark.parametrize("lease_s", [1.5])
def test_a_long_healthy_job_is_never_stolen(tmp_path, sqlite_url, monkeypatch, lease_s):
    """A stage running for several leases, swept every 0.1 s and delivered again meanwhile:
    its heartbeats keep the lease, it runs exactly once."""
    from service.jobs.stages import profile as pipeline

    settings = make_settings(tmp_path, sqlite_url, job_lease_s=lease_s, sweep_interval_s=0.1,
                             inprocess_workers=3)
    db = get_database(sqlite_url)
    job_id, _ = _fit_job(db)
    real, calls = pipeline.fit_stage, []

    def slow(ctx):
        calls.append(1)
        time.sleep(4 * lease_s)
        return real(ctx)

    monkeypatch.setattr(pipeline, "fit_stage", slow)
    app = create_app(settings)
    with TestClient(app):
        queue: InProcessQueue = app.state.queue
        queue.enqueue("bitplan.fit", job_id)
        time.sleep(lease_s)
        queue.enqueue("bitplan.fit", job_id)          # a duplicate delivery mid-run
        _wait_finished(db, [job_id], timeout=60)
        assert queue.wait_idle(30)
    job = _get(db, job_id)
    assert job.status == "succeeded" and job.attempts == 1 and len(calls) == 1
