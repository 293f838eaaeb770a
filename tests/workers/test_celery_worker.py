"""A real Celery worker process on the real Redis and Postgres of this machine: tasks published
by name by the API's queue run through the runner; duplicate deliveries change nothing; a
profile that cannot run fails clearly and takes its waiting plan jobs with it.

The full plan flow through this worker is in test_e2e.py."""

from __future__ import annotations

import uuid

import pytest

from service.db.auth import create_team
from service.db.models import Job
from service.db.profile_store import DbProfileStore
from service.jobs.queue import CeleryQueue
from tests.helpers.api import make_env, make_settings
from tests.helpers.profiles import synthetic_profile
from tests.workers.worker_proc import WorkerProcess, clear_redis_prefix, wait_for


@pytest.fixture(scope="module")
def worker_env(tmp_path_factory, pg_url, redis_url, model_root, tiny_model):
    tmp = tmp_path_factory.mktemp("celery")
    settings = make_settings(tmp, pg_url, redis_url=redis_url, model_roots=[model_root])
    worker = WorkerProcess(settings, tmp / "worker.log")
    try:
        worker.wait_ready()
        env = make_env(settings)            # the API with its CeleryQueue (kombu, by name)
        assert isinstance(env.queue, CeleryQueue)
        yield env, worker
    finally:
        worker.stop()
        clear_redis_prefix(redis_url, settings.redis_prefix)


def _status(db, job_id):
    with db.session() as s:
        job = s.get(Job, job_id)
        return job if job.status in ("succeeded", "failed") else None


def test_worker_runs_tasks_by_name_and_ignores_redelivery(worker_env):
    env, worker = worker_env
    store = DbProfileStore(env.db)
    prof = synthetic_profile()
    store.put(prof)
    pid = store.link_model(prof.key, None)
    with env.db.session() as s:
        team = create_team(s, f"w-{uuid.uuid4().hex[:8]}")
        job = Job(team_id=team.id, kind="fit", profile_id=pid, payload={}, result={},
                  history=[])
        s.add(job)
        s.flush()
        job_id = job.id
    env.queue.enqueue("bitplan.fit", job_id)
    env.queue.enqueue("bitplan.fit", job_id)               # the same task delivered twice
    job = wait_for(lambda: _status(env.db, job_id), 60, what="fit job")
    assert job.status == "succeeded", (job.error, worker.log()[-3000:])
    assert job.result["fitted"] == 6 and job.attempts == 1
    wait_for(lambda: worker.log().count("bitplan.fit[") >= 4, 30, what="second delivery")
    with env.db.session() as s:
        assert s.get(Job, job_id).attempts == 1
