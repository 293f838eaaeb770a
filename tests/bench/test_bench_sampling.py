"""`bitplan bench sampling --quick` on small widths and a tiny random model: the batched Q-only
samples agree with the one-at-a-time ones, every timing is finite and positive and each speedup
is the ratio of the times beside it, and the compression pass it times is the 3-bit plan it
names (its bits per parameter recomputed here from the model's shapes)."""

import math

import pytest

from solver.bytes import Option, option_bytes
from tests.bench._run import bench, linear_shapes, positive

pytestmark = pytest.mark.slow


def test_bench_sampling_quick(tmp_path, tiny_model):
    fig = bench("sampling", tmp_path / "data", "--quick",
                env={"BITPLAN_BENCH_MODEL": str(tiny_model)})
    assert fig["quick"] is True and fig["device"] == "cpu"
    assert fig["variants"] == [[2, 128], [3, 128], [4, 128], [6, 128],
                               [2, 256], [4, 256], [2, 512], [4, 512]]
    assert [r["shape"] for r in fig["shapes"]] == [[96, 320], [200, 192]]
    for row in fig["shapes"]:
        assert row["samples"] == len(fig["variants"])
        assert 0 <= row["max_rel_diff_t2"] < 1e-3, row
        assert 0 <= row["code_mismatch_fraction"] < 1e-3, row
        assert positive(row["sequential_s"], row["batched_s"], row["speedup"],
                        row["ldlq_sequential_s"], row["ldlq_batched_s"], row["ldlq_speedup"])
        assert row["speedup"] == pytest.approx(row["sequential_s"] / row["batched_s"], rel=0.05)
        assert row["ldlq_speedup"] == pytest.approx(
            row["ldlq_sequential_s"] / row["ldlq_batched_s"], rel=0.05)
        sweep = row["block_sweep"]
        assert set(sweep) == {"16", "64"} and positive(*sweep.values())
        assert sweep[str(row["best_block"])] == min(sweep.values()), row
        assert row["default_block"] == 128
    prof = fig["profile"]
    assert positive(prof["profile_s"], prof["compress_s"], prof["profile_sampling_s"],
                    prof["profile_probe_s"])
    # the profile's sampling and probe stages (disjoint, each rounded to 10 ms) are parts of
    # the profile it timed
    assert prof["profile_sampling_s"] + prof["profile_probe_s"] <= prof["profile_s"] + 0.02
    assert fig["profile_over_compress"] == prof["profile_over_compress"]
    assert math.isclose(prof["profile_over_compress"], prof["profile_s"] / prof["compress_s"],
                        rel_tol=0.01)
    shapes = linear_shapes(tiny_model)
    opt = Option.from_dict(prof["compress_option"])
    # 2 blocks × 7 linears and the tied embedding: every item the profile covers
    assert (opt.bits, opt.rank) == (3, 0) and prof["linears"] == len(shapes) == 2 * 7 + 1
    bits = 8 * sum(option_bytes(m, n, opt) for m, n in shapes)
    assert prof["compress_bpp"] == pytest.approx(bits / sum(m * n for m, n in shapes), abs=1e-3)
    assert 3 < prof["compress_bpp"] < 4
