"""A profile split into block-range shards over two real Celery worker processes (real Redis and
Postgres): each worker runs a shard, Celery's chord sends the profile task again once both are
done, and the assembled profile equals a one-sweep profile; the plan waiting on it is solved."""

from __future__ import annotations

import pytest

from compressor.pipeline.profile import run_profile
from compressor.pipeline.profile_store import FileProfileStore
from service.db.migrate import upgrade
from service.db.profile_store import DbProfileStore
from service.jobs import state
from service.jobs.stages.profile import profile_config
from tests.helpers.api import make_env, make_settings
from tests.helpers.flow import poll_job
from tests.helpers.models import write_tiny_model
from tests.helpers.profiles import TINY_PROFILE
from tests.workers.worker_proc import WorkerProcess, clear_redis_prefix


@pytest.mark.slow   # two worker processes and a 4-block model: ~40 s on two cores
def test_two_workers_profile_one_model_in_shards(tmp_path, fresh_pg_url, redis_url):
    upgrade(fresh_pg_url)
    root = tmp_path / "models"
    write_tiny_model(root / "tiny4", layers=4)
    settings = make_settings(tmp_path, fresh_pg_url, redis_url=redis_url, model_roots=[root],
                             profile_config=TINY_PROFILE, profile_shards=2)
    workers = [WorkerProcess(settings, tmp_path / f"w{i}.log", concurrency=1) for i in (0, 1)]
    try:
        for w in workers:
            w.wait_ready()
        env = make_env(settings)
        a = env.client.post("/v1/plans", json={"model": "tiny4", "budget": "0.8x"},
                            headers=env.h("alpha"))
        assert a.status_code == 202, a.text
        body, stages = poll_job(env, a.json()["job_id"], "alpha", timeout=300)
        assert body["status"] == "succeeded", (body, [w.log()[-3000:] for w in workers])
        shards = state.children(env.db, a.json()["profile_job_id"])
        assert [j.payload["blocks"] for j in shards] == [[0, 2], [2, 4]]
        # one shard each: a worker runs one task at a time, and both were queued at once
        assert sorted(j.worker for j in shards) == sorted({j.worker for j in shards})
        assert all(w.log().count("bitplan.profile_shard[") >= 2 for w in workers)  # got, ran

        pj = env.client.get(f"/v1/jobs/{a.json()['profile_job_id']}",
                            headers=env.h("alpha")).json()
        assert pj["result"]["shards"] == 2
        got = DbProfileStore(env.db).get(pj["result"]["profile_key"])
        want = run_profile(str(root / "tiny4"), FileProfileStore(tmp_path / "one"),
                           config=profile_config(settings))
        assert [lp.to_dict() for lp in got.linears] == [lp.to_dict() for lp in want.linears]
        assert got.block_proxy == want.block_proxy
    finally:
        for w in workers:
            w.stop()
        clear_redis_prefix(redis_url, settings.redis_prefix)


@pytest.mark.slow   # a lease (20 s) has to expire: ~70 s on two cores
def test_a_shard_whose_worker_dies_is_resumed_and_the_profile_assembled(
        tmp_path, fresh_pg_url, redis_url):
    """SIGKILL the worker running one shard: with the shipped lease and sweep settings the API's
    sweeper re-sends that shard, another worker runs it again (resuming from the linears it
    stored), and — the re-sent shard being outside the chord — the last shard to finish
    releases the profile, which is assembled as if nothing had happened."""
    import os
    import signal

    from tests.workers.worker_proc import wait_for

    upgrade(fresh_pg_url)
    root = tmp_path / "models"
    write_tiny_model(root / "tiny6", layers=6, seed=3)
    settings = make_settings(tmp_path, fresh_pg_url, redis_url=redis_url, model_roots=[root],
                             profile_config=TINY_PROFILE, profile_shards=2)
    env = make_env(settings)
    env.client.__enter__()                              # the API's lifespan: its sweeper
    workers = [WorkerProcess(settings, tmp_path / f"w{i}.log", concurrency=1) for i in (0, 1)]
    try:
        for w in workers:
            w.wait_ready()
        a = env.client.post("/v1/plans", json={"model": "tiny6", "budget": "0.8x"},
                            headers=env.h("alpha")).json()
        pid = a["profile_job_id"]

        def running_shard():
            shards = state.children(env.db, pid)
            return next((j for j in shards if j.status == "running" and j.progress > 0.1), None)

        victim = wait_for(running_shard, 240, interval=0.05, what="a shard mid-way")
        doomed = next(w for w in workers if str(w.proc.pid) in victim.worker)
        os.killpg(doomed.proc.pid, signal.SIGKILL)
        doomed.proc.wait(10)
        doomed.stop()
        workers.append(WorkerProcess(settings, tmp_path / "w2.log", concurrency=1))
        workers[-1].wait_ready()

        body, _ = poll_job(env, a["job_id"], "alpha", timeout=300)
        assert body["status"] == "succeeded", (body, [w.log()[-3000:] for w in workers])
        again = next(j for j in state.children(env.db, pid) if j.id == victim.id)
        assert again.status == "succeeded" and again.attempts == 2
        got = DbProfileStore(env.db).get(
            env.client.get(f"/v1/jobs/{pid}", headers=env.h("alpha")).json()["result"][
                "profile_key"])
        want = run_profile(str(root / "tiny6"), FileProfileStore(tmp_path / "one"),
                           config=profile_config(settings))
        assert [lp.to_dict() for lp in got.linears] == [lp.to_dict() for lp in want.linears]
    finally:
        env.client.__exit__(None, None, None)
        for w in workers:
            w.stop()
        clear_redis_prefix(redis_url, settings.redis_prefix)
