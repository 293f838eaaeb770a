"""`bitplan bench quant --quick`: Q + L·R errs less than Q alone at every bit width, errors fall
with bits, cosines are near 1, and the timing ratio is a positive finite number; the Gram-route
LPLR (gram_lplr) lands within a few percent of the default's errors."""

import pytest

from tests.bench._run import bench, positive


def test_bench_quant_quick(tmp_path, demo_model_path):
    fig = bench("quant", tmp_path, "--quick")
    assert fig["quick"] is True and fig["n_linears"] == 3 and fig["rank"] == 16
    assert set(fig["bits"]) == {"2", "3", "4"}
    rows = [fig["bits"][b] for b in ("2", "3", "4")]
    for row in rows:
        assert 0 < row["caldera_rel_err"] <= row["q_only_rel_err"] < 1, row
        assert 0 < row["caldera_rel_fro_err"] and 0 < row["q_only_rel_fro_err"]
        assert 0.5 < row["min_cosine"] <= row["cosine"] <= 1 + 1e-6, row
    assert rows[0]["q_only_rel_err"] > rows[1]["q_only_rel_err"] > rows[2]["q_only_rel_err"]
    assert positive(fig["decompose_over_svd_time"], fig["timed_linear"]["decompose_s"],
                    fig["timed_linear"]["svd_s"], fig["calib_tokens"])
    assert fig["calib_tokens"] == 8 * 128
    g = fig["gram_lplr"]
    assert g["config"]["gram_lplr"] is True and "gram_lplr" not in fig["config"]
    for b in ("2", "3", "4"):
        row = g["bits"][b]
        assert row["caldera_rel_err"] <= fig["bits"][b]["q_only_rel_err"]
        assert abs(row["rel_change"]) < 0.05, row
        assert row["rel_change"] == pytest.approx(
            row["caldera_rel_err"] / fig["bits"][b]["caldera_rel_err"] - 1, abs=1e-12)
    assert positive(g["decompose_s"], g["speedup"])
    assert g["speedup"] == pytest.approx(fig["timed_linear"]["decompose_s"] / g["decompose_s"])
