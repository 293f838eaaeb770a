"""Request bodies are JSON with strict types: no coercion of strings to booleans or integers,
a 415 naming `application/json` for other media types, and a 415 for encoded (gzip) bodies.
Every case here was accepted, or answered unclearly, before."""

from __future__ import annotations

import gzip
import json

import pytest

from tests.helpers.api import RecordingQueue, make_env, make_settings

OK = {"model": "tiny-qwen", "budget": "0.9x"}


def _body(obj: object, content_type: str | None = "application/json", **headers: str) -> dict:
    h = dict(headers)
    if content_type is not None:
        h["content-type"] = content_type
    return {"content": json.dumps(obj).encode(), "headers": h}


# (id, path, request kwargs, status, error code, fragments the message must contain)
CASES = [
    # strict types: no string/number coercion into booleans or integers
    ("compress 'yes'", "/v1/plans", {"json": OK | {"compress": "yes"}}, 422, "invalid_request",
     ["compress", "boolean"]),
    ("compress 'true'", "/v1/plans", {"json": OK | {"compress": "true"}}, 422,
     "invalid_request", ["compress"]),
    ("compress 1", "/v1/plans", {"json": OK | {"compress": 1}}, 422, "invalid_request",
     ["compress"]),
    ("compress 0", "/v1/plans", {"json": OK | {"compress": 0}}, 422, "invalid_request",
     ["compress"]),
    # media types: JSON only, and say so
    ("text/plain json", "/v1/plans", _body(OK, "text/plain"), 415, "unsupported_media_type",
     ["application/json", "text/plain"]),
    ("no content type", "/v1/plans", _body(OK, None), 415, "unsupported_media_type",
     ["application/json"]),
    ("form encoded", "/v1/plans", {"data": {"model": "tiny-qwen", "budget": "0.9x"}}, 415,
     "unsupported_media_type", ["application/json"]),
    ("text/plain model", "/v1/models", _body({"model": "tiny-qwen"}, "text/plain"), 415,
     "unsupported_media_type", ["application/json"]),
    # encodings: identity only
    ("gzip body", "/v1/plans",
     {"content": gzip.compress(json.dumps(OK).encode()),
      "headers": {"content-type": "application/json", "content-encoding": "gzip"}}, 415,
     "unsupported_media_type", ["gzip", "identity"]),
    ("deflate body", "/v1/models",
     _body({"model": "tiny-qwen"}, **{"content-encoding": "deflate"}), 415,
     "unsupported_media_type", ["deflate", "identity"]),
]


@pytest.fixture(scope="module")
def env(tmp_path_factory, model_root, tiny_model):
    from service.db.migrate import upgrade

    tmp = tmp_path_factory.mktemp("strict-input")
    url = f"sqlite:///{tmp / 'bitplan.sqlite3'}"
    upgrade(url)
    settings = make_settings(tmp, url, model_roots=[model_root], max_concurrent_jobs_per_team=0)
    return make_env(settings, queue=RecordingQueue())


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_strict_request_bodies(env, case):
    _, path, kwargs, status, code, fragments = case
    kwargs = dict(kwargs)
    headers = (kwargs.pop("headers", None) or {}) | env.h("alpha")
    r = env.client.post(path, headers=headers, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    for fragment in fragments:
        assert fragment.lower() in err["message"].lower(), err
    assert "Traceback" not in err["message"]


def test_nothing_enqueued_for_refused_bodies(env):
    assert env.queue.sent == []


@pytest.mark.parametrize("kwargs", [
    {"json": OK | {"compress": False, "budget": 900_000}},
    {"json": OK | {"budget": 9.0e5}},                       # a whole float is still bytes
    _body(OK, "application/json; charset=utf-8"),
    _body(OK, "application/vnd.api+json"),
    _body(OK, **{"content-encoding": "identity"}),
], ids=["strict bool and int", "whole float budget", "charset", "+json", "identity"])
def test_legitimate_bodies_still_accepted(env, kwargs):
    kwargs = dict(kwargs)
    headers = (kwargs.pop("headers", None) or {}) | env.h("beta")
    r = env.client.post("/v1/plans", headers=headers, **kwargs)
    assert r.status_code in (200, 202), r.text


def test_bodyless_post_needs_no_content_type(env):
    """POST /v1/plans/{id}/compress has no body: no content type is required (404 here)."""
    r = env.client.post("/v1/plans/nope/compress", headers=env.h("alpha"))
    assert r.status_code == 404, r.text
