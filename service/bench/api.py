"""`bitplan bench api`: latency of POST /v1/plans when the profile is cached (solve only).

A real server (`bitplan serve`, embedded mode: SQLite + in-process jobs) on loopback, 10
concurrent HTTP clients, ≥ 50 requests with varied budgets. The model is the bundled demo model
(its layer inventory is read from its config); its profile is the one shipped beside it
(`bitplan_profile.json`), or, for a model without one, a synthetic profile built from numbers for
every real linear — this measures the service, not profiling. Reports p50/p95 of the POST and of the time until each plan is solved.
Environment: BITPLAN_BENCH_REQUESTS (100), BITPLAN_BENCH_CLIENTS (10), BITPLAN_BENCH_MODEL.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from service.settings import DEMO_MODEL, REPO_ROOT

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def synthetic_profile_for(inventory, key: str):
    """A profile with one fitted error model per real linear (numbers, not measurements)."""
    from compressor.profile_store import LinearProfile, Profile
    from solver.errormodel import ErrorModel

    linears = []
    for i, li in enumerate(inventory.linears):
        em = ErrorModel(theta=(math.log(0.01) + 0.1 * (i % 7), -math.log(4), 0.05), c=0.1,
                        tail_ranks=[0, 8, 32, 64], tail=[1.0, 0.7, 0.45, 0.3], r2_fit=0.99)
        fit = json.loads(json.dumps(em.to_dict()))
        samples = [[b, r, float(em.predict(b, r))] for b in (2, 3, 4, 6, 8) for r in (0, 32)]
        linears.append(LinearProfile(li.name, li.block, li.out_features, li.in_features,
                                     alpha=1.0 + (li.block or 0) % 5, proxy=1.0,
                                     samples=samples, fit=fit))
    fp16 = 2 * inventory.linear_params + inventory.kept_bytes
    return Profile(key=key, model_ref="bench", weights_hash="bench", calib_hash="bench",
                   config={"bench": True}, fixed_bytes=inventory.kept_bytes, linears=linears,
                   stats={"linear_params": inventory.linear_params, "fp16_bytes": fp16})


def _prepare(data_dir: Path, model_dir: Path) -> tuple[str, str]:
    from compressor.loading import inventory
    from service.db.auth import create_key, create_team
    from service.db.migrate import upgrade
    from service.db.profile_store import DbProfileStore
    from service.db.session import get_database
    from service.jobs.submit import get_or_create_model
    from service.modelrefs import resolve_model
    from service.settings import Settings

    settings = Settings(data_dir=data_dir, model_roots=[model_dir.parent])
    url = settings.resolved_database_url
    upgrade(url)
    db = get_database(url)
    model = get_or_create_model(db, resolve_model(model_dir.name, settings.model_roots),
                                settings)
    store = DbProfileStore(db)
    shipped = model_dir / "bitplan_profile.json"
    if shipped.is_file():           # the demo's real profile, as the service would have it
        from compressor.profile_store import Profile

        prof = Profile.from_dict(json.loads(shipped.read_text()))
    else:
        prof = synthetic_profile_for(inventory(str(model_dir)), key=f"bench-{model.id}")
    store.put(prof)
    store.link_model(prof.key, model.id)
    with db.session() as s:
        key = create_key(s, create_team(s, "bench"))[1]
    db.dispose()
    return url, key


def run(args=None) -> dict:  # noqa: ANN001
    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)
    n_req = int(os.environ.get("BITPLAN_BENCH_REQUESTS", "100"))
    n_cli = int(os.environ.get("BITPLAN_BENCH_CLIENTS", "10"))
    model_dir = Path(os.environ.get("BITPLAN_BENCH_MODEL", DEMO_MODEL)).resolve()
    if not (model_dir / "config.json").is_file():
        return {"error": f"no model at {model_dir} (train it with `bitplan train-demo`)"}
    with tempfile.TemporaryDirectory(prefix="bitplan-bench-api-") as tmp:
        data_dir = Path(tmp)
        url, key = _prepare(data_dir, model_dir)
        port = _free_port()
        env = os.environ | {"BITPLAN_DATA_DIR": str(data_dir), "BITPLAN_DATABASE_URL": url,
                            "BITPLAN_MODEL_ROOTS": json.dumps([str(model_dir.parent)])}
        env.pop("BITPLAN_REDIS_URL", None)
        server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port",
                                   str(port), "--no-migrate"], cwd=REPO_ROOT, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            return _measure(httpx, f"http://127.0.0.1:{port}", key, model_dir.name, n_req,
                            n_cli)
        finally:
            server.terminate()
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()


def _measure(httpx, base: str, key: str, model: str, n_req: int, n_cli: int) -> dict:  # noqa: ANN001
    headers = {"Authorization": f"Bearer {key}"}
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            return {"error": "server did not start"}
        time.sleep(0.2)
    with httpx.Client(base_url=base, headers=headers, timeout=30) as c:   # warm-up
        models = c.get("/v1/models").json()
        feas = c.get(f"/v1/models/{models[0]['id']}/feasibility").json()
        lo, hi = feas["min_bytes"], feas["max_bytes"]
        for i in range(3):
            c.post("/v1/plans", json={"model": model, "budget": (lo + hi) // 2 + i})
        single = []                     # one client alone, for scale (same run)
        for i in range(20):
            t0 = time.perf_counter()
            c.post("/v1/plans", json={"model": model, "budget": lo + (hi - lo) * (i + 1) // 21})
            single.append((time.perf_counter() - t0) * 1000)
    lat: list[float] = []
    jobs: list[tuple[str, float]] = []
    errors = 0
    lock = threading.Lock()
    per = [n_req // n_cli + (1 if i < n_req % n_cli else 0) for i in range(n_cli)]

    def client(idx: int) -> None:
        nonlocal errors
        with httpx.Client(base_url=base, headers=headers, timeout=30) as c:
            for j in range(per[idx]):
                budget = lo + (hi - lo) * ((idx * 17 + j) % 60 + 1) // 61   # all feasible
                t0 = time.perf_counter()
                try:
                    r = c.post("/v1/plans", json={"model": model, "budget": budget})
                    ok = r.status_code == 202
                except httpx.HTTPError:
                    ok = False
                dt = (time.perf_counter() - t0) * 1000
                with lock:
                    lat.append(dt)
                    if ok:
                        jobs.append((r.json()["job_id"], time.monotonic()))
                    else:
                        errors += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n_cli)]
    t_start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start
    solve_ms, failed = _await_jobs(httpx, base, headers, jobs)
    return {"requests": len(lat), "clients": n_cli, "p50_ms": round(_pct(lat, 0.5), 2),
            "p95_ms": round(_pct(lat, 0.95), 2), "max_ms": round(max(lat), 2),
            "single_client_p50_ms": round(_pct(single, 0.5), 2),
            "errors": errors + failed, "throughput_rps": round(len(lat) / wall, 1),
            "time_to_solved_p50_ms": round(_pct(solve_ms, 0.5), 1),
            "time_to_solved_p95_ms": round(_pct(solve_ms, 0.95), 1),
            "mode": "sqlite + in-process queue, uvicorn on loopback"}


def _await_jobs(httpx, base: str, headers: dict, jobs: list[tuple[str, float]],  # noqa: ANN001
                timeout: float = 300) -> tuple[list[float], int]:
    pending = dict(jobs)
    done_ms: list[float] = []
    failed = 0
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=base, headers=headers, timeout=30) as c:
        while pending and time.monotonic() < deadline:
            for job_id in list(pending):
                body = c.get(f"/v1/jobs/{job_id}").json()
                if body.get("status") in ("succeeded", "failed"):
                    done_ms.append((time.monotonic() - pending.pop(job_id)) * 1000)
                    failed += body["status"] == "failed"
            time.sleep(0.1)
    return done_ms, failed + len(pending)
