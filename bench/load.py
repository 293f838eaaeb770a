"""`bitplan bench load`: a bounded load test of the API on loopback.

A real server (`bitplan serve`, embedded mode: SQLite + in-process jobs) with the demo model's
cached profile (the one shipped beside it; see bench.api, whose setup this reuses), and
N concurrent clients — each its own team, as real tenants would be — that for S seconds create a
plan (POST /v1/plans with a feasible budget) and poll its job (GET /v1/jobs/{id}) until it is
solved, then start the next. Bounded in time (S seconds plus a drain of at most 60 s) and in
count (BITPLAN_LOAD_MAX_REQUESTS). Reports every HTTP request: throughput, p50/p95/max latency
and errors (non-2xx answers, transport errors and failed jobs; the goal is 0).
Environment: BITPLAN_LOAD_CLIENTS (50), BITPLAN_LOAD_SECONDS (60), BITPLAN_LOAD_MAX_REQUESTS
(500000), BITPLAN_LOAD_POLL_S (0.05), BITPLAN_BENCH_MODEL (the demo model).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.api import _pct, _prepare, team_keys
from service.server_process import ServerDidNotStart, serve_subprocess
from service.settings import DEMO_MODEL

log = logging.getLogger(__name__)
DRAIN_S = 60.0


@dataclass
class Tally:
    """What every client records, under one lock."""

    lat_ms: list[float] = field(default_factory=list)
    post_ms: list[float] = field(default_factory=list)
    solved_ms: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    plans: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, ms: float, error: str | None = None, post: bool = False) -> None:
        with self.lock:
            self.lat_ms.append(ms)
            if post:
                self.post_ms.append(ms)
            if error:
                self.errors[error] += 1

    @property
    def requests(self) -> int:
        return len(self.lat_ms)


def _client(httpx, base: str, key: str, model: str, lo: int, hi: int, idx: int,
            stop_at: float, drain_at: float, cap: int, poll_s: float, tally: Tally) -> None:
    headers = {"Authorization": f"Bearer {key}"}

    def call(method: str, path: str, **kw) -> dict | None:
        t0 = time.perf_counter()
        try:
            r = c.request(method, path, **kw)
            err = None if r.is_success else f"http_{r.status_code}"
            body = r.json() if r.is_success else None
        except (httpx.HTTPError, ValueError) as exc:
            err, body = type(exc).__name__, None
        tally.add((time.perf_counter() - t0) * 1000, err, post=method == "POST")
        return body

    with httpx.Client(base_url=base, headers=headers, timeout=30) as c:
        j = 0
        while time.monotonic() < stop_at and tally.requests < cap:
            budget = lo + (hi - lo) * ((idx * 17 + j) % 60 + 1) // 61   # all feasible
            j += 1
            t_post = time.monotonic()
            acc = call("POST", "/v1/plans", json={"model": model, "budget": budget})
            if acc is None:
                time.sleep(poll_s)
                continue
            while time.monotonic() < drain_at and tally.requests < cap:
                job = call("GET", f"/v1/jobs/{acc['job_id']}")
                status = (job or {}).get("status")
                if status in ("succeeded", "failed"):
                    with tally.lock:
                        tally.plans += 1
                        tally.solved_ms.append((time.monotonic() - t_post) * 1000)
                        if status == "failed":
                            tally.errors["job_failed"] += 1
                    break
                time.sleep(poll_s)


def measure(httpx, base: str, keys: list[str], model: str, seconds: float, cap: int,
            poll_s: float) -> dict:
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {keys[0]}"},
                      timeout=30) as c:
        models = c.get("/v1/models").json()
        feas = c.get(f"/v1/models/{models[0]['id']}/feasibility").json()
    lo, hi = feas["min_bytes"], feas["max_bytes"]
    tally = Tally()
    t0 = time.monotonic()
    stop_at, drain_at = t0 + seconds, t0 + seconds + DRAIN_S
    threads = [threading.Thread(target=_client, name=f"load-{i}",
                                args=(httpx, base, k, model, lo, hi, i, stop_at, drain_at, cap,
                                      poll_s, tally)) for i, k in enumerate(keys)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    return {"clients": len(keys), "seconds": round(wall, 1), "requests": tally.requests,
            "throughput_rps": round(tally.requests / wall, 1),
            "p50_ms": round(_pct(tally.lat_ms, 0.5), 2),
            "p95_ms": round(_pct(tally.lat_ms, 0.95), 2),
            "max_ms": round(max(tally.lat_ms, default=float("nan")), 2),
            "post_p95_ms": round(_pct(tally.post_ms, 0.95), 2),
            "plans_solved": tally.plans,
            "time_to_solved_p95_ms": round(_pct(tally.solved_ms, 0.95), 1),
            "errors": sum(tally.errors.values()), "error_kinds": dict(tally.errors),
            "mode": "sqlite + in-process queue, one uvicorn process on loopback"}


def run(args=None) -> dict:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    quick = bool(getattr(args, "quick", False))   # smoke size unless the environment says
    n_cli = int(os.environ.get("BITPLAN_LOAD_CLIENTS", "4" if quick else "50"))
    seconds = float(os.environ.get("BITPLAN_LOAD_SECONDS", "4" if quick else "60"))
    cap = int(os.environ.get("BITPLAN_LOAD_MAX_REQUESTS", "500000"))
    poll_s = float(os.environ.get("BITPLAN_LOAD_POLL_S", "0.05"))
    model_dir = Path(os.environ.get("BITPLAN_BENCH_MODEL", DEMO_MODEL)).resolve()
    if not (model_dir / "config.json").is_file():
        return {"error": f"no model at {model_dir} (train it with `bitplan train-demo`)"}
    with tempfile.TemporaryDirectory(prefix="bitplan-bench-load-") as tmp:
        data_dir = Path(tmp)
        url, _ = _prepare(data_dir, model_dir)
        keys = team_keys(url, n_cli, "load")
        env = os.environ | {"BITPLAN_DATA_DIR": str(data_dir), "BITPLAN_DATABASE_URL": url,
                            "BITPLAN_MODEL_ROOTS": json.dumps([str(model_dir.parent)])}
        env.pop("BITPLAN_REDIS_URL", None)
        try:
            with serve_subprocess(env, args=("--no-migrate",), log=data_dir / "server.log",
                                  start_timeout=90.0) as srv:
                return measure(httpx, srv.url, keys, model_dir.name, seconds, cap, poll_s)
        except ServerDidNotStart as exc:   # its message ends with the server's log
            return {"error": str(exc)}
