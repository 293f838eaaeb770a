"""Broken weights (Git LFS pointer, truncated), a non-causal checkpoint (BERT) and a model
without tokenizer files are refused up front by every command and by POST /v1/plans, in one
line that names the cause."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers.api import RecordingQueue, make_env, make_settings


def _lfs(d: Path) -> None:
    (d / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "a" * 64 + "\nsize 1234567\n")


def _truncated(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-4096])


def _bert(d: Path) -> None:
    from transformers import BertConfig, BertModel

    shutil.rmtree(d)
    cfg = BertConfig(vocab_size=264, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(d, safe_serialization=True)


KINDS = {"lfs-pointer": (_lfs, "git lfs pull"), "truncated": (_truncated, "truncated"),
         "bert": (_bert, "decoder-only causal LMs")}


@pytest.fixture(scope="module")
def broken_models(model_root, tiny_model) -> Path:
    for name, (damage, _) in KINDS.items():
        d = model_root / f"broken-{name}"
        if not d.exists():
            shutil.copytree(tiny_model, d)
            damage(d)
    return model_root


COMMANDS = [["layers", "{m}"], ["eval", "{m}"], ["generate", "{m}", "hello"],
            ["profile", "{m}"], ["compress", "{m}", "--budget", "0.5x", "--out", "{t}/art"]]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("argv", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_command_refuses_in_one_line(broken_models, tmp_path, monkeypatch, capsys, kind,
                                           argv):
    from service.cli import main
    from service.settings import get_settings

    monkeypatch.setenv("BITPLAN_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    model = broken_models / f"broken-{kind}"
    try:
        code = main([a.format(m=model, t=tmp_path) for a in argv])
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert lines[-1].startswith(f"bitplan {argv[0]}: error:"), err
    assert KINDS[kind][1] in lines[-1], err
    if kind != "bert":
        assert "model.safetensors" in lines[-1], err


@pytest.fixture(scope="module")
def env(tmp_path_factory, broken_models):
    from service.db.migrate import upgrade

    tmp = tmp_path_factory.mktemp("refusals")
    url = f"sqlite:///{tmp / 'bitplan.sqlite3'}"
    upgrade(url)
    return make_env(make_settings(tmp, url, model_roots=[broken_models]), queue=RecordingQueue())


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("route", ["/v1/plans", "/v1/models"])
def test_api_refuses_with_422(env, kind, route):
    body = {"model": f"broken-{kind}"} | ({"budget": "0.9x"} if route == "/v1/plans" else {})
    r = env.client.post(route, json=body, headers=env.h("alpha"))
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_model" and KINDS[kind][1] in err["message"], err
    assert "\n" not in err["message"]
    assert not env.queue.sent


def test_cli_without_tokenizer_files_says_what_it_looked_for(model_root, tiny_model, tmp_path,
                                                             monkeypatch, capsys):
    from service.cli import main
    from service.settings import get_settings

    bare = model_root / "no-tokenizer-files"
    if not bare.exists():
        bare.mkdir()
        for f in ("config.json", "model.safetensors"):
            shutil.copy(tiny_model / f, bare / f)
    monkeypatch.setenv("BITPLAN_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    try:
        code = main(["eval", str(bare)])
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "NoneType" not in err
    assert "no tokenizer files" in err and "tokenizer.json" in err and "none found" in err, err
