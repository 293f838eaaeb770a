"""`bitplan bench api`: latency of POST /v1/plans when the profile is cached (solve only).

A real server (`bitplan serve`, embedded mode: SQLite + in-process jobs) on loopback, 10
concurrent HTTP clients, each its own team, ≥ 50 requests with varied budgets. The model is the
bundled demo model (its layer inventory is read from its config); its profile is the one shipped
beside it (`bitplan_profile.json`), or, for a model without one, a synthetic profile built from
numbers for every real linear — this measures the service, not profiling. Reports p50/p95 of
the POST and of the time until each plan is solved.

Every client sends its requests back to back, far more unfinished jobs than the per-team job
limit allows, so the bench's server runs with that limit lifted
(BITPLAN_MAX_CONCURRENT_JOBS_PER_TEAM=0, reported as `team_job_limit`): this measures latency and
solve throughput, not the quota (`bench load` runs tenants under the default limit). A 429 would
be back-pressure, counted apart as `throttled`; `errors` counts every other failure (non-2xx,
transport errors, failed or unfinished jobs). `sent` requests are all answered and counted.
Environment: BITPLAN_BENCH_REQUESTS (100), BITPLAN_BENCH_CLIENTS (10), BITPLAN_BENCH_MODEL.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from compressor.checkpoint.loading import inventory
from compressor.pipeline.profile_store import LinearProfile, Profile
from service.db.auth import create_key, create_team
from service.db.migrate import upgrade
from service.db.profile_store import DbProfileStore
from service.db.session import get_database
from service.jobs.modelrefs import resolve_model
from service.jobs.submit import get_or_create_model
from service.server_process import ServerDidNotStart, serve_subprocess
from service.settings import DEMO_MODEL, Settings
from solver.budget import fp16_reference_bytes
from solver.errormodel import ErrorModel

log = logging.getLogger(__name__)


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def synthetic_profile_for(inventory, key: str):
    """A profile with one fitted error model per planned item (numbers, not measurements), shaped
    like a real one: the blocks' linears, and the embedding / head (`is_vocab`: no block, rank-0
    samples and a flat rank curve, as compressor.pipeline.vocab profiles them). Fixed bytes are
    the kept tensors at their stored size; the fp16 reference is every parameter at 2 bytes."""

    linears = []
    for i, li in enumerate(inventory.linears):
        tail = ([0], [1.0]) if li.is_vocab else ([0, 8, 32, 64], [1.0, 0.7, 0.45, 0.3])
        em = ErrorModel(theta=(math.log(0.01) + 0.1 * (i % 7), -math.log(4), 0.05), c=0.1,
                        tail_ranks=tail[0], tail=tail[1], r2_fit=0.99)
        fit = json.loads(json.dumps(em.to_dict()))
        samples = [[b, r, float(em.predict(b, r))] for b in (2, 3, 4, 6, 8)
                   for r in ((0,) if li.is_vocab else (0, 32))]
        linears.append(LinearProfile(li.name, li.block, li.out_features, li.in_features,
                                     alpha=1.0 + (li.block or 0) % 5, proxy=1.0,
                                     samples=samples, fit=fit))
    fp16 = fp16_reference_bytes(inventory.linear_params,
                                sum(math.prod(k.shape) for k in inventory.kept))
    return Profile(key=key, model_ref="bench", weights_hash="bench", calib_hash="bench",
                   config={"bench": True}, fixed_bytes=inventory.kept_bytes, linears=linears,
                   stats={"linear_params": inventory.linear_params, "fp16_bytes": fp16})


def team_keys(db_url: str, n: int, prefix: str) -> list[str]:
    """API keys of n new teams (one per client, as real tenants would be)."""

    db = get_database(db_url)
    with db.session() as s:
        keys = [create_key(s, create_team(s, f"{prefix}-{i:03d}"))[1] for i in range(n)]
    db.dispose()
    return keys


def _prepare(data_dir: Path, model_dir: Path) -> tuple[str, str]:
    settings = Settings(data_dir=data_dir, model_roots=[model_dir.parent])
    url = settings.resolved_database_url
    upgrade(url)
    db = get_database(url)
    model = get_or_create_model(db, resolve_model(model_dir.name, settings.model_roots),
                                settings)
    store = DbProfileStore(db)
    shipped = model_dir / "bitplan_profile.json"
    if shipped.is_file():           # the demo's real profile, as the service would have it

        prof = Profile.from_dict(json.loads(shipped.read_text()))
    else:
        prof = synthetic_profile_for(inventory(str(model_dir)), key=f"bench-{model.id}")
    store.put(prof)
    store.link_model(prof.key, model.id)
    with db.session() as s:
        key = create_key(s, create_team(s, "bench"))[1]
    db.dispose()
    return url, key


def run(args=None) -> dict:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    quick = bool(getattr(args, "quick", False))   # smoke size unless the environment says
    n_req = int(os.environ.get("BITPLAN_BENCH_REQUESTS", "24" if quick else "100"))
    n_cli = int(os.environ.get("BITPLAN_BENCH_CLIENTS", "4" if quick else "10"))
    model_dir = Path(os.environ.get("BITPLAN_BENCH_MODEL", DEMO_MODEL)).resolve()
    if not (model_dir / "config.json").is_file():
        return {"error": f"no model at {model_dir} (train it with `bitplan train-demo`)"}
    with tempfile.TemporaryDirectory(prefix="bitplan-bench-api-") as tmp:
        data_dir = Path(tmp)
        url, key = _prepare(data_dir, model_dir)
        keys = team_keys(url, n_cli, "api")
        env = os.environ | {"BITPLAN_DATA_DIR": str(data_dir), "BITPLAN_DATABASE_URL": url,
                            "BITPLAN_MODEL_ROOTS": json.dumps([str(model_dir.parent)]),
                            "BITPLAN_MAX_CONCURRENT_JOBS_PER_TEAM": "0"}
        env.pop("BITPLAN_REDIS_URL", None)
        try:
            with serve_subprocess(env, args=("--no-migrate",), start_timeout=60) as srv:
                return _measure(httpx, srv.url, key, keys, model_dir.name, n_req)
        except ServerDidNotStart as exc:
            return {"error": str(exc)}


@dataclass
class _Count:
    """Answers by kind, under one lock."""

    key: str
    lat: list[float] = field(default_factory=list)
    jobs: list[tuple[str, str, float]] = field(default_factory=list)   # (key, job id, posted)
    errors: int = 0
    throttled: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, ms: float | None, status: int | None, job_id: str | None,
            key: str | None = None) -> None:
        with self.lock:
            if ms is not None:
                self.lat.append(ms)
            if status == 202 and job_id:
                self.jobs.append((key or self.key, job_id, time.monotonic()))
            elif status == 429:
                self.throttled += 1
            else:
                self.errors += 1


def _post(c, model: str, budget: int) -> tuple[float, int | None, str | None]:
    t0 = time.perf_counter()
    try:
        r = c.post("/v1/plans", json={"model": model, "budget": budget})
        status, job = r.status_code, (r.json().get("job_id") if r.status_code == 202 else None)
    except Exception:  # transport errors and bad bodies are counted, not raised
        status, job = None, None
    return (time.perf_counter() - t0) * 1000, status, job


def _measure(httpx, base: str, warm_key: str, keys: list[str], model: str,
             n_req: int) -> dict:
    warm = _Count(warm_key)
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {warm_key}"},
                      timeout=30) as c:   # warm-up, then one client alone for scale (same run)
        models = c.get("/v1/models").json()
        feas = c.get(f"/v1/models/{models[0]['id']}/feasibility").json()
        lo, hi = feas["min_bytes"], feas["max_bytes"]
        for i in range(3):
            warm.add(None, *_post(c, model, (lo + hi) // 2 + i)[1:])
        for i in range(20):
            warm.add(*_post(c, model, lo + (hi - lo) * (i + 1) // 21))
    n_cli = len(keys)
    count = _Count(warm_key)
    per = [n_req // n_cli + (1 if i < n_req % n_cli else 0) for i in range(n_cli)]

    def client(idx: int) -> None:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {keys[idx]}"},
                          timeout=30) as c:
            for j in range(per[idx]):
                budget = lo + (hi - lo) * ((idx * 17 + j) % 60 + 1) // 61   # all feasible
                count.add(*_post(c, model, budget), key=keys[idx])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n_cli)]
    t_start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start
    solve_ms, failed = _await_jobs(httpx, base, count.jobs)
    _, warm_failed = _await_jobs(httpx, base, warm.jobs)
    lat = count.lat
    return {"sent": n_req, "requests": len(lat), "clients": n_cli, "teams": n_cli,
            "p50_ms": round(_pct(lat, 0.5), 2), "p95_ms": round(_pct(lat, 0.95), 2),
            "max_ms": round(max(lat), 2), "single_client_p50_ms": round(_pct(warm.lat, 0.5), 2),
            "errors": count.errors + failed + warm.errors + warm_failed,
            "throttled": count.throttled + warm.throttled, "solved": len(solve_ms),
            "throughput_rps": round(len(lat) / wall, 1),
            "time_to_solved_p50_ms": round(_pct(solve_ms, 0.5), 1),
            "time_to_solved_p95_ms": round(_pct(solve_ms, 0.95), 1),
            "team_job_limit": "lifted (BITPLAN_MAX_CONCURRENT_JOBS_PER_TEAM=0)",
            "mode": "sqlite + in-process queue, uvicorn on loopback"}


def _await_jobs(httpx, base: str, jobs: list[tuple[str, str, float]],
                timeout: float = 300) -> tuple[list[float], int]:
    """Time until each job succeeded, and how many failed or never finished. A job is read
    with its own team's key (another team's job is a 404)."""
    pending = {job_id: (key, t) for key, job_id, t in jobs}
    done_ms: list[float] = []
    failed = 0
    deadline = time.monotonic() + timeout
    clients: dict[str, object] = {}
    try:
        while pending and time.monotonic() < deadline:
            for job_id, (key, t) in list(pending.items()):
                if key not in clients:
                    clients[key] = httpx.Client(base_url=base, timeout=30,
                                                headers={"Authorization": f"Bearer {key}"})
                status = clients[key].get(f"/v1/jobs/{job_id}").json().get("status")
                if status in ("succeeded", "failed"):
                    del pending[job_id]
                    if status == "succeeded":
                        done_ms.append((time.monotonic() - t) * 1000)
                    else:
                        failed += 1
            time.sleep(0.1)
    finally:
        for c in clients.values():
            c.close()
    return done_ms, failed + len(pending)
