"""The job state machine and the in-process queue, on real databases."""

from __future__ import annotations

import uuid

import pytest

from service.db.auth import create_team
from service.db.models import Job
from service.db.profile_store import DbProfileStore
from service.db.session import get_database
from service.jobs import state
from service.jobs.runner import make_queue, run_task
from tests.helpers.api import make_settings
from tests.helpers.profiles import synthetic_profile


def _job(db, **kw) -> str:
    with db.session() as s:
        team = create_team(s, f"t-{uuid.uuid4().hex[:10]}")
        job = Job(team_id=team.id, kind=kw.pop("kind", "fit"), payload={}, result={},
                  history=[], **kw)
        s.add(job)
        s.flush()
        return job.id


def _get(db, job_id) -> Job:
    with db.session() as s:
        return s.get(Job, job_id)


def test_state_machine(db_url):
    db = get_database(db_url)
    a = _job(db)
    b = _job(db, depends_on=a)
    c = _job(db, depends_on=b)
    assert state.claim(db, b, "solve") is None            # waits for a
    first = state.claim(db, a, "fit")
    assert first is not None and first.attempt == 1 and _get(db, a).status == "running"
    assert state.claim(db, a, "fit") is None               # a duplicate while it runs
    again = state.claim(db, a, "fit", lease_s=0.0)         # redelivered after a worker died
    assert again is not None and again.attempt == 2
    state.set_progress(db, a, "fit/x", 0.5)
    state.set_progress(db, a, "fit/x", 7.0)
    assert _get(db, a).progress == 1.0
    state.succeed(db, a, {"n": 1})
    job = _get(db, a)
    assert (job.status, job.stage, job.result) == ("succeeded", "done", {"n": 1})
    assert [h[0] for h in job.history] == ["fit", "fit/x", "done"]
    assert state.claim(db, a, "fit") is None               # terminal: a no-op
    assert state.waiting_dependents(db, a) == [("fit", b)]
    assert state.claim(db, b, "fit") is not None
    failed = state.fail(db, b, "boom", "job_failed")
    assert set(failed) == {b, c}
    jb, jc = _get(db, b), _get(db, c)
    assert (jb.status, jb.error_code, jb.error) == ("failed", "job_failed", "boom")
    assert jc.status == "failed" and jc.error_code == "dependency_failed" and "boom" in jc.error


def _fit_job(db) -> tuple[str, str]:
    store = DbProfileStore(db)
    prof = synthetic_profile()
    store.put(prof)
    pid = store.link_model(prof.key, None)
    return _job(db, kind="fit", profile_id=pid), pid


def test_inprocess_queue_runs_and_redelivery_is_noop(tmp_path, sqlite_url):
    settings = make_settings(tmp_path, sqlite_url)
    db = get_database(sqlite_url)
    job_id, _ = _fit_job(db)
    queue = make_queue(settings)
    try:
        queue.enqueue("bitplan.fit", job_id)
        queue.enqueue("bitplan.fit", job_id)               # delivered twice
        assert queue.wait_idle(60)
    finally:
        queue.close()
    job = _get(db, job_id)
    assert job.status == "succeeded", job.error
    assert job.attempts == 1 and job.result["fitted"] == 6
    assert run_task("bitplan.fit", job_id, settings) == "skipped"


def test_failures_are_recorded_with_clear_messages(tmp_path, db_url):
    settings = make_settings(tmp_path, db_url)
    db = get_database(db_url)
    job_id = _job(db, kind="fit")                          # no profile: cannot succeed
    assert run_task("bitplan.fit", job_id, settings) == "failed"
    job = _get(db, job_id)
    assert job.status == "failed" and job.error_code == "invalid_job"
    assert "no profile" in job.error
    with pytest.raises(ValueError, match="unknown task"):
        run_task("bitplan.nope", job_id, settings)


def test_transient_errors_requeue_and_retry(tmp_path, sqlite_url, monkeypatch):
    """A database blip inside a stage: the job goes back to queued and the retry finishes it."""
    from sqlalchemy.exc import OperationalError

    from service.jobs.runner import run_with_retries
    from service.jobs.stages import profile as pipeline

    settings = make_settings(tmp_path, sqlite_url)
    db = get_database(sqlite_url)
    job_id, _ = _fit_job(db)
    real, calls = pipeline.fit_stage, []

    def flaky(ctx):
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("SELECT 1", {}, Exception("server closed the connection"))
        return real(ctx)

    monkeypatch.setattr(pipeline, "fit_stage", flaky)
    monkeypatch.setattr("service.jobs.runner.backoff", lambda n: 0.01)
    with pytest.raises(OperationalError):
        run_task("bitplan.fit", job_id, settings)
    assert _get(db, job_id).status == "queued"
    calls.clear()
    assert run_with_retries("bitplan.fit", job_id, settings) == "succeeded"
    job = _get(db, job_id)
    assert job.status == "succeeded" and job.attempts == 3 and len(calls) == 2


def test_embedded_restart_resumes_unfinished_jobs(tmp_path, sqlite_url):
    """The in-process queue dies with its process: a new app re-enqueues what was queued, and
    what was running with a stale heartbeat, and they finish."""
    from fastapi.testclient import TestClient

    from service.api import create_app

    settings = make_settings(tmp_path, sqlite_url, job_lease_s=5.0)
    db = get_database(sqlite_url)
    queued, _ = _fit_job(db)
    crashed, _ = _fit_job(db)
    waiting = _job(db, kind="fit", depends_on=queued)
    with db.session() as s:
        s.get(Job, crashed).status = "running"          # heartbeat None: its worker is gone
    app = create_app(settings)
    with TestClient(app):                                # runs the lifespan (startup sweep)
        import time

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(
                _get(db, j).status in ("succeeded", "failed") for j in (queued, crashed)):
            time.sleep(0.1)
        assert app.state.queue.wait_idle(30)
    assert _get(db, queued).status == "succeeded"
    assert _get(db, crashed).status == "succeeded"
    assert _get(db, waiting).status == "failed"          # released, then: no profile → error
