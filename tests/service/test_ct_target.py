"""`target: compressed-tensors` in POST /v1/plans on real databases, over HTTP through the app:
the plan keeps its target and gets its own shared profile job; the inventory's feasible range
is the compressed-tensors menu's (embedding and head fp16); a plan with compress: true
profiles, solves with q/k/v and gate/up tied, and writes the model directory vLLM serves."""

from __future__ import annotations

import math

import pytest
import sqlalchemy as sa

from service.db.models import Job, ModelRow, PlanRow
from solver.bytes import Option
from solver.ct_schemes import menu_bytes_range
from solver.problem import fused_groups
from tests.helpers.api import RecordingQueue, make_env, make_settings

CT = "compressed-tensors"


@pytest.fixture
def env(tmp_path, own_db_url, model_root, tiny_model):
    settings = make_settings(tmp_path, own_db_url, model_roots=[model_root])
    return make_env(settings, queue=RecordingQueue())


def _plan(env, team="alpha", **kw):
    body = {"model": "tiny-qwen", "budget": "0.9x"} | kw
    return env.client.post("/v1/plans", json=body, headers=env.h(team))


def _ct_range(inventory: dict) -> tuple[int, int]:
    vocab = [li for li in inventory["linears"] if li["kind"] in ("embedding", "head", "tied")]
    lo = hi = 2 * (sum(math.prod(k["shape"]) for k in inventory["kept"])
                   + sum(li["out_features"] * li["in_features"] for li in vocab))
    for li in inventory["linears"]:
        if li not in vocab:
            m, n = li["out_features"], li["in_features"]
            a, b = menu_bytes_range(m, n, min(m, n) // 2)
            lo, hi = lo + a, hi + b
    return lo, hi


def test_a_ct_plan_has_its_target_its_profile_job_and_its_range(env):
    native, ct = _plan(env), _plan(env, target=CT)
    assert native.status_code == ct.status_code == 202, ct.text
    native, ct = native.json(), ct.json()
    assert native["profile_job_id"] != ct["profile_job_id"]
    with env.db.session() as s:
        pjob = s.get(Job, ct["profile_job_id"])
        fingerprint = s.scalar(sa.select(ModelRow.fingerprint).where(ModelRow.ref == "tiny-qwen"))
        assert s.get(PlanRow, ct["plan_id"]).target == CT
        inv = s.scalar(sa.select(ModelRow.inventory).where(ModelRow.ref == "tiny-qwen"))
        model_id = s.scalar(sa.select(ModelRow.id).where(ModelRow.ref == "tiny-qwen"))
    assert pjob.dedup_key == f"profile:{fingerprint}:{CT}"
    assert pjob.payload == {"model": "tiny-qwen", "target": CT}
    lo, hi = _ct_range(inv)
    f = env.client.get(f"/v1/models/{model_id}/feasibility?target={CT}",
                       headers=env.h("alpha")).json()
    assert (f["min_bytes"], f["max_bytes"], f["source"], f["target"]) == (lo, hi, "inventory", CT)
    r = _plan(env, target=CT, budget=lo - 1)
    assert r.status_code == 422 and r.json()["error"]["code"] == "infeasible_budget"
    assert f"feasible budgets are {lo}..{hi} B" in r.json()["error"]["message"]
    assert _plan(env, target=CT, budget=lo).status_code == 202


def test_a_ct_plan_compresses_to_a_model_directory(tmp_path, sqlite_url):
    """POST {"target": "compressed-tensors", "compress": true} on a tiny Llama: profile, solve
    (fused modules share a scheme), the directory written and measured; the download has it."""
    from bench.tiny_llama import write_tiny_llama
    from tests.helpers.flow import poll_job
    from tests.helpers.profiles import TINY_PROFILE

    root = tmp_path / "models"
    write_tiny_llama(root / "tiny-llama", tied=True)
    settings = make_settings(tmp_path, sqlite_url, model_roots=[root],
                             profile_config=TINY_PROFILE, eval_seqs=4, eval_seq_len=64)
    env = make_env(settings)
    try:
        a = _plan(env, model="tiny-llama", target=CT, budget="0.4x", compress=True)
        assert a.status_code == 202, a.text
        a = a.json()
        done, _ = poll_job(env, a["job_id"], "alpha", 900)
        assert done["status"] == "succeeded", done
        plan = env.client.get(f"/v1/plans/{a['plan_id']}", headers=env.h("alpha")).json()
        opts = {li["name"]: Option.from_dict(li) for li in plan["linears"]}
        assert all(o.ct for o in opts.values())
        assert not any(n.endswith("embed_tokens") for n in opts)   # kept fp16, not planned
        for group in fused_groups(list(opts)):
            assert len({opts[n] for n in group}) == 1, group
        compress = [j for j in env.client.get("/v1/jobs", headers=env.h("alpha")).json()
                    if j["kind"] == "compress"]
        job, _ = poll_job(env, compress[0]["id"], "alpha", 900)
        assert job["status"] == "succeeded", job
        art = env.client.get(f"/v1/artifacts/{job['artifact_id']}",
                             headers=env.h("alpha")).json()
        assert art["status"] == "ready" and art["tensor_bytes"] == plan["total_bytes"]
        files = env.client.get(f"/v1/artifacts/{art['id']}/files",
                               headers=env.h("alpha")).json()["files"]
        assert {f["path"].rsplit("/", 1)[-1] for f in files} >= {"model.safetensors",
                                                                "config.json"}, files
    finally:
        env.queue.close()
