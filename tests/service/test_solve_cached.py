"""Planning from a cached profile (one built from numbers): POST → solve → done without any
profiling, on both databases; bad and infeasible budgets are 422s naming the minimum."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from service.db.models import PlanRow
from service.jobs.runner import run_task
from tests.helpers.api import env_with_cached_profile


@pytest.fixture
def cached(tmp_path, db_url, model_root, tiny_model):
    env, model = env_with_cached_profile(tmp_path, db_url, model_root)
    yield env, model
    env.queue.close()


def test_solve_from_cached_profile(cached):
    env, model = cached
    feas = env.client.get(f"/v1/models/{model.id}/feasibility", headers=env.h("alpha")).json()
    assert feas["source"] == "profile" and 0 < feas["min_bytes"] < feas["max_bytes"]
    budget = (feas["min_bytes"] + feas["max_bytes"]) // 2
    r = env.client.post("/v1/plans", json={"model": "tiny-qwen", "budget": budget},
                        headers=env.h("alpha"))
    assert r.status_code == 202 and r.json()["profile_job_id"] is None, r.text
    ids = r.json()
    assert env.queue.wait_idle(60)
    job = env.client.get(f"/v1/jobs/{ids['job_id']}", headers=env.h("alpha")).json()
    assert job["status"] == "succeeded", job
    assert [h[0] for h in job["history"]] == ["queued", "solve", "done"]
    plan = env.client.get(f"/v1/plans/{ids['plan_id']}", headers=env.h("alpha")).json()
    assert plan["status"] == "solved" and plan["budget_bytes"] == budget
    assert feas["min_bytes"] <= plan["total_bytes"] <= budget
    assert len(plan["linears"]) == 6
    assert sum(row["bytes"] for row in plan["linears"]) + plan["plan"]["fixed_bytes"] == \
        plan["total_bytes"]
    yaml_text = env.client.get(f"/v1/plans/{ids['plan_id']}/recipe.yaml",
                               headers=env.h("alpha")).text
    assert "default" in yaml_text
    fr = env.client.get(f"/v1/plans/{ids['plan_id']}/frontier", headers=env.h("alpha")).json()
    assert fr["points"][0]["bytes"] == feas["min_bytes"]
    # redelivery of the finished solve changes nothing
    assert run_task("bitplan.solve", ids["job_id"], env.settings, env.queue) == "skipped"
    with env.db.session() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(PlanRow)
                        .where(PlanRow.id == ids["plan_id"])) == 1

    low = env.client.post("/v1/plans", json={"model": "tiny-qwen",
                                             "budget": feas["min_bytes"] - 1},
                          headers=env.h("alpha"))
    assert low.status_code == 422 and low.json()["error"]["code"] == "infeasible_budget"
    assert str(feas["min_bytes"]) in low.json()["error"]["message"]
    bad = env.client.post("/v1/plans", json={"model": "tiny-qwen", "budget": "12 furlongs"},
                          headers=env.h("alpha"))
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_budget"
