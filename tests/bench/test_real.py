"""`bitplan bench real --quick` on a tiny Llama GGUF written here with the `gguf` package (the
bench imports it, as `make smollm2` imports SmolLM2's): the figures mean what they say, each
recomputed from the imported model's own safetensors file — every parameter counted once, the
optimum within each budget, its bytes the kept tensors' plus every planned tensor's (the tied
embedding too), the timing ratio the ratio of the timings. And without the model: one line
naming `make smollm2`, no stack trace."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from argparse import Namespace
from fractions import Fraction

import pytest
from safetensors import safe_open

import bench.real as real
import solver
from bench.tiny_gguf import BLOCKS, tiny_tokenizer, write_tiny_llama_gguf
from compressor.checkpoint.gguf_import import import_gguf
from service.settings import REPO_ROOT
from solver.bytes import option_bytes
from tests.bench._run import bench, positive

pytestmark = pytest.mark.slow

# the tiny model's work is overhead-bound: beside another busy process on a 2-core machine,
# torch's thread pool contending for the cores makes it ~10x slower (the figures are the same)
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench-real")
    gguf = write_tiny_llama_gguf(tmp / "tiny.gguf")
    # the same import the bench runs on the file, here only to read the model it measured
    model = import_gguf(gguf, tmp / "model", progress=lambda line: None).out
    fig = bench("real", tmp / "data", "--quick", timeout=300,
                env={"BITPLAN_BENCH_REAL_MODEL": str(gguf)} | ONE_THREAD)
    return fig, model


def _tensors(model) -> dict[str, tuple[tuple[int, ...], int]]:
    """name → (shape, stored bytes) of every tensor in the imported model's safetensors file."""
    out = {}
    with safe_open(str(model / "model.safetensors"), "pt") as f:
        for k in f.keys():
            t = f.get_slice(k)
            shape = tuple(t.get_shape())
            out[k] = (shape, math.prod(shape) * {"BF16": 2, "F16": 2, "F32": 4}[t.get_dtype()])
    return out


def test_quick_figures_are_what_they_claim(quick):
    fig, model = quick
    assert fig["quick"] is True and "error" not in fig
    for key in ("model", "profile_s", "compress_s", "profile_over_compress", "peak_rss_bytes",
                "budgets", "embedding_in_plan", "goal", "checks"):
        assert key in fig, key
    tensors = _tensors(model)
    # every parameter, once: the file holds the tied embedding once (no lm_head.weight)
    params = sum(math.prod(shape) for shape, _ in tensors.values())
    planned = {k.removesuffix(".weight"): shape for k, (shape, _) in tensors.items()
               if len(shape) == 2}
    kept_bytes = sum(b for shape, b in tensors.values() if len(shape) == 1)
    assert "lm_head.weight" not in tensors and len(planned) == 1 + 7 * BLOCKS
    m = fig["model"]
    assert m["params"] == params and m["fp16_bytes"] == 2 * params and m["tied"] is True
    assert (m["blocks"], m["vocab"], m["dtype"]) == (BLOCKS, len(tiny_tokenizer()[0]), "bfloat16")
    assert m["kept_bytes"] == kept_bytes > 0

    # timings measured in this run; compress_s is the compression and the artifact's writing
    assert positive(fig["profile_s"], fig["compress_s"])
    assert fig["profile_over_compress"] == fig["profile_s"] / fig["compress_s"]
    stage = fig["compress_stage_s"]
    assert fig["compress_s"] == stage["compress"] + stage["save"] and stage["evaluate"] > 0
    assert fig["profile_s"] >= fig["profile_stats"]["wall_s"] - 0.01   # one fresh profile
    assert fig["goal"]["profile_over_compress_le_3"] == (fig["profile_over_compress"] <= 3)
    through = fig["peak_rss_bytes_through"]
    assert through["profile"] <= through["compress"] <= through["experiment"]
    assert fig["peak_rss_bytes"] >= through["experiment"] > 100 * 2**20

    assert [r["budget"] for r in fig["budgets"]] == ["3.5bpp", "4.5bpp"]
    fb = fig["profile_config"]["factor_bits"]
    for row in fig["budgets"]:
        # "Xbpp" counts every parameter, the embedding's and the norms' included
        assert row["budget_bytes"] == math.floor(Fraction(row["budget"][:-3]) * params / 8)
        plan = {n: solver.Option(b, r, f, g) for n, (b, r, f, g) in row["optimal_plan"].items()}
        assert set(plan) == set(planned) and "model.embed_tokens" in plan
        assert {o.factor_bits for o in plan.values()} == {fb}
        opt = row["optimal"]
        assert opt["bytes"] == kept_bytes + sum(option_bytes(*planned[n], o)
                                                for n, o in plan.items())
        assert opt["bytes"] <= row["budget_bytes"]
        assert opt["bits_per_param"] == pytest.approx(8 * opt["bytes"] / params, rel=1e-12)
        for name in ("optimal", "uniform", "best_format"):
            s = row[name]
            assert s["bytes"] <= row["budget_bytes"], name
            assert s["kl"] >= 0 and 0 <= s["top1"] <= 1 and positive(s["ppl"], s["predicted"])
            # the solver's plan is the optimum of the fitted model: no baseline predicts lower
            assert opt["predicted"] <= s["predicted"] * (1 + 1e-9), name
        for name, other in (("uniform", row["uniform"]), ("best_format", row["best_format"])):
            assert row[f"kl_vs_{name}_pct"] == pytest.approx(100 * (1 - opt["kl"] / other["kl"]))
    assert fig["goal"]["min_kl_vs_uniform_pct"] == min(r["kl_vs_uniform_pct"]
                                                       for r in fig["budgets"])
    assert fig["embedding_in_plan"] is True
    assert fig["checks_ok"] is True and all(fig["checks"].values()), fig["checks"]

    # the timed pass wrote the 3.5bpp optimum: the artifact holds its bytes, and measured
    # streamed and packed it is what the experiment measured for that plan
    cp, opt = fig["compress_pass"], fig["budgets"][0]["optimal"]
    assert cp["artifact_tensor_bytes"] == cp["planned_bytes"] == opt["bytes"]
    assert cp["kl"] == pytest.approx(cp["experiment_kl"], rel=1e-2) and cp["experiment_kl"] == \
        opt["kl"]


def test_a_missing_model_says_make_smollm2(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(real.ENV, raising=False)
    monkeypatch.setattr(real, "SMOLLM2", tmp_path / "smollm2-135m")
    out = real.run(Namespace(quick=False, json=True))
    assert list(out) == ["error"] and "make smollm2" in out["error"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "make smollm2" in err[0]


def test_a_missing_model_through_the_cli_is_one_error_line(tmp_path):
    env = os.environ | {"BITPLAN_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1",
                        "BITPLAN_BENCH_REAL_MODEL": str(tmp_path / "absent")}
    out = subprocess.run([sys.executable, "-m", "service.cli", "bench", "real", "--json"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]   # as every bench reports what it lacks
    assert "make smollm2" in json.loads(out.stdout)["error"]
    assert "Traceback" not in out.stderr
    assert [ln for ln in out.stderr.splitlines() if "bench real" in ln] == [
        "bench real: " + json.loads(out.stdout)["error"]]
