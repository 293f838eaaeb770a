"""End to end through a real Celery worker process on the real Postgres and Redis: POST
/v1/plans → profile (gpu queue) → fit → solve (cpu queue) → done, polled via GET /v1/jobs; a
second team reuses the profile (no second profile job); team B gets 404 on team A's plan; tasks
delivered twice leave no duplicate rows. Once on a tiny model (seconds) and once on the bundled
demo model."""

from __future__ import annotations

import time

import pytest
import redis

from service.db.migrate import upgrade
from service.db.models import Job
from tests.helpers.api import make_env, make_settings
from tests.helpers.flow import run_plan_flow
from tests.helpers.profiles import DEMO_PROFILE, TINY_PROFILE
from tests.workers.worker_proc import WorkerProcess, clear_redis_prefix, wait_for


def _settle(env, redis_url: str):
    client = redis.Redis.from_url(redis_url)
    prefix = env.settings.redis_prefix

    def idle() -> bool:
        queued = sum(client.llen(f"{prefix}{q}") for q in ("gpu", "cpu"))
        unacked = client.hlen(f"{prefix}unacked")
        with env.db.session() as s:
            running = s.query(Job).filter(Job.status == "running").count()
        return queued == 0 and unacked == 0 and running == 0

    def settle() -> None:
        wait_for(idle, 180, interval=0.3, what="queue to drain")
        time.sleep(0.5)
    return settle


def _flow(tmp, db_url, redis_url, model_root, model_ref, profile_config, timeout,
          crash_redelivery=True):
    upgrade(db_url)                              # a private, empty database: migrate it first
    settings = make_settings(tmp, db_url, redis_url=redis_url, model_roots=[model_root],
                             profile_config=profile_config)
    worker = WorkerProcess(settings, tmp / "worker.log")
    try:
        worker.wait_ready()
        env = make_env(settings)
        try:
            out = run_plan_flow(env, model_ref, timeout=timeout,
                                settle=_settle(env, redis_url),
                                crash_redelivery=crash_redelivery)
            # the Celery worker's heartbeat step recorded it with its queues (GET /v1/status)
            workers = env.client.get("/v1/status", headers=env.h("alpha")).json()["workers"]
            assert [(w["kind"], sorted(w["queues"])) for w in workers] == \
                [("celery", ["cpu", "gpu"])], workers
            return out
        except BaseException:
            print(worker.log()[-6000:])
            raise
    finally:
        worker.stop()
        clear_redis_prefix(redis_url, settings.redis_prefix)


@pytest.mark.slow   # ~30 s on two cores
def test_e2e_tiny_model(tmp_path, fresh_pg_url, redis_url, model_root, tiny_model):
    _flow(tmp_path, fresh_pg_url, redis_url, model_root, "tiny-qwen", TINY_PROFILE, 300)


@pytest.mark.slow
def test_e2e_demo_model(tmp_path, fresh_pg_url, redis_url, demo_model_path):
    # the crash-redelivery re-run is covered on the tiny model; here it would cost a model load
    _flow(tmp_path, fresh_pg_url, redis_url, demo_model_path.parent, "bitplan-demo",
          DEMO_PROFILE, 600, crash_redelivery=False)
