"""Bad input to the local side — the CLI (arguments, files, environment) and YAML recipes, and
a model without tokenizer files — is refused with one clear line and exit status 2 (1 when a
service is down), or a ValueError naming the problem, never a traceback. The API's bad input is
in test_bad_input.py."""

from __future__ import annotations

import json
import shutil

import pytest

# ---------------------------------------------------------------- the CLI

@pytest.fixture
def cli_home(cli_home):
    """The shared CLI home (tests/helpers/fixtures.py) plus the bad constraint files."""
    (cli_home / "bad.json").write_text("{nope")
    (cli_home / "unknown.json").write_text(json.dumps({"speed": 3}))
    (cli_home / "range.json").write_text(json.dumps({"max_bits": 99}))
    return cli_home


CLI_CASES = [
    # (id, argv ({d} = the data dir), a fragment of the last stderr line)
    ("budget nonsense", ["plan", "tiny", "--budget", "nonsense"], "cannot parse budget"),
    ("budget negative", ["plan", "tiny", "--budget", "-1GB"], "budget"),
    ("budget unknown unit", ["plan", "tiny", "--budget", "3 parsecs"], "unit"),
    ("budget nan", ["plan", "tiny", "--budget", "nan"], "finite"),
    ("budget below minimum", ["plan", "tiny", "--budget", "100"], "minimum feasible"),
    ("budget absurd bpp", ["plan", "tiny", "--budget", "1000bpp"], "64 bits"),
    ("unknown method", ["plan", "tiny", "--budget", "1GB", "--method", "magic"], "invalid choice"),
    ("missing budget", ["plan", "tiny"], "--budget"),
    ("no stored profile", ["plan", "other", "--budget", "1GB"], "no stored profile"),
    ("no stored gguf profile", ["plan", "tiny", "--target", "gguf", "--budget", "1GB"],
     "no stored gguf profile"),
    ("unknown target", ["profile", "tiny", "--target", "onnx"], "invalid choice"),
    ("unknown gguf type", ["profile", "tiny", "--target", "gguf", "--gguf-types", "Q4_0,Q9_K"],
     "unknown GGUF type 'Q9_K'"),
    ("gguf types without the target", ["profile", "tiny", "--gguf-types", "Q4_0"],
     "--gguf-types applies to --target gguf"),
    ("constraints malformed json", ["plan", "tiny", "--budget", "0.5x", "--constraints",
                                    "{d}/bad.json"], "error"),
    ("constraints file missing", ["plan", "tiny", "--budget", "0.5x", "--constraints",
                                  "{d}/missing.json"], "missing.json"),
    ("constraints unknown key", ["plan", "tiny", "--budget", "0.5x", "--constraints",
                                 "{d}/unknown.json"], "unknown constraint keys"),
    ("unknown command", ["frobnicate"], "invalid choice"),
    ("unknown bench", ["bench", "nope"], "invalid choice"),
    ("worker bad queue", ["worker", "--queues", "tpu"], "unknown queue"),
    ("compress plan file missing", ["compress", "tiny", "--plan", "{d}/missing.json", "--out",
                                    "{d}/art"], "missing.json"),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_exits_2_with_one_line(cli_home, capsys, case):
    from service.cli import main

    _, argv, fragment = case
    argv = [a.replace("{d}", str(cli_home)) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exc:       # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    last = [ln for ln in err.strip().splitlines() if ln.strip()][-1]
    assert "error" in last and fragment.lower() in last.lower(), err


def test_a_gguf_profile_of_a_tokenizer_llama_cpp_refuses_stops_before_any_work(cli_home,
                                                                               capsys):
    """The demo's BPE pre-tokenizer is one llama.cpp's converter does not recognise: `bitplan
    profile --target gguf` says so in one line (its vocabulary pass, seconds) instead of
    profiling for minutes and failing at compress."""
    from service.cli import main
    from service.settings import DEMO_MODEL
    from tests.helpers.llama_cpp import llama_cpp_source

    llama_cpp_source()
    index = (cli_home / "profiles" / "index.json").read_text()
    code = main(["profile", str(DEMO_MODEL), "--target", "gguf"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    last = [ln for ln in err.strip().splitlines() if ln.strip()][-1]
    assert "converter failed" in last and "pre-tokenizer was not recognized" in last, err
    assert (cli_home / "profiles" / "index.json").read_text() == index   # nothing profiled


@pytest.mark.parametrize("env,argv,status,fragment", [
    ({"BITPLAN_DATABASE_URL": "nonsense://x"}, ["teams", "list"], 2, "nonsense"),
    ({"BITPLAN_DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:1/none"},
     ["teams", "list"], 1, "database unavailable"),
    ({"BITPLAN_MAX_BODY_BYTES": "lots"}, ["teams", "list"], 2, "max_body_bytes"),
    ({}, ["sweep", "--loop", "--interval", "0"], 2, "positive"),
], ids=["bad database url", "database unreachable", "bad setting", "sweep bad interval"])
def test_cli_environment_errors_are_one_line(tmp_path, monkeypatch, capsys, env, argv, status,
                                             fragment):
    from service.cli import main
    from service.settings import get_settings

    monkeypatch.setenv("BITPLAN_DATA_DIR", str(tmp_path))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    try:
        code = main(argv)
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("bitplan ")]
    assert code == status and "Traceback" not in err, err
    assert len(lines) == 1 and fragment in lines[0], err


# ---------------------------------------------------------------- YAML recipes

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
YAML_CASES = [
    ("malformed yaml", "default: {bits: 4\n", "not valid YAML"),
    ("tab indentation", "default:\n\tbits: 4\n", "not valid YAML"),
    ("not a mapping", "- bits: 4\n", "must be a mapping"),
    ("scalar document", "just words", "must be a mapping"),
    ("unknown top-level key", "default: {bits: 4}\nspeed: fast\n", "unknown keys"),
    ("unknown option field", "default: {bits: 4, colour: red}\n", "unknown option fields"),
    ("default not a mapping", "default: 4\n", "must be a mapping"),
    ("overrides not a mapping", "default: {bits: 4}\npattern_overrides: [1, 2]\n",
     "pattern_overrides"),
    ("bits out of range", "default: {bits: 99}\n", "bits must be in"),
    ("bits zero", "default: {bits: 0}\n", "bits must be in"),
    ("factor bits out of range", "default: {bits: 4, factor_bits: 1}\n", "factor_bits"),
    ("negative rank", "default: {bits: 4, rank: -8}\n", "rank"),
    ("group size zero", "default: {bits: 4, group_size: 0}\n", "group_size"),
    ("bits a string", "default: {bits: four}\n", "q_proj"),
    ("no bits anywhere", "default: {rank: 8}\n", "no bits"),
    ("glob matches nothing", "default: {bits: 4}\npattern_overrides:\n  '*.conv': {bits: 3}\n",
     "matches no linear"),
    ("override out of range", "default: {bits: 4}\npattern_overrides:\n  '*q_proj': {bits: 1}\n",
     "bits must be in"),
]


@pytest.mark.parametrize("case", YAML_CASES, ids=[c[0] for c in YAML_CASES])
def test_yaml_recipe_bad_input(case):
    from solver.recipes import plan_from_yaml

    _, text, fragment = case
    with pytest.raises(ValueError) as info:
        plan_from_yaml(text, NAMES)
    assert fragment.lower() in str(info.value).lower()


def test_load_tokenizer_without_tokenizer_files(model_root, tiny_model):
    from compressor.checkpoint.loading import ModelLoadError, load_tokenizer

    bare = model_root / "no-tokenizer"
    if not bare.exists():
        bare.mkdir()
        for f in ("config.json", "model.safetensors"):
            shutil.copy(tiny_model / f, bare / f)
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_tokenizer(str(bare))
