"""Bad input to the API is refused with a clear message and the right status (never a 500 or a
traceback), and starts nothing. Extends the table in test_api.py (no repeats); the per-team job
limit (429) is here too. The CLI's and YAML recipes' bad input: test_bad_input_cli.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.helpers.api import RecordingQueue, make_env, make_settings
from tests.helpers.models import write_tiny_model

OK = {"model": "tiny-qwen", "budget": "0.9x"}   # feasible for the tiny model (min ≈ 0.56x)


def _c(constraints: object) -> dict:
    return OK | {"constraints": constraints}


def _raw(body: bytes) -> dict:
    return {"content": body, "headers": {"content-type": "application/json"}}


# (id, method, path, request kwargs, status, error code, a fragment the message must contain)
API_CASES = [
    # malformed bodies and wrong types
    ("empty body", "post", "/v1/plans", _raw(b""), 422, "invalid_request", "body"),
    ("text/plain body", "post", "/v1/plans",
     {"content": b"hi", "headers": {"content-type": "text/plain"}}, 415,
     "unsupported_media_type", "application/json"),
    ("truncated json string", "post", "/v1/plans", _raw(b'{"model": "tiny'), 400,
     "malformed_json", "JSON"),
    ("json NaN literal", "post", "/v1/plans", _raw(b'{"model":"tiny-qwen","budget":NaN}'), 422,
     "invalid_request", "finite"),
    ("json Infinity literal", "post", "/v1/plans",
     _raw(b'{"model":"tiny-qwen","budget":Infinity}'), 422, "invalid_request", "finite"),
    ("model not a string", "post", "/v1/plans", {"json": {"model": 5, "budget": "1GB"}}, 422,
     "invalid_request", "model"),
    ("null budget", "post", "/v1/plans", {"json": {"model": "tiny-qwen", "budget": None}}, 422,
     "invalid_request", "budget"),
    ("boolean budget", "post", "/v1/plans", {"json": {"model": "tiny-qwen", "budget": True}},
     422, "invalid_request", "boolean"),
    ("method not a string", "post", "/v1/plans", {"json": OK | {"method": 3}}, 422,
     "invalid_request", "method"),
    ("compress not a bool", "post", "/v1/plans", {"json": OK | {"compress": "maybe"}}, 422,
     "invalid_request", "compress"),
    ("constraints not an object", "post", "/v1/plans", {"json": _c([1])}, 422,
     "invalid_request", "constraints"),
    ("deeply nested json", "post", "/v1/plans",
     _raw(b'{"model":"tiny-qwen","budget":"1GB","constraints":{"a":' + b"[" * 100_000
          + b"]" * 100_000 + b"}}"), 400, "bad_request", "pars"),
    ("malformed content-length", "post", "/v1/plans",
     {"content": b"{}", "headers": {"content-type": "application/json",
                                    "content-length": "abc"}}, 400, "bad_request",
     "Content-Length"),
    ("lone surrogate in model", "post", "/v1/plans",
     _raw(b'{"model":"\\ud800","budget":"0.9x"}'), 422, "invalid_request", "model"),
    ("idempotency key too long", "post", "/v1/plans",
     {"json": OK, "headers": {"Idempotency-Key": "k" * 300}}, 422, "invalid_request",
     "Idempotency-Key"),
    ("huge id is not echoed back", "get", "/v1/jobs/" + "x" * 5000, {}, 404, "not_found",
     "not found"),
    ("model body empty", "post", "/v1/models", {"json": {}}, 422, "invalid_request", "model"),
    ("limit not a number", "get", "/v1/jobs?limit=abc", {}, 422, "invalid_request", "limit"),
    ("limit too large", "get", "/v1/plans?limit=100000", {}, 422, "invalid_request", "limit"),
    # budgets: infinite, absurd, below the minimum (the message names it), units
    ("inf string budget", "post", "/v1/plans", {"json": OK | {"budget": "inf"}}, 422,
     "invalid_budget", "finite"),
    ("absurd integer budget", "post", "/v1/plans", {"json": OK | {"budget": 10 ** 40}}, 422,
     "invalid_request", "at most"),
    ("absurd 1e400 budget", "post", "/v1/plans", {"json": OK | {"budget": "1e400"}}, 422,
     "invalid_budget", "1 PiB"),
    ("absurd TB budget", "post", "/v1/plans", {"json": OK | {"budget": "9" * 30 + "TB"}}, 422,
     "invalid_budget", "1 PiB"),
    ("absurd bpp budget", "post", "/v1/plans", {"json": OK | {"budget": "100bpp"}}, 422,
     "invalid_budget", "64 bits"),
    ("one-byte budget", "post", "/v1/plans", {"json": OK | {"budget": 1}}, 422,
     "infeasible_budget", "minimum feasible"),
    ("below-minimum x budget", "post", "/v1/plans", {"json": OK | {"budget": "0.0001x"}}, 422,
     "infeasible_budget", "11488"),
    ("below-minimum bpp budget", "post", "/v1/plans", {"json": OK | {"budget": "0.1bpp"}}, 422,
     "infeasible_budget", "minimum feasible"),
    ("unknown unit parsecs", "post", "/v1/plans", {"json": OK | {"budget": "12 parsecs"}}, 422,
     "invalid_budget", "unit"),
    ("unknown unit bits", "post", "/v1/plans", {"json": OK | {"budget": "3bits"}}, 422,
     "invalid_budget", "unit"),
    # models: unknown, unreachable, escapes, remote code, pickle, not a model
    ("hub id (offline)", "post", "/v1/plans", {"json": OK | {"model": "meta-llama/Llama-2-7b"}},
     404, "model_not_found", "not found"),
    ("url model", "post", "/v1/plans", {"json": OK | {"model": "https://evil.example/m"}}, 404,
     "model_not_found", "not found"),
    ("control characters", "post", "/v1/plans", {"json": OK | {"model": "tiny\x00qwen"}}, 422,
     "invalid_model", "control"),
    ("nested dotdot", "post", "/v1/plans", {"json": OK | {"model": "tiny-qwen/../../x"}}, 422,
     "invalid_model", ".."),
    ("backslash", "post", "/v1/plans", {"json": OK | {"model": "..\\etc"}}, 422,
     "invalid_model", "backslash"),
    ("register dotdot", "post", "/v1/models", {"json": {"model": "../tiny-qwen"}}, 422,
     "invalid_model", ".."),
    ("absolute path to a file outside", "post", "/v1/plans",
     {"json": OK | {"model": "/etc/passwd"}}, 422, "invalid_model", "outside"),
    ("symlink to a model outside", "post", "/v1/plans", {"json": OK | {"model": "outside-link"}},
     422, "invalid_model", "outside"),
    ("remote code model", "post", "/v1/plans", {"json": OK | {"model": "remote-code"}}, 422,
     "invalid_model", "remote code"),
    ("pickle-only checkpoint", "post", "/v1/plans", {"json": OK | {"model": "pickle-only"}},
     422, "invalid_model", "safetensors"),
    ("no config.json", "post", "/v1/plans", {"json": OK | {"model": "no-config"}}, 422,
     "invalid_model", "config.json"),
    ("config not json", "post", "/v1/models", {"json": {"model": "bad-config"}}, 422,
     "invalid_model", "config.json"),
    ("corrupt safetensors", "post", "/v1/plans", {"json": OK | {"model": "corrupt-weights"}},
     422, "invalid_model", "safetensors"),
    ("config without model_type", "post", "/v1/models", {"json": {"model": "no-model-type"}},
     422, "invalid_model", "model_type"),
    ("unknown architecture", "post", "/v1/models", {"json": {"model": "unknown-arch"}}, 422,
     "invalid_model", "no-such-arch"),
    ("config and weights disagree", "post", "/v1/plans",
     {"json": OK | {"model": "config-weights-mismatch"}}, 422, "invalid_model",
     "do not match"),
    ("model is a file", "post", "/v1/plans", {"json": OK | {"model": "a-file"}}, 422,
     "invalid_model", "not a directory"),
    # constraints: unknown keys, types, out-of-range bits/ranks/group sizes, globs
    ("unknown constraint key", "post", "/v1/plans", {"json": _c({"speed": 1})}, 422,
     "invalid_request", "unknown constraint keys"),
    ("max_bits 99", "post", "/v1/plans", {"json": _c({"max_bits": 99})}, 422,
     "invalid_request", "max_bits"),
    ("min_bits negative", "post", "/v1/plans", {"json": _c({"min_bits": -1})}, 422,
     "invalid_request", "min_bits"),
    ("min_bits a string", "post", "/v1/plans", {"json": _c({"min_bits": "four"})}, 422,
     "invalid_request", "min_bits"),
    ("min_bits fractional", "post", "/v1/plans", {"json": _c({"min_bits": 3.5})}, 422,
     "invalid_request", "integer"),
    ("empty glob", "post", "/v1/plans", {"json": _c({"pinned": {"": {"bits": 4}}})}, 422,
     "invalid_request", "non-empty"),
    ("min_bits above max_bits", "post", "/v1/plans",
     {"json": _c({"min_bits": 6, "max_bits": 3})}, 422, "invalid_request", "min_bits"),
    ("negative rank", "post", "/v1/plans", {"json": _c({"allowed_ranks": [-3]})}, 422,
     "invalid_request", "allowed_ranks"),
    ("ranks a string", "post", "/v1/plans", {"json": _c({"allowed_ranks": "abc"})}, 422,
     "invalid_request", "allowed_ranks"),
    ("absurd rank", "post", "/v1/plans", {"json": _c({"allowed_ranks": [10 ** 9]})}, 422,
     "invalid_request", "allowed_ranks"),
    ("pinned bits 99", "post", "/v1/plans", {"json": _c({"pinned": {"*q_proj": {"bits": 99}}})},
     422, "invalid_request", "bits"),
    ("pinned factor_bits 1", "post", "/v1/plans",
     {"json": _c({"pinned": {"*q_proj": {"factor_bits": 1}}})}, 422, "invalid_request",
     "factor_bits"),
    ("pinned group_size 0", "post", "/v1/plans",
     {"json": _c({"pinned": {"*q_proj": {"group_size": 0}}})}, 422, "invalid_request",
     "group_size"),
    ("pinned unknown field", "post", "/v1/plans",
     {"json": _c({"pinned": {"*q_proj": {"colour": 1}}})}, 422, "invalid_request", "colour"),
    ("pinned not a mapping", "post", "/v1/plans", {"json": _c({"pinned": {"*q_proj": "x"}})},
     422, "invalid_request", "pinned"),
    ("max_bits glob matches nothing", "post", "/v1/plans",
     {"json": _c({"max_bits": {"decoder.*": 4}})}, 422, "invalid_request", "matches no linear"),
    ("pinned glob matches nothing", "post", "/v1/plans",
     {"json": _c({"pinned": {"*.conv": {"bits": 4}}})}, 422, "invalid_request",
     "matches no linear"),
    ("ties glob matches nothing", "post", "/v1/plans", {"json": _c({"ties": [["zzz*"]]})}, 422,
     "invalid_request", "matches no linear"),
    ("ties not a list", "post", "/v1/plans", {"json": _c({"ties": 5})}, 422, "invalid_request",
     "ties"),
]


@pytest.fixture(scope="module")
def bad_models(model_root, tiny_model, tmp_path_factory) -> Path:
    """Next to tiny-qwen: models the service must refuse, and an escape through a symlink."""
    outside = tmp_path_factory.mktemp("outside-roots")
    write_tiny_model(outside / "m", tokenizer=False)
    specs = {"remote-code": "auto_map", "pickle-only": "pickle", "no-config": "no-config",
             "bad-config": "bad-config", "corrupt-weights": "corrupt", "no-model-type": "{}",
             "unknown-arch": "unknown-arch", "config-weights-mismatch": "mismatch"}
    for name, kind in specs.items():
        d = model_root / name
        if d.exists():
            continue
        d.mkdir()
        cfg = json.loads((tiny_model / "config.json").read_text())
        if kind == "auto_map":
            cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
        cfg = {"{}": {}, "unknown-arch": {"model_type": "no-such-arch"},
               "mismatch": {k: v for k, v in cfg.items() if k != "layer_types"}
               | {"num_hidden_layers": 4}}.get(kind, cfg)
        if kind != "no-config":
            (d / "config.json").write_text("{not json" if kind == "bad-config"
                                           else json.dumps(cfg))
        if kind == "pickle":
            (d / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")
        elif kind == "corrupt":
            (d / "model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{truncated")
        else:
            shutil.copy(tiny_model / "model.safetensors", d / "model.safetensors")
    if not (model_root / "outside-link").exists():
        (model_root / "outside-link").symlink_to(outside / "m", target_is_directory=True)
    (model_root / "a-file").write_text("not a model")
    return model_root


@pytest.fixture(scope="module")
def shared_env(tmp_path_factory, bad_models):
    from service.db.migrate import upgrade

    tmp = tmp_path_factory.mktemp("bad-input")
    url = f"sqlite:///{tmp / 'bitplan.sqlite3'}"
    upgrade(url)
    settings = make_settings(tmp, url, model_roots=[bad_models], max_concurrent_jobs_per_team=0)
    return make_env(settings, queue=RecordingQueue())


def _send(env, case):
    _, method, path, kwargs, status, _, _ = case
    kwargs = dict(kwargs)
    headers = (kwargs.pop("headers", None) or {}) | env.h("alpha")
    r = getattr(env.client, method)(path, headers=headers, **kwargs)
    assert r.status_code == status, r.text
    return r


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input(shared_env, case):
    *_, code, fragment = case
    err = _send(shared_env, case).json()["error"]
    assert err["code"] == code, err
    assert fragment.lower() in err["message"].lower(), err
    assert "Traceback" not in err["message"] and len(err["message"]) < 1000


def test_nothing_was_enqueued_for_bad_requests(tmp_path, sqlite_url, bad_models):
    """Every refused plan request of the table leaves no plan, no job and nothing on the queue
    (the checks run before anything is written); a good one is then queued, so the recording
    queue did see what the API sent."""
    from service.db.models import Job, PlanRow

    env = make_env(make_settings(tmp_path, sqlite_url, model_roots=[bad_models]),
                   queue=RecordingQueue())
    plan_cases = [c for c in API_CASES if c[1:3] == ("post", "/v1/plans")]
    assert len(plan_cases) > 40
    for case in plan_cases:
        _send(env, case)
    assert env.queue.sent == []
    with env.db.session() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Job)) == 0
        assert s.scalar(sa.select(sa.func.count()).select_from(PlanRow)) == 0
    r = env.client.post("/v1/plans", json=OK, headers=env.h("alpha"))
    assert r.status_code == 202, r.text
    assert [task for task, _ in env.queue.sent] == ["bitplan.profile"]   # no profile yet


def test_remote_code_allowed_only_by_operator(tmp_path, sqlite_url, bad_models):
    """A model that needs remote code is refused by default; with the operator's
    trust_remote_code on, the same request registers it (inventory read from its headers)."""
    def register(**extra):
        env = make_env(make_settings(tmp_path, sqlite_url, model_roots=[bad_models], **extra),
                       queue=RecordingQueue())
        return env.client.post("/v1/models", json={"model": "remote-code"},
                               headers=env.h("alpha"))

    r = register()
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_model"
    assert "remote code" in r.json()["error"]["message"]
    r = register(trust_remote_code=True)
    assert r.status_code == 201, r.text
    model = r.json()
    assert model["ref"] == "remote-code" and model["num_linears"] == 15
    assert not model["profiled"]


def test_team_job_limit_is_a_clear_429(tmp_path, sqlite_url, model_root, tiny_model):
    settings = make_settings(tmp_path, sqlite_url, model_roots=[model_root],
                             max_concurrent_jobs_per_team=3)
    env = make_env(settings, queue=RecordingQueue())
    for i in range(3):
        r = env.client.post("/v1/plans", json=OK | {"budget": f"0.9{i}x"},
                            headers=env.h("alpha") | {"Idempotency-Key": f"k{i}"})
        assert r.status_code == 202, r.text
    r = env.client.post("/v1/plans", json=OK, headers=env.h("alpha"))
    assert r.status_code == 429 and r.headers["retry-after"]
    assert r.json()["error"]["code"] == "too_many_jobs"
    assert "limit 3" in r.json()["error"]["message"]
    # a replay of an accepted request is not a new job; another team has its own quota
    again = env.client.post("/v1/plans", json=OK | {"budget": "0.90x"},
                            headers=env.h("alpha") | {"Idempotency-Key": "k0"})
    assert again.status_code == 200
    assert env.client.post("/v1/plans", json=OK, headers=env.h("beta")).status_code == 202


def test_team_job_limit_covers_compress_requests(tmp_path, sqlite_url, model_root, tiny_model):
    """Compressing a solved plan is a new job too: over the limit it is a 429; asking again for
    a plan already being compressed is not a new job and is never refused."""
    import sqlalchemy as sa

    from service.db.models import PlanRow, Team
    from service.jobs.submit import resolve_and_register

    settings = make_settings(tmp_path, sqlite_url, model_roots=[model_root],
                             max_concurrent_jobs_per_team=1)
    env = make_env(settings, queue=RecordingQueue())
    model = resolve_and_register(env.db, "tiny-qwen", settings)
    with env.db.session() as s:
        alpha = s.scalar(sa.select(Team).where(Team.name.like("alpha-%")))
        plans = [PlanRow(team_id=alpha.id, model_id=model.id, budget="0.9x", status="solved")
                 for _ in range(2)]
        s.add_all(plans)
        s.flush()
        first, second = (p.id for p in plans)
    h = env.h("alpha")
    r = env.client.post(f"/v1/plans/{first}/compress", headers=h)
    assert r.status_code == 202, r.text
    assert env.client.post(f"/v1/plans/{first}/compress", headers=h).status_code == 202
    r = env.client.post(f"/v1/plans/{second}/compress", headers=h)
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_jobs", r.text
