"""service.jobs.submit called directly (the dashboard and the API share it): the typed plan
request hashes like the body dict it replaced, compress requests always count against the team
job limit, and a model row is read from the database each time, never from a stale copy."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from service.api.schemas import PlanCreate
from service.db.auth import authenticate
from service.db.models import Job, JobKind, ModelRow, PlanRow
from service.errors import TooManyRequests
from service.jobs.submit import request_compress, request_hash, resolve_and_register
from tests.helpers.api import RecordingQueue, make_env, make_settings


def test_a_plan_request_hashes_like_the_body_it_replaced():
    """Idempotency keys recorded before the request became typed still replay: the hash is of
    the same JSON body (no None values, constraints without their unset fields)."""
    req = PlanCreate.model_validate({"model": "m", "budget": 5 * 2**20,
                                     "constraints": {"min_bits": 3}}).to_request()
    assert req.budget == "5242880"
    assert request_hash(req.as_dict()) == request_hash(
        {"model": "m", "budget": "5242880", "method": "exact", "compress": False,
         "constraints": {"min_bits": 3}})
    bare = PlanCreate.model_validate({"model": "m", "budget": "0.9x"}).to_request()
    assert "constraints" not in bare.as_dict() and bare.constraints is None


def test_request_compress_has_no_path_around_the_job_limit(tmp_path, db_url, model_root,
                                                           tiny_model):
    settings = make_settings(tmp_path, db_url, model_roots=[model_root],
                             max_concurrent_jobs_per_team=1)
    queue = RecordingQueue()
    env = make_env(settings, queue=queue)
    model = resolve_and_register(env.db, "tiny-qwen", settings)
    with env.db.session() as s:
        team_id = authenticate(s, env.keys["alpha"]).id
        plans = [PlanRow(team_id=team_id, model_id=model.id, budget="0.9x", status="solved")
                 for _ in range(2)]
        s.add_all(plans)
        s.flush()
        first, second = (p.id for p in plans)

    with pytest.raises(TypeError):                # no call can leave the limit out
        request_compress(env.db, queue, team_id, second)
    art, job = request_compress(env.db, queue, team_id, first, settings)
    assert request_compress(env.db, queue, team_id, first, settings) == (art, job)
    with pytest.raises(TooManyRequests) as info:
        request_compress(env.db, queue, team_id, second, settings)
    assert info.value.code == "too_many_jobs" and "limit 1" in info.value.message
    with env.db.session() as s:
        compress_jobs = s.scalars(sa.select(Job.plan_id).where(
            Job.team_id == team_id, Job.kind == JobKind.COMPRESS)).all()
    assert compress_jobs == [first]


def test_a_model_row_is_never_served_from_a_stale_copy(tmp_path, sqlite_url, model_root,
                                                       tiny_model):
    """A model's row deleted behind a running API (a database restored or reset) is registered
    again on the next request, instead of a remembered id that no longer exists (a 500)."""
    settings = make_settings(tmp_path, sqlite_url, model_roots=[model_root])
    env = make_env(settings, queue=RecordingQueue())
    h = env.h("alpha")
    r = env.client.post("/v1/models", json={"model": "tiny-qwen"}, headers=h)
    assert r.status_code == 201, r.text
    old = r.json()["id"]
    with env.db.session() as s:
        s.execute(sa.delete(ModelRow).where(ModelRow.id == old))
    r = env.client.post("/v1/models", json={"model": "tiny-qwen"}, headers=h)
    assert r.status_code == 201, r.text
    new = r.json()["id"]
    assert new != old and r.json()["num_linears"] == 15
    assert env.client.get(f"/v1/models/{new}", headers=h).status_code == 200
