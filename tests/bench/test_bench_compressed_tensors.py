"""`bitplan bench compressed-tensors --quick` on the tiny Llama: every figure means what the JSON
says — each export loaded by transformers + compressed-tensors (+ PEFT) scores within 1e-3 of
bitplan's own decode, its stored bytes are the planned ones and bitplan's plan never exceeds
the uniform model's bytes, fused modules share a scheme, the library's KL is the streamed
measurement's on the same text, and the comparison is recomputed from the two KLs."""

from __future__ import annotations

import pytest

from bench.tiny_llama import BLOCKS
from tests.bench._run import bench, positive

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    return bench("compressed-tensors", tmp_path_factory.mktemp("bench-ct"), "--quick",
                 timeout=1200)


def test_each_export_is_what_was_planned_and_loads_as_ours(quick):
    (row,) = quick["rows"]
    uni, ours, first = row["uniform"], row["bitplan"], row["bitplan_profile"]
    assert uni["bytes"] == uni["planned_bytes"] == row["budget_bytes"]
    assert ours["bytes"] == ours["planned_bytes"] <= row["budget_bytes"]
    assert uni["schemes"] == {"W4A16-g128": 7 * BLOCKS}   # 256/512-wide rows take 128-groups
    assert sum(ours["schemes"].values()) == 7 * BLOCKS
    assert first["bytes"] <= row["budget_bytes"]
    guard = row["guard"]    # the guard keeps a re-solved plan only when it measured lower
    assert guard["tune_kl_after"] <= guard["tune_kl_before"]
    assert (ours is first or ours == first) == (guard["tune_kl_after"] == guard["tune_kl_before"])
    for e in (uni, ours, first):
        assert e["ties_respected"] is True
        assert 0 <= e["max_logit_rel_diff"] <= 1e-5   # the contract: ≤ 1e-3
        assert positive(e["kl"], e["streamed_kl"], e["predicted_kl"], e["tokens"])
        assert e["kl"] == pytest.approx(e["streamed_kl"], rel=1e-2)   # same text, two readers
        assert 0 < e["top1"] <= 1
        assert ("--enable-lora" in e["serve"]) == (e["lora_modules"] > 0)
    assert quick["ties_respected"] is True
    assert quick["max_logit_rel_diff"] == max(e["max_logit_rel_diff"]
                                              for e in (uni, ours, first))


def test_the_comparison_is_the_two_kls(quick):
    (row,) = quick["rows"]
    pct = 100 * (row["bitplan"]["kl"] / row["uniform"]["kl"] - 1)
    assert row["kl_vs_uniform_pct"] == pytest.approx(pct, abs=0.01)
    assert quick["goal"]["kl_below_uniform_w4_pct"] == -row["kl_vs_uniform_pct"]
    assert quick["eval"]["split"] == "test" and quick["quick"] is True
