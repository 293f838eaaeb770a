"""`target` in POST /v1/plans on real databases, over HTTP through the app: a gguf plan is stored
with its target and gets its own shared profile job (one per model and target); a model
llama.cpp's converter does not know, a server without llama.cpp and a budget below the cheapest
GGUF types are refused before any work; with stored profiles each target plans on its own."""

from __future__ import annotations

import json
import math
import shutil
import uuid

import pytest
import sqlalchemy as sa
import yaml

from compressor.pipeline.profile_store import LinearProfile, Profile
from service.db.models import Job, ModelRow, PlanRow
from service.db.profile_store import DbProfileStore
from service.jobs.submit import latest_profile_id
from solver.bytes import Option, fp16_bytes, option_bytes
from solver.gguf_types import gguf_tensor_bytes, gguf_type, types_for_row
from solver.recipes import plan_from_yaml
from tests.helpers.api import RecordingQueue, env_with_cached_profile, make_env, make_settings


@pytest.fixture
def env(tmp_path, own_db_url, model_root, tiny_model):
    settings = make_settings(tmp_path, own_db_url, model_roots=[model_root])
    return make_env(settings, queue=RecordingQueue())


def _plan(env, team="alpha", **kw):
    body = {"model": "tiny-qwen", "budget": "0.9x"} | kw
    return env.client.post("/v1/plans", json=body, headers=env.h(team))


def _gguf_range(inventory: dict) -> tuple[int, int]:
    """Every tensor at its cheapest / dearest GGUF type; kept tensors F32 (4 bytes each)."""
    kept = 4 * sum(math.prod(k["shape"]) for k in inventory["kept"])
    lo = hi = kept
    for li in inventory["linears"]:
        m, n = li["out_features"], li["in_features"]
        sizes = [gguf_tensor_bytes(t, m, n) for t in types_for_row(n)]
        lo, hi = lo + min(sizes), hi + max(sizes)
    return lo, hi


def test_a_gguf_plan_has_its_target_and_its_own_profile_job(env):
    native = _plan(env, "alpha")
    gguf = _plan(env, "alpha", target="gguf")
    twin = _plan(env, "beta", target="gguf", budget="0.8x")
    assert native.status_code == gguf.status_code == twin.status_code == 202, gguf.text
    native, gguf, twin = native.json(), gguf.json(), twin.json()
    # one profile job per (model, target), shared by teams
    assert native["profile_job_id"] != gguf["profile_job_id"] == twin["profile_job_id"]
    assert env.queue.sent == [("bitplan.profile", native["profile_job_id"]),
                              ("bitplan.profile", gguf["profile_job_id"])]
    with env.db.session() as s:
        pjobs = {j.id: j for j in s.scalars(sa.select(Job).where(Job.kind == "profile"))}
        fingerprint = s.scalar(sa.select(ModelRow.fingerprint)
                               .where(ModelRow.ref == "tiny-qwen"))
        targets = dict(s.execute(sa.select(PlanRow.id, PlanRow.target)).all())
        plan_job = s.get(Job, gguf["job_id"])
        assert plan_job.payload["target"] == "gguf"
        assert plan_job.depends_on == gguf["profile_job_id"]
    assert len(pjobs) == 2
    assert pjobs[native["profile_job_id"]].dedup_key == f"profile:{fingerprint}"
    assert pjobs[native["profile_job_id"]].payload["target"] == "native"
    assert pjobs[gguf["profile_job_id"]].dedup_key == f"profile:{fingerprint}:gguf"
    assert pjobs[gguf["profile_job_id"]].payload == {"model": "tiny-qwen", "target": "gguf"}
    assert targets == {native["plan_id"]: "native", gguf["plan_id"]: "gguf",
                       twin["plan_id"]: "gguf"}
    got = env.client.get(f"/v1/plans/{gguf['plan_id']}", headers=env.h("alpha")).json()
    assert got["target"] == "gguf" and got["status"] == "pending"
    assert env.client.get(f"/v1/plans/{native['plan_id']}",
                          headers=env.h("alpha")).json()["target"] == "native"
    listed = {p["id"]: p["target"] for p in env.client.get("/v1/plans",
                                                           headers=env.h("alpha")).json()}
    assert listed == {native["plan_id"]: "native", gguf["plan_id"]: "gguf"}
    # strict, as the rest of the body
    for bad in ("GGUF", "llama", 1, None):
        r = _plan(env, target=bad)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", bad
        assert "target" in r.json()["error"]["message"]


def test_an_architecture_the_converter_does_not_know_is_refused(env, model_root, tiny_model):
    odd = model_root / "tiny-odd-arch"
    if not odd.exists():
        odd.mkdir()
        shutil.copy(tiny_model / "model.safetensors", odd / "model.safetensors")
        cfg = json.loads((tiny_model / "config.json").read_text())
        cfg["architectures"] = ["TinyOddForCausalLM"]
        (odd / "config.json").write_text(json.dumps(cfg))
    r = _plan(env, model="tiny-odd-arch", target="gguf")
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "unsupported_architecture"
    assert "TinyOddForCausalLM" in err["message"] and "converter" in err["message"]
    assert len(err["message"].splitlines()) == 1
    with env.db.session() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Job)) == 0
        assert s.scalar(sa.select(sa.func.count()).select_from(PlanRow)) == 0
    assert env.queue.sent == []
    # the native target does not need the converter
    assert _plan(env, model="tiny-odd-arch").status_code == 202


def test_a_server_without_llama_cpp_says_make_llama_cpp(env, tmp_path, monkeypatch):
    monkeypatch.setenv("BITPLAN_LLAMA_CPP_SRC", str(tmp_path / "no-llama"))
    r = _plan(env, target="gguf")
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["code"] == "gguf_unavailable" and "make llama-cpp" in err["message"]
    assert env.queue.sent == []


def test_a_budget_below_the_cheapest_gguf_types_is_refused_with_the_range(env):
    model = env.client.post("/v1/models", json={"model": "tiny-qwen"},
                            headers=env.h("alpha")).json()
    with env.db.session() as s:
        inv = s.get(ModelRow, model["id"]).inventory
    lo, hi = _gguf_range(inv)
    f = env.client.get(f"/v1/models/{model['id']}/feasibility?target=gguf",
                       headers=env.h("alpha")).json()
    assert (f["min_bytes"], f["max_bytes"], f["source"], f["target"]) == \
        (lo, hi, "inventory", "gguf")
    native_lo = sum(k["nbytes"] for k in inv["kept"]) + sum(
        option_bytes(li["out_features"], li["in_features"], Option(2)) for li in inv["linears"])
    assert native_lo < lo   # 2-bit CALDERA is below any GGUF type (72-wide rows: F16 only)
    r = _plan(env, target="gguf", budget=lo - 1)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "infeasible_budget"
    assert "below the minimum feasible" in err["message"]
    assert f"feasible budgets are {lo}..{hi} B" in err["message"]
    # the same budget is a fine native plan; at the minimum a gguf one is accepted
    assert _plan(env, budget=lo - 1).status_code == 202
    assert _plan(env, target="gguf", budget=lo).status_code == 202
    # the most: every tensor F16, the kept ones F32
    assert hi == 4 * sum(math.prod(k["shape"]) for k in inv["kept"]) + sum(
        fp16_bytes(li["out_features"], li["in_features"]) for li in inv["linears"])


# -- with stored profiles: each target plans on its own ------------------------------------------
def gguf_profile(n_blocks: int = 2) -> Profile:
    """A gguf profile built from numbers: every type a row fits, with t² falling with its bits."""
    linears = []
    for b in range(n_blocks):
        for kind, (m, n) in {"self_attn.q_proj": (64, 256), "mlp.down_proj": (64, 96)}.items():
            errors = {t: 0.0 if t == "F16" else (1.0 + 0.5 * b) * 4.0 ** -_bits(t)
                      for t in types_for_row(n)}
            linears.append(LinearProfile(
                name=f"model.layers.{b}.{kind}", block=b, out_features=m, in_features=n,
                alpha=1.0 + b, proxy=0.5, samples=[[t, e] for t, e in errors.items()],
                fit={"kind": "gguf", "errors": errors}))
    return Profile(key=uuid.uuid4().hex[:32], model_ref="tiny", weights_hash="w" * 64,
                   calib_hash="c" * 16, config={"target": "gguf", "grid": "sparse"},
                   fixed_bytes=4000, linears=linears, block_sensitivity=[1.0, 0.5][:n_blocks],
                   block_proxy=[0.1, 0.2][:n_blocks], stats={})


def _bits(t: str) -> int:
    return gguf_type(t).bits


@pytest.fixture
def both(tmp_path, db_url, model_root, tiny_model):
    """tiny-qwen with a stored native profile and a stored gguf one (in-process worker)."""
    env, model = env_with_cached_profile(tmp_path, db_url, model_root)
    store = DbProfileStore(env.db)
    prof = gguf_profile()
    store.put(prof)
    store.link_model(prof.key, model.id)
    yield env, model, prof
    env.queue.close()


def test_each_target_plans_on_its_own_profile(both):
    env, model, gprof = both
    with env.db.session() as s:
        native_id, gguf_id = latest_profile_id(s, model.id), latest_profile_id(s, model.id, "gguf")
    assert native_id and gguf_id and native_id != gguf_id
    f = env.client.get(f"/v1/models/{model.id}/feasibility?target=gguf",
                       headers=env.h("alpha")).json()
    assert f["source"] == "profile" and f["target"] == "gguf"
    assert f["min_bytes"] == gprof.fixed_bytes + sum(
        min(gguf_tensor_bytes(t, lp.out_features, lp.in_features) for t in lp.fit["errors"])
        for lp in gprof.linears)
    ids = {}
    for target in ("gguf", "native"):
        r = _plan(env, target=target, budget="0.6x")
        assert r.status_code == 202 and r.json()["profile_job_id"] is None, r.text
        ids[target] = r.json()
    assert env.queue.wait_idle(60)
    plans = {t: env.client.get(f"/v1/plans/{i['plan_id']}", headers=env.h("alpha")).json()
             for t, i in ids.items()}
    assert plans["gguf"]["status"] == plans["native"]["status"] == "solved"
    assert (plans["gguf"]["profile_id"], plans["native"]["profile_id"]) == (gguf_id, native_id)
    assert plans["gguf"]["target"] == "gguf"
    assert {li["name"] for li in plans["gguf"]["linears"]} == {lp.name for lp in gprof.linears}
    assert all(li["gguf_type"] for li in plans["gguf"]["linears"])
    assert not any("gguf_type" in li for li in plans["native"]["linears"])
    # the recipe says its target and names types; it reads back as the plan
    text = env.client.get(f"/v1/plans/{ids['gguf']['plan_id']}/recipe.yaml",
                          headers=env.h("alpha")).text
    doc = yaml.safe_load(text)
    assert doc["target"] == "gguf" and set(doc["default"]) == {"gguf_type"}
    got = plan_from_yaml(text, [lp.name for lp in gprof.linears])
    assert {n: o.to_dict() for n, o in got.items()} ==         {li["name"]: Option.from_dict(li).to_dict() for li in plans["gguf"]["linears"]}


def test_a_gguf_plan_profiles_for_gguf_in_shards_and_solves(tmp_path, sqlite_url):
    """The in-process worker end to end: the shared profile job (two block-range shards)
    profiles a tiny Llama the converter takes (bench/tiny_llama.py) for target gguf, and the
    plan solves on it, a type per tensor."""
    from bench.tiny_llama import write_tiny_llama
    from tests.helpers.llama_cpp import llama_cpp_source
    from tests.helpers.profiles import TINY_PROFILE

    llama_cpp_source()   # the profile stage checks the converter takes the tokenizer
    root = tmp_path / "models"
    write_tiny_llama(root / "tiny-llama")
    settings = make_settings(tmp_path, sqlite_url, model_roots=[root],
                             profile_config=TINY_PROFILE, profile_shards=2)
    env = make_env(settings)
    try:
        a = _plan(env, model="tiny-llama", target="gguf", budget="0.5x").json()
        assert env.queue.wait_idle(240)
        pj = env.client.get(f"/v1/jobs/{a['profile_job_id']}", headers=env.h("alpha")).json()
        assert pj["status"] == "succeeded", pj
        assert pj["result"]["shards"] == 2
        with env.db.session() as s:
            shards = s.scalars(sa.select(Job).where(Job.parent_id == a["profile_job_id"])).all()
            model_id = s.get(Job, a["job_id"]).model_id
            assert latest_profile_id(s, model_id) is None          # no native profile made
            gguf_id = latest_profile_id(s, model_id, "gguf")
        assert len(shards) == 2 and all(j.payload["target"] == "gguf" for j in shards)
        prof = DbProfileStore(env.db).get_by_id(gguf_id)
        assert prof.config["target"] == "gguf" and pj["result"]["profile_id"] == gguf_id
        assert all(lp.fit["kind"] == "gguf" for lp in prof.linears)
        plan = env.client.get(f"/v1/plans/{a['plan_id']}", headers=env.h("alpha")).json()
        assert plan["status"] == "solved" and plan["profile_id"] == gguf_id, plan
        assert plan["target"] == "gguf" and all(li["gguf_type"] for li in plan["linears"])
        assert plan["total_bytes"] <= plan["budget_bytes"]
    finally:
        env.queue.close()


@pytest.mark.slow
def test_a_gguf_plan_compresses_to_a_gguf_artifact(tmp_path, sqlite_url):
    """POST {"target": "gguf", "compress": true} on a tiny Llama llama.cpp's converter takes
    offline (bench/tiny_llama.py; the demo's BPE pre-tokenizer it does not recognise): profile,
    solve, model.gguf written on the converter's reference and measured; the download has it."""
    from bench.tiny_llama import write_tiny_llama
    from tests.helpers.flow import poll_job
    from tests.helpers.llama_cpp import llama_cpp_source
    from tests.helpers.profiles import TINY_PROFILE

    llama_cpp_source()   # fetched when the cache lacks it
    root = tmp_path / "models"
    write_tiny_llama(root / "tiny-llama")
    settings = make_settings(tmp_path, sqlite_url, model_roots=[root],
                             profile_config=TINY_PROFILE, eval_seqs=4, eval_seq_len=64)
    env = make_env(settings)
    try:
        a = _plan(env, model="tiny-llama", target="gguf", budget="0.4x", compress=True)
        assert a.status_code == 202, a.text
        a = a.json()
        done, _ = poll_job(env, a["job_id"], "alpha", 900)
        assert done["status"] == "succeeded", done
        plan = env.client.get(f"/v1/plans/{a['plan_id']}", headers=env.h("alpha")).json()
        assert {li["gguf_type"] for li in plan["linears"]} - {"F16"}   # something quantized
        compress = [j for j in env.client.get("/v1/jobs", headers=env.h("alpha")).json()
                    if j["kind"] == "compress"]
        job, _ = poll_job(env, compress[0]["id"], "alpha", 900)
        assert job["status"] == "succeeded", job
        art = env.client.get(f"/v1/artifacts/{job['artifact_id']}",
                             headers=env.h("alpha")).json()
        assert art["status"] == "ready" and art["tensor_bytes"] == plan["total_bytes"]
        m = art["metrics"]
        assert m["planned_bytes"] == m["artifact_tensor_bytes"] == plan["total_bytes"]
        assert m["ppl"] > 1 and m["kl"] >= 0
        files = env.client.get(f"/v1/artifacts/{art['id']}/files",
                               headers=env.h("alpha")).json()["files"]
        assert {f["path"].rsplit("/", 1)[-1] for f in files} >= {"model.gguf",
                                                                "tensor-types.txt"}, files
    finally:
        env.queue.close()
