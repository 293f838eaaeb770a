"""The `shards` figure of `bitplan bench scale`: one model's profile run by 2 Celery workers
(the profile split into 2 block-range shards, service.jobs.stages.shards) against 1, on the real
Redis and Postgres of this machine; wall time from enqueue to the profile job's success, and
whether both runs stored identical records (samples, fits, α, per-block influence). The shard
count is the default's: one shard for one worker, two per worker for several.

Each run gets its own Postgres database, Redis key prefix and data directory, and starts its
own `bitplan worker` processes, each one task at a time on one torch thread: a worker stands for
one GPU box, so 2 workers have twice the compute of 1 (here: 2 of this machine's cores, shared
with whatever else runs), and both runs compute in the same float order. The model is the demo model copied without its shipped profile, profiled with the
default configuration (`--quick`: a tiny 4-block model and a cheap configuration).
Environment: BITPLAN_BENCH_POSTGRES_URL (a server URL; a database is created and dropped on it),
BITPLAN_BENCH_REDIS_URL.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from service.db.auth import create_team
from service.db.migrate import upgrade
from service.db.models import Job, JobStatus
from service.db.profile_store import DbProfileStore
from service.db.scratch import create_pg_database, drop_pg_database
from service.db.session import get_database
from service.jobs.queue import CeleryQueue, clear_prefix
from service.jobs.registry import Task
from service.jobs.submit import ensure_profile_job, resolve_and_register
from service.jobs.workers import recent_workers
from service.settings import DEMO_MODEL, REPO_ROOT, Settings

POSTGRES = os.environ.get("BITPLAN_BENCH_POSTGRES_URL",
                          "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("BITPLAN_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
# 3 Q bits: the embedding / head are fitted from their Q-only samples alone (no anchors)
QUICK_PROFILE = {"calib_seqs": 4, "probe_seqs": 2, "seq_len": 64, "q_bits": [2, 3, 4],
                 "anchors": [[3, 0.5]], "extra_groups": [], "group_bits": [2],
                 "decomposition": {"outer_iters": 1, "lr_iters": 1, "hadamard": False}}


def records_digest(db, key: str) -> str:
    """sha256 over every stored record of profile `key` and its per-block influence."""
    prof = DbProfileStore(db).get(key)
    body = {"linears": [lp.to_dict() for lp in prof.linears], "proxy": prof.block_proxy,
            "sensitivity": prof.block_sensitivity}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def profile_with_workers(model_dir: Path, workers: int, profile_config: dict, work: Path,
                         timeout: float = 1800.0) -> dict:
    """Profile `model_dir` with `workers` Celery workers; seconds from enqueue to success."""
    url = create_pg_database(POSTGRES, "bitplan_bench")
    prefix = f"bitplan-bench-{uuid.uuid4().hex[:8]}:"
    procs: list[subprocess.Popen] = []
    try:
        upgrade(url)
        settings = Settings(database_url=url, redis_url=REDIS, redis_prefix=prefix,
                            data_dir=work, model_roots=[model_dir.parent],
                            profile_config=profile_config)
        env = os.environ | {
            "BITPLAN_DATABASE_URL": url, "BITPLAN_REDIS_URL": REDIS,
            "BITPLAN_REDIS_PREFIX": prefix, "BITPLAN_DATA_DIR": str(work),
            "BITPLAN_MODEL_ROOTS": json.dumps([str(model_dir.parent)]),
            "BITPLAN_PROFILE_CONFIG": json.dumps(profile_config),
            "BITPLAN_PROFILE_SHARDS": "0", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT),
                                           *filter(None, [os.environ.get("PYTHONPATH")])])}
        for i in range(workers):
            log = open(work / f"worker{i}.log", "wb")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "service.cli", "worker", "--queues", "gpu,cpu",
                 "--concurrency", "1"], cwd=REPO_ROOT, env=env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True))
        db = get_database(url)
        deadline = time.monotonic() + 180
        while len(recent_workers(db, 60)) < workers:   # each worker's consumer beat
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError("workers did not start: " + (work / "worker0.log").read_text(
                    errors="replace")[-2000:])
            time.sleep(0.2)
        model = resolve_and_register(db, model_dir.name, settings)
        with db.session() as s:
            team = create_team(s, f"bench-{uuid.uuid4().hex[:6]}")
            job, _ = ensure_profile_job(s, model, team.id)
            job_id = job.id
        queue = CeleryQueue(settings)
        t0 = time.perf_counter()
        queue.enqueue(Task.PROFILE.value, job_id)
        while True:
            with db.session() as s:
                row = s.get(Job, job_id)
                status, result, error = row.status, dict(row.result or {}), row.error
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
                break
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"profile with {workers} worker(s) unfinished after "
                                   f"{timeout:.0f}s")
            time.sleep(0.1)
        wall = time.perf_counter() - t0
        queue.close()
        if status != JobStatus.SUCCEEDED:
            raise RuntimeError(f"profile with {workers} worker(s) failed: {error}")
        return {"wall_s": round(wall, 2), "shards": result.get("shards", 1),
                "digest": records_digest(db, result["profile_key"])}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        clear_prefix(REDIS, prefix)
        drop_pg_database(url)


def measure(quick: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if quick:
            from bench.synthetic import QUICK, write_checkpoint

            model = write_checkpoint(root / "models" / "tiny4", QUICK)
            config = QUICK_PROFILE
        else:   # the demo without its shipped profile: measured, not read back
            model = root / "models" / "bitplan-demo"
            shutil.copytree(DEMO_MODEL, model, ignore=shutil.ignore_patterns(
                "bitplan_profile.json"))
            config = {}
        runs = {}
        for n in (1, 2):
            (root / f"w{n}").mkdir()
            runs[n] = profile_with_workers(model, n, config, root / f"w{n}")
    one, two = runs[1], runs[2]
    return {"workers": 2, "wall_s": two["wall_s"], "single_wall_s": one["wall_s"],
            "speedup": round(one["wall_s"] / two["wall_s"], 2),
            "identical": one["digest"] == two["digest"], "shards": two["shards"],
            "threads_per_worker": 1,
            "model": "synthetic 4-block llama (quick)" if quick else "demo (12 blocks)",
            "profile_config": "cheap (quick)" if quick else "default"}
