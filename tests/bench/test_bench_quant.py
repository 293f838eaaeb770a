"""`bitplan bench quant --quick`: Q + L·R errs less than Q alone at every bit width, errors fall
with bits, cosines are near 1, the timing is of the largest linear swept and its ratios are the
ones of the times printed beside them; the Gram-route LPLR (gram_lplr) lands within a few
percent of the default's errors."""

import pytest

from tests.bench._run import bench, linear_shapes, positive


def test_bench_quant_quick(tmp_path, demo_model_path):
    fig = bench("quant", tmp_path, "--quick")
    assert fig["quick"] is True and fig["n_linears"] == 3 and fig["rank"] == 16
    assert set(fig["bits"]) == {"2", "3", "4"}
    rows = [fig["bits"][b] for b in ("2", "3", "4")]
    for row in rows:
        assert 0 < row["caldera_rel_err"] <= row["q_only_rel_err"] < 1, row
        assert 0 < row["caldera_rel_fro_err"] and 0 < row["q_only_rel_fro_err"]
        assert 0.5 < row["min_cosine"] <= row["cosine"] <= 1 + 1e-6, row
    for key in ("q_only_rel_err", "caldera_rel_err"):   # one more bit: less error, both ways
        assert rows[0][key] > rows[1][key] > rows[2][key], key
    assert rows[0]["cosine"] < rows[2]["cosine"]
    assert fig["calib_tokens"] == 8 * 128
    # the timed linear is the largest of the three swept (the model's first three block linears:
    # the embedding, planned Q alone, is not swept)
    t = fig["timed_linear"]
    first = linear_shapes(demo_model_path, vocab=False)[:3]
    assert t["shape"] == list(max(first, key=lambda s: s[0] * s[1]))
    assert t["name"].startswith("model.layers.0.")
    assert (t["option"]["bits"], t["option"]["rank"]) == (3, 16)
    assert positive(t["decompose_s"], t["svd_s"], fig["hessian_s"])
    assert fig["decompose_over_svd_time"] == pytest.approx(t["decompose_s"] / t["svd_s"])
    g = fig["gram_lplr"]
    assert g["config"]["gram_lplr"] is True and "gram_lplr" not in fig["config"]
    for b in ("2", "3", "4"):
        row = g["bits"][b]
        assert row["caldera_rel_err"] <= fig["bits"][b]["q_only_rel_err"]
        assert abs(row["rel_change"]) < 0.05, row
        assert row["rel_change"] == pytest.approx(
            row["caldera_rel_err"] / fig["bits"][b]["caldera_rel_err"] - 1, abs=1e-12)
    assert positive(g["decompose_s"], g["speedup"])
    assert g["speedup"] == pytest.approx(t["decompose_s"] / g["decompose_s"])
