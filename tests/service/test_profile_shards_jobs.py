"""A profile job split into block-range shard jobs (service.jobs.stages.shards), in embedded
mode (SQLite + the in-process pool runs the same shards): the assembled profile equals a
one-sweep profile of the same model, progress reaches the profile job, a failed shard fails the
profile and the plans waiting on it, and a re-queued profile runs only its unfinished shards."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from compressor.pipeline.profile import run_profile
from compressor.pipeline.profile_store import FileProfileStore
from service.db.models import Job, JobKind, JobStatus, ProfileRow, new_id, utcnow
from service.db.profile_store import DbProfileStore
from service.db.session import get_database
from service.jobs import state
from service.jobs.context import StageContext
from service.jobs.registry import Task
from service.jobs.runner import release
from service.jobs.stages import shards
from service.jobs.stages.profile import profile_config
from tests.helpers.api import RecordingQueue, make_env, make_settings
from tests.helpers.flow import poll_job
from tests.helpers.models import write_tiny_model
from tests.helpers.profiles import TINY_PROFILE


def _shards(db, parent: str) -> list[Job]:
    return state.children(db, parent)


def test_sharded_profile_job_equals_one_sweep(tmp_path, sqlite_url):
    root = tmp_path / "models"
    write_tiny_model(root / "tiny3", layers=3)
    settings = make_settings(tmp_path, sqlite_url, model_roots=[root],
                             profile_config=TINY_PROFILE, profile_shards=2)
    env = make_env(settings)
    try:
        a = env.client.post("/v1/plans", json={"model": "tiny3", "budget": "0.8x"},
                            headers=env.h("alpha"))
        assert a.status_code == 202, a.text
        a = a.json()
        body, stages = poll_job(env, a["job_id"], "alpha", timeout=300)
        assert body["status"] == "succeeded", body
        assert env.queue.wait_idle(60)
        pj = env.client.get(f"/v1/jobs/{a['profile_job_id']}", headers=env.h("alpha")).json()
        assert pj["status"] == "succeeded" and pj["result"]["shards"] == 2, pj
        # parked while the shards ran, then assembled
        hist = [h[0] for h in pj["history"]]
        assert "profile/shards 0/2 done" in hist and hist[-1] == "done", hist
        shards = _shards(env.db, a["profile_job_id"])
        assert [j.payload["blocks"] for j in shards] == [[0, 2], [2, 3]]
        assert all(j.status == JobStatus.SUCCEEDED and j.kind == JobKind.PROFILE_SHARD
                   for j in shards)

        got = DbProfileStore(env.db).get(pj["result"]["profile_key"])
        want = run_profile(str(root / "tiny3"), FileProfileStore(tmp_path / "one"),
                           config=profile_config(settings))
        assert got.key == want.key
        assert [lp.to_dict() for lp in got.linears] == [lp.to_dict() for lp in want.linears]
        assert got.block_proxy == want.block_proxy
        assert got.stats["shards"] == 2 and len(got.stats["shard_wall_s"]) == 2

        # the stored profile deleted: a new request re-queues the profile job, whose succeeded
        # shards no longer have their records: they run again and the same profile comes back
        with env.db.session() as s:
            s.execute(sa.delete(ProfileRow).where(ProfileRow.key.like(got.key + "%")))
        again = env.client.post("/v1/plans", json={"model": "tiny3", "budget": "0.85x"},
                                headers=env.h("beta")).json()
        assert again["profile_job_id"] == a["profile_job_id"]
        body, _ = poll_job(env, again["job_id"], "beta", timeout=300)
        assert body["status"] == "succeeded", body
        assert env.queue.wait_idle(60)
        assert [j.attempts for j in _shards(env.db, a["profile_job_id"])] == [2, 2]
        back = DbProfileStore(env.db).get(got.key)
        assert [lp.to_dict() for lp in back.linears] == [lp.to_dict() for lp in want.linears]
    finally:
        env.queue.close()


def test_a_failed_shard_fails_the_profile_and_its_plans(tmp_path, sqlite_url):
    root = tmp_path / "models"
    write_tiny_model(root / "nan3", layers=3, nan_in="model.layers.2.mlp.down_proj")
    settings = make_settings(tmp_path, sqlite_url, model_roots=[root],
                             profile_config=TINY_PROFILE, profile_shards=2)
    env = make_env(settings)
    try:
        a = env.client.post("/v1/plans", json={"model": "nan3", "budget": "0.8x"},
                            headers=env.h("alpha")).json()
        body, _ = poll_job(env, a["job_id"], "alpha", timeout=300)
        assert env.queue.wait_idle(60)
        assert body["status"] == "failed" and body["error"]["code"] == "dependency_failed"
        pj = env.client.get(f"/v1/jobs/{a['profile_job_id']}", headers=env.h("alpha")).json()
        shards = _shards(env.db, a["profile_job_id"])
        # block 2's NaN: the second shard samples it, the first carries its probes through it
        assert [j.status for j in shards] == [JobStatus.FAILED] * 2
        assert "NaN" in shards[1].error and "alpha" in shards[0].error
        assert pj["status"] == "failed" and pj["error"]["code"] == "invalid_input"
        assert pj["error"]["message"].startswith("profile shard "), pj
        assert "NaN" in pj["error"]["message"]

        # a new request re-queues the failed profile: its shards run again, none is added
        env.client.post("/v1/plans", json={"model": "nan3", "budget": "0.85x"},
                        headers=env.h("beta"))
        assert env.queue.wait_idle(240)
        shards = _shards(env.db, a["profile_job_id"])
        assert [(j.status, j.attempts) for j in shards] == [(JobStatus.FAILED, 2)] * 2
        with env.db.session() as s:
            n = s.scalar(sa.select(sa.func.count()).select_from(Job)
                         .where(Job.kind == JobKind.PROFILE_SHARD))
        assert n == 2
    finally:
        env.queue.close()


def test_dispatch_sends_only_unfinished_shards(tmp_path, sqlite_url):
    settings = make_settings(tmp_path, sqlite_url)
    db = get_database(sqlite_url)
    parent = new_id()
    status = [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.RUNNING, JobStatus.QUEUED,
              JobStatus.CANCELLED]
    with db.session() as s:
        s.add(Job(id=parent, kind=JobKind.PROFILE, status=JobStatus.RUNNING))
        s.flush()
        ids = []
        for i, st in enumerate(status):
            ids.append(new_id())
            s.add(Job(id=ids[-1], kind=JobKind.PROFILE_SHARD, parent_id=parent, status=st,
                      payload={"blocks": [i, i + 1]}, created_at=utcnow() + timedelta(seconds=i)))
    ctx = StageContext(db, settings, parent, None, lambda stage, frac: None)
    out = shards.dispatch(ctx, state.children(db, parent))
    assert out.waiting == "profile/shards 1/5 done"
    header, body = out.fan_out
    # failed and cancelled ones go again, the queued one goes out; the running one is its
    # worker's (the sweeper re-sends it if that worker dies); the succeeded one is done
    assert header == [(Task.PROFILE_SHARD.value, ids[i]) for i in (1, 3, 4)]
    assert body == (Task.PROFILE.value, parent)
    assert [j.status for j in state.children(db, parent)] == [
        JobStatus.SUCCEEDED, JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.QUEUED,
        JobStatus.QUEUED]

    # a shard failing fails its profile (and what waits on that)
    plan_job = new_id()
    with db.session() as s:
        s.add(Job(id=plan_job, kind=JobKind.PLAN, status=JobStatus.QUEUED, depends_on=parent))
    failed = state.fail(db, ids[2], "out of memory", "out_of_memory")
    assert set(failed) == {ids[2], parent, plan_job}
    with db.session() as s:
        p = s.get(Job, parent)
        assert p.error == f"profile shard {ids[2]} failed: out of memory"
        assert p.error_code == "out_of_memory"
        assert s.get(Job, plan_job).error_code == "dependency_failed"


def test_the_last_shard_to_finish_releases_its_profile(tmp_path, sqlite_url):
    """Outside a chord (a shard the sweeper re-sent after its worker died), the last shard to
    succeed sends its parked profile job itself; earlier ones do not."""
    db = get_database(sqlite_url)
    parent, a, b = new_id(), new_id(), new_id()
    with db.session() as s:
        s.add(Job(id=parent, kind=JobKind.PROFILE, status=JobStatus.QUEUED))
        s.flush()
        for sid in (a, b):
            s.add(Job(id=sid, kind=JobKind.PROFILE_SHARD, parent_id=parent,
                      status=JobStatus.RUNNING))
    queue = RecordingQueue()
    state.succeed(db, a)
    release(db, queue, a)
    assert queue.sent == []
    state.succeed(db, b)
    release(db, queue, b)
    assert queue.sent == [(Task.PROFILE.value, parent)]


def test_in_process_fan_out_runs_the_body_after_every_header_task(tmp_path):
    """The embedded queue's chord: header tasks run on the pool, the body once the last has
    returned (also when one raised), and `wait_idle` covers the body too."""
    import threading
    import time

    from service.jobs.queue import InProcessQueue

    log: list[tuple[str, str]] = []
    lock = threading.Lock()

    def run(task, job_id, settings, queue):
        time.sleep(0.05 if job_id == "s0" else 0.2)
        with lock:
            log.append((task, job_id))
        if job_id == "s1":
            raise RuntimeError("a shard that failed still counts as finished")
        return "succeeded"

    queue = InProcessQueue(make_settings(tmp_path, "sqlite://", inprocess_workers=2), run)
    try:
        shard, profile = Task.PROFILE_SHARD.value, Task.PROFILE.value
        queue.fan_out([(shard, "s0"), (shard, "s1"), (shard, "s2")], (profile, "p"))
        assert queue.wait_idle(10)
        assert len(log) == 4 and log[-1] == (profile, "p")
        assert {j for _, j in log[:3]} == {"s0", "s1", "s2"}
    finally:
        queue.close()


@pytest.mark.parametrize("redis,workers,blocks,want", [
    (None, 3, 12, 1),                     # embedded: the in-process pool, one shard
    ("redis://x", 0, 12, 1), ("redis://x", 1, 12, 1),   # one worker: sharding only costs
    ("redis://x", 2, 12, 4), ("redis://x", 3, 5, 5)])   # two per worker, at most the blocks
def test_automatic_shard_count_follows_live_gpu_workers(tmp_path, sqlite_url, redis, workers,
                                                        blocks, want):
    from service.jobs.workers import beat

    settings = make_settings(tmp_path, sqlite_url, redis_url=redis, profile_shards=0)
    db = get_database(sqlite_url)
    for i in range(workers):
        beat(db, f"w{i}", "celery", ["gpu", "cpu"])
    beat(db, "cpu-only", "celery", ["cpu"])           # not a gpu worker
    ctx = StageContext(db, settings, "job", None, lambda stage, frac: None)
    assert shards.shard_count(ctx, blocks) == want
