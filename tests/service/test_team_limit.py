"""The per-team job limit holds under concurrency: many simultaneous requests from one team get
exactly `limit` acceptances (the count and the insert are one serialised step), the rest a clean
429 with Retry-After, on SQLite and Postgres, for plans and for compress requests."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import sqlalchemy as sa

from service.db.auth import authenticate
from service.db.models import Job, JobStatus, PlanRow
from service.jobs.submit import resolve_and_register
from tests.helpers.api import RecordingQueue, make_env, make_settings

LIMIT, N = 8, 30


def _burst(env, paths_bodies: list[tuple[str, dict | None]]) -> list:
    def post(pb):
        path, body = pb
        return env.client.post(path, json=body, headers=env.h("alpha"))

    with ThreadPoolExecutor(max_workers=N) as pool:
        return list(pool.map(post, paths_bodies))


def _alpha(env) -> str:
    with env.db.session() as s:
        return authenticate(s, env.keys["alpha"]).id


def _check(env, responses) -> None:
    codes = sorted(r.status_code for r in responses)
    assert codes == [202] * LIMIT + [429] * (N - LIMIT), codes
    for r in responses:
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "too_many_jobs", r.text
            assert int(r.headers["retry-after"]) > 0
    with env.db.session() as s:
        active = s.scalar(sa.select(sa.func.count()).select_from(Job).where(
            Job.team_id == _alpha(env), Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING])))
    assert active == LIMIT


def test_concurrent_plan_requests_respect_the_limit(tmp_path, db_url, model_root, tiny_model):
    settings = make_settings(tmp_path, db_url, model_roots=[model_root],
                             max_concurrent_jobs_per_team=LIMIT)
    env = make_env(settings, queue=RecordingQueue())     # workers "stopped": jobs stay queued
    resolve_and_register(env.db, "tiny-qwen", settings)   # the model is known already
    responses = _burst(env, [("/v1/plans", {"model": "tiny-qwen", "budget": f"0.9{i:02d}x"})
                             for i in range(N)])
    _check(env, responses)


def test_concurrent_compress_requests_respect_the_limit(tmp_path, db_url, model_root,
                                                        tiny_model):
    settings = make_settings(tmp_path, db_url, model_roots=[model_root],
                             max_concurrent_jobs_per_team=LIMIT)
    env = make_env(settings, queue=RecordingQueue())
    model = resolve_and_register(env.db, "tiny-qwen", settings)
    alpha = _alpha(env)
    with env.db.session() as s:
        plans = [PlanRow(team_id=alpha, model_id=model.id, budget="0.9x", status="solved")
                 for _ in range(N)]
        s.add_all(plans)
        s.flush()
        ids = [p.id for p in plans]
    responses = _burst(env, [(f"/v1/plans/{pid}/compress", None) for pid in ids])
    _check(env, responses)
