"""`bitplan bench gguf --quick` on the tiny Llama (bench/tiny_llama.py), every figure measured by
llama.cpp's own binaries in the run: the figures mean what the JSON says — bitplan's file no
larger than llama.cpp's mix and within 0.5 % of it, every 2-D tensor typed (types that fit
their rows), the KLD ratio recomputed from the two KLDs, the summary from the rows. And with
llama.cpp's tools missing: one line naming `make llama-cpp`, no stack trace."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from bench.tiny_llama import BLOCKS, HIDDEN, INTERMEDIATE
from service.settings import REPO_ROOT
from solver.gguf_types import fits_row
from tests.bench._run import bench, positive
from tests.helpers.llama_cpp import llama_cpp_bin

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    llama_cpp_bin()     # built when the cache lacks it
    return bench("gguf", tmp_path_factory.mktemp("bench-gguf"), "--quick", timeout=1200)


def test_bitplan_is_never_larger_than_the_mix_and_within_half_a_percent(quick):
    (row,) = quick["sizes"]
    assert row["size"] == row["llama_cpp"]["mix"] == "Q4_K_M"
    theirs, ours = row["llama_cpp"]["file_bytes"], row["bitplan"]["file_bytes"]
    assert ours <= theirs and (theirs - ours) / theirs <= 0.005
    assert quick["summary"]["never_larger"] is True


def test_every_planned_tensor_is_typed_with_a_type_its_rows_fit(quick):
    types = quick["sizes"][0]["bitplan"]["types"]
    assert len(types) == 7 * BLOCKS + 2                  # the blocks' linears, embedding, head
    cols = {"ffn_down": INTERMEDIATE}
    for name, t in types.items():
        width = next((c for k, c in cols.items() if k in name), HIDDEN)
        assert fits_row(t, width), (name, t)
    counts = quick["sizes"][0]["bitplan"]["type_counts"]
    assert sum(counts.values()) == len(types)
    assert counts == {t: list(types.values()).count(t) for t in set(types.values())}


def test_klds_and_their_ratio_are_llama_cpps_numbers(quick):
    row = quick["sizes"][0]
    for side in ("llama_cpp", "bitplan", "bitplan_plan_llama_rounding"):
        assert positive(row[side]["kld"], row[side]["ppl"]), (side, row[side])
        assert 0 <= row[side]["same_top"] <= 1
    assert row["kld_vs_llama_cpp"] == pytest.approx(
        row["bitplan"]["kld"] / row["llama_cpp"]["kld"] - 1)
    assert quick["summary"]["kld_vs_llama_cpp"] == [row["kld_vs_llama_cpp"]]
    assert quick["summary"]["never_worse"] is (row["kld_vs_llama_cpp"] <= 0)
    assert positive(row["llama_cpp"]["tok_s"], row["bitplan"]["tok_s"])
    assert quick["summary"]["decode_ratio"] == [pytest.approx(
        row["bitplan"]["tok_s"] / row["llama_cpp"]["tok_s"])]
    assert math.isfinite(row["bitplan"]["predicted_kl"]) and row["bitplan"]["predicted_kl"] > 0


def test_missing_tools_are_one_line_naming_make_llama_cpp(tmp_path):
    env = os.environ | {"BITPLAN_LLAMA_CPP_BIN": str(tmp_path / "none"),
                        "BITPLAN_DATA_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "service.cli", "bench", "gguf", "--quick",
                          "--json"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and "Traceback" not in out.stderr
    assert "make llama-cpp" in json.loads(out.stdout)["error"]
