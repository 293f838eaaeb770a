"""Faults with real processes: a Celery worker SIGKILLed mid-profile and mid-compress (with the
shipped lease, heartbeat and sweep settings the API's sweeper re-sends the job once its lease
expires, within 30 s of the kill, and it finishes once, with no duplicate rows, with the API
restarted meanwhile),
and a private `redis-server` restarted with jobs queued (they still run: from its append-only
file, or re-sent by the API's sweeper when the broker lost them). The machine's shared Postgres
and Redis are never stopped."""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from compressor.artifact.archive import recorded_file_digests
from service.db.auth import create_team
from service.db.models import Artifact, Job, PlanRow
from service.db.profile_store import DbProfileStore
from service.settings import Settings
from tests.helpers.api import make_env, make_settings
from tests.helpers.flow import row_counts
from tests.helpers.models import write_tiny_model
from tests.helpers.net import RedisServer
from tests.helpers.profiles import TINY_PROFILE, synthetic_profile
from tests.workers.worker_proc import WorkerProcess, clear_redis_prefix, wait_for

# read by the worker subprocesses: a small evaluation after compressing (lease, heartbeat,
# visibility timeout and sweep interval stay at their shipped defaults)
WORKER_ENV = {"BITPLAN_EVAL_SEQS": "4", "BITPLAN_EVAL_SEQ_LEN": "64"}
RECOVERY_BOUND_S = 30.0      # SIGKILL → the job claimed again by another worker


def _job(db, job_id: str) -> Job:
    with db.session() as s:
        return s.get(Job, job_id)


def _finished(db, job_id: str) -> Job | None:
    job = _job(db, job_id)
    return job if job.status in ("succeeded", "failed") else None


def _kill(worker: WorkerProcess) -> None:
    os.killpg(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait(10)
    worker.stop()


def _restart_api(env):
    """A fresh app (new process state, new broker connection, its own sweeper) with the same
    settings and keys; the old one is shut down (its lifespan ends, closing its queue)."""
    from fastapi.testclient import TestClient

    from service.api import create_app

    env.client.__exit__(None, None, None)
    app = create_app(env.settings)
    client = TestClient(app, raise_server_exceptions=False)
    client.__enter__()                                 # runs the lifespan: the sweeper
    return type(env)(client, env.settings, env.db, env.keys, app.state.queue)


def _recovered_within(db, job_id: str, killed_at: float, attempt: int, worker) -> float:
    """Seconds from the kill until another worker holds the job (attempt `attempt` running, or
    already finished): the figure the lease/heartbeat/sweep defaults are there to bound."""
    def back() -> bool:
        job = _job(db, job_id)
        return job.attempts >= attempt and job.status in ("running", "succeeded")

    wait_for(back, RECOVERY_BOUND_S + 30, interval=0.1, what=f"job {job_id} to be re-claimed")
    took = time.monotonic() - killed_at
    print(f"\nrecovery after SIGKILL of job {job_id[:8]}: {took:.1f} s")
    assert took <= RECOVERY_BOUND_S, (took, worker.log()[-3000:])
    assert _job(db, job_id).attempts == attempt          # re-claimed once, not twice
    return took


def _kill_when_running(db, worker: WorkerProcess, job_id: str, timeout: float) -> float:
    """SIGKILL the whole worker (process group) as soon as the job has started for real."""
    wait_for(lambda: _job(db, job_id).status == "running" or _finished(db, job_id), timeout,
             interval=0.05, what=f"job {job_id} to start")
    job = _job(db, job_id)
    assert job.status == "running", (job.status, job.error, worker.log()[-3000:])
    _kill(worker)
    assert _job(db, job_id).status == "running", "the job finished before the kill"
    return time.monotonic()


def _kill_mid_linears(db, worker: WorkerProcess, work: Path, job_id: str, total: int,
                      timeout: float = 120) -> tuple[int, float]:
    """Freeze the worker (SIGSTOP: instant) once a few linears are on disk, check the job is
    really mid-way through them, then SIGKILL it. Returns how many linears were done, and when
    the worker stopped."""
    linears = work / "linears"
    wait_for(lambda: len(list(linears.glob("*.json"))) >= 2 or _finished(db, job_id), timeout,
             interval=0.005, what="two compressed linears on disk")
    os.killpg(worker.proc.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    done = len(list(linears.glob("*.json")))
    assert 2 <= done < total, (done, total, worker.log()[-3000:])
    _kill(worker)                                    # SIGKILL ends stopped processes too
    assert _job(db, job_id).status == "running"
    return done, stopped


@pytest.mark.slow   # ~90 s on two cores
def test_worker_sigkilled_mid_profile_and_mid_compress(tmp_path, pg_url, redis_url, model_root,
                                                       monkeypatch):
    layers = 6                      # 42 linears: a compress kill lands between two of them
    model = write_tiny_model(model_root / f"tiny-kill-{uuid.uuid4().hex[:6]}", layers=layers,
                             seed=7)
    for k, v in WORKER_ENV.items():
        monkeypatch.setenv(k, v)
    settings = make_settings(tmp_path, pg_url, redis_url=redis_url, model_roots=[model_root],
                             profile_config=TINY_PROFILE, eval_seqs=4, eval_seq_len=64)
    shipped = Settings()
    for knob in ("job_lease_s", "sweep_interval_s", "visibility_timeout_s"):
        assert getattr(settings, knob) == getattr(shipped, knob), knob
    env = make_env(settings)
    env.client.__enter__()                             # the API's lifespan: its sweeper
    workers: list[WorkerProcess] = []

    def start() -> WorkerProcess:
        w = WorkerProcess(settings, tmp_path / f"worker{len(workers)}.log", concurrency=1)
        workers.append(w)
        w.wait_ready()
        return w

    try:
        r = env.client.post("/v1/plans", json={"model": model.name, "budget": "0.9x"},
                            headers=env.h("alpha"))
        assert r.status_code == 202, r.text
        acc = r.json()
        killed = _kill_when_running(env.db, start(), acc["profile_job_id"], 120)
        env = _restart_api(env)                        # the API restarted too: nothing lost
        w = start()                                    # the sweeper re-sends the job to it
        took_profile = _recovered_within(env.db, acc["profile_job_id"], killed, 2, w)
        job = wait_for(lambda: _finished(env.db, acc["job_id"]), 240, what="plan after kill")
        assert job.status == "succeeded", (job.error, w.log()[-4000:])
        prof = _job(env.db, acc["profile_job_id"])
        assert prof.status == "succeeded" and prof.attempts == 2
        counts = row_counts(env.db, prof.model_id)
        n_linears = 7 * layers + 1                     # 7 linears per block + the embedding
        assert counts["profiles"] == 1 and counts["profile_jobs"] == 1
        assert counts["sensitivities"] == counts["samples"] == counts["error_models"] \
            == n_linears

        # the compress job: killed between two linears, redelivered, resumed from the linears
        # already on disk (not redone), one artifact
        c = env.client.post(f"/v1/plans/{acc['plan_id']}/compress", headers=env.h("alpha"))
        assert c.status_code == 202, c.text
        comp = c.json()
        work = settings.data_dir / "artifacts" / f"{comp['artifact_id']}.partial"
        done, killed = _kill_mid_linears(env.db, w, work, comp["job_id"], n_linears)
        w = start()
        took_compress = _recovered_within(env.db, comp["job_id"], killed, 2, w)
        job = wait_for(lambda: _finished(env.db, comp["job_id"]), 240, what="compress")
        assert job.status == "succeeded", (job.error, w.log()[-4000:])
        assert job.attempts == 2
        resumed = re.search(r"resumes: (\d+) linears already done", w.log())
        assert resumed and done <= int(resumed.group(1)) < n_linears, w.log()[-3000:]
        assert not work.exists()                       # the partial work is cleaned up
        with env.db.session() as s:
            arts = s.scalars(sa.select(Artifact).where(Artifact.plan_id == acc["plan_id"])).all()
            jobs = s.scalar(sa.select(sa.func.count()).select_from(Job).where(
                Job.plan_id == acc["plan_id"], Job.kind == "compress"))
        assert len(arts) == 1 and jobs == 1 and arts[0].status == "ready" and arts[0].sha256
        assert row_counts(env.db, prof.model_id) == counts | {"jobs": counts["jobs"] + 1}
        # the same result as an uninterrupted run: another team's identical plan, compressed
        # without a kill, gives the same tensors
        b = env.client.post("/v1/plans", json={"model": model.name, "budget": "0.9x"},
                            headers=env.h("beta")).json()
        assert wait_for(lambda: _finished(env.db, b["job_id"]), 60).status == "succeeded"
        cb = env.client.post(f"/v1/plans/{b['plan_id']}/compress", headers=env.h("beta")).json()
        assert wait_for(lambda: _finished(env.db, cb["job_id"]), 240).status == "succeeded"
        with env.db.session() as s:
            plan_a, plan_b = (s.get(PlanRow, p).result for p in (acc["plan_id"], b["plan_id"]))
            art_b = s.get(Artifact, cb["artifact_id"])
        assert plan_a["assignments"] == plan_b["assignments"]
        assert art_b.tensor_bytes == arts[0].tensor_bytes
        # per tensor file: the recorded digest is the whole download's (it names the artifact)
        same = ("compressed.safetensors", "kept.safetensors")
        digests = [recorded_file_digests(a.path) for a in (arts[0], art_b)]
        assert [digests[0][f] for f in same] == [digests[1][f] for f in same]
        print(f"recovery after SIGKILL (lease {settings.job_lease_s:g} s, heartbeat every "
              f"{settings.job_lease_s / 4:g} s, sweep every {settings.sweep_interval_s:g} s): "
              f"profile {took_profile:.1f} s, compress {took_compress:.1f} s")
    finally:
        env.client.__exit__(None, None, None)
        for w in workers:
            w.stop()
        clear_redis_prefix(redis_url, settings.redis_prefix)


def _fit_jobs(db, n: int) -> list[str]:
    store = DbProfileStore(db)
    ids = []
    with db.session() as s:
        team = create_team(s, f"r-{uuid.uuid4().hex[:8]}")
        team_id = team.id
    for _ in range(n):
        prof = synthetic_profile()
        store.put(prof)
        pid = store.link_model(prof.key, None)
        with db.session() as s:
            job = Job(team_id=team_id, kind="fit", profile_id=pid, payload={}, result={},
                      history=[])
            s.add(job)
            s.flush()
            ids.append(job.id)
    return ids


def _all_succeed(env, ids: list[str], worker: WorkerProcess, timeout: float = 90) -> None:
    wait_for(lambda: all(_finished(env.db, j) for j in ids), timeout, what="jobs after restart")
    for j in ids:
        job = _job(env.db, j)
        assert job.status == "succeeded" and job.attempts == 1, (job.error, worker.log()[-3000:])


def test_redis_restart_queued_jobs_still_run(tmp_path, pg_url):
    """Persistent broker: queued messages survive a restart; the API's producer and a running
    worker both reconnect."""
    redis = RedisServer(tmp_path / "redis", appendonly=True)
    settings = make_settings(tmp_path, pg_url, redis_url=redis.url, sweep_interval_s=0)
    worker = None
    try:
        env = make_env(settings)
        before = _fit_jobs(env.db, 2)
        for j in before:
            env.queue.enqueue("bitplan.fit", j)     # queued with no worker running
        redis.restart()
        worker = WorkerProcess(settings, tmp_path / "worker.log")
        worker.wait_ready()
        _all_succeed(env, before, worker)
        redis.restart()                             # again, under a running worker
        after = _fit_jobs(env.db, 2)
        for j in after:
            env.queue.enqueue("bitplan.fit", j)
        _all_succeed(env, after, worker)
    finally:
        if worker is not None:
            worker.stop()
        redis.stop()


def test_redis_lost_messages_are_resent_by_the_sweeper(tmp_path, pg_url):
    """A broker without persistence forgets queued messages on restart; the API's periodic
    sweeper re-sends jobs left queued past `requeue_after_s`, and they run once each."""
    redis = RedisServer(tmp_path / "redis", appendonly=False)
    settings = make_settings(tmp_path, pg_url, redis_url=redis.url, sweep_interval_s=0.5,
                             requeue_after_s=1.0)
    worker = None
    try:
        env = make_env(settings)
        ids = _fit_jobs(env.db, 3)
        for j in ids:
            env.queue.enqueue("bitplan.fit", j)
        redis.restart()                             # the messages are gone
        worker = WorkerProcess(settings, tmp_path / "worker.log")
        worker.wait_ready()
        with env.client:                            # the app's lifespan runs its sweeper
            _all_succeed(env, ids, worker)
    finally:
        if worker is not None:
            worker.stop()
        redis.stop()
