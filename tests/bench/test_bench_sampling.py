"""`bitplan bench sampling --quick` on small widths and a tiny random model: the batched Q-only
samples agree with the one-at-a-time ones, and every timing figure is finite and positive."""

import math

import pytest

from tests.bench._run import bench, positive

pytestmark = pytest.mark.slow


def test_bench_sampling_quick(tmp_path, tiny_model):
    fig = bench("sampling", tmp_path / "data", "--quick",
                env={"BITPLAN_BENCH_MODEL": str(tiny_model)})
    assert fig["quick"] is True and fig["device"] == "cpu"
    assert fig["variants"] == [[2, 128], [3, 128], [4, 128], [6, 128],
                               [2, 256], [4, 256], [2, 512], [4, 512]]
    assert [r["shape"] for r in fig["shapes"]] == [[96, 320], [200, 192]]
    for row in fig["shapes"]:
        assert row["samples"] == 8
        assert 0 <= row["max_rel_diff_t2"] < 1e-3, row
        assert 0 <= row["code_mismatch_fraction"] < 1e-3, row
        assert positive(row["sequential_s"], row["batched_s"], row["speedup"],
                        row["ldlq_sequential_s"], row["ldlq_batched_s"], row["ldlq_speedup"])
        assert row["speedup"] == pytest.approx(row["sequential_s"] / row["batched_s"], rel=0.05)
        assert set(row["block_sweep"]) == {"16", "64"} and positive(*row["block_sweep"].values())
        assert row["best_block"] in (16, 64) and row["default_block"] == 128
    prof = fig["profile"]
    assert positive(prof["profile_s"], prof["compress_s"], prof["profile_sampling_s"],
                    prof["profile_probe_s"], prof["compress_bpp"])
    assert fig["profile_over_compress"] == prof["profile_over_compress"]
    assert math.isclose(prof["profile_over_compress"], prof["profile_s"] / prof["compress_s"],
                        rel_tol=0.01)
    assert 3 < prof["compress_bpp"] < 4 and prof["linears"] == 14
