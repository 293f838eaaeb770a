"""The fitted error model recovers a known law and generalises to held-out points."""

import math

import numpy as np
import pytest

from solver.errormodel import ErrorModel, fit, r2_log, sample_tail


def _law(theta=(-5.0, -1.35, 0.08), c=0.03, n=200):
    # A residual spectrum with a power-law decay, like real quantization residuals under H.
    sv = (1.0 + np.arange(n)) ** -0.6
    curve = np.sqrt(np.concatenate([np.cumsum((sv**2)[::-1])[::-1], [0.0]]))
    ranks, tail = sample_tail(curve / curve[0], max_rank=100)
    return ErrorModel(theta, c, ranks, tail), curve


def test_fit_recovers_known_parameters():
    truth, _ = _law()
    grid = [(b, r) for b in (2, 3, 4, 6, 8) for r in (0, 12, 50, 100)]
    samples = [[b, r, float(truth.predict(b, r))] for b, r in grid]
    got = fit(samples, truth.tail_ranks, truth.tail)
    assert got.theta == pytest.approx(truth.theta, abs=1e-4)
    assert got.c == pytest.approx(truth.c, rel=1e-3)
    assert got.r2_fit == pytest.approx(1.0, abs=1e-9)


def test_fit_with_noise_predicts_heldout_points():
    truth, _ = _law()
    rng = np.random.default_rng(0)
    train = [(b, r) for b in (2, 3, 4, 6, 8) for r in (0,)] + [(2, 50), (3, 25), (4, 100)]
    held = [(b, r) for b in (5, 7) for r in (0, 8, 30, 70)] + [(3, 90), (6, 40)]
    noisy = [[b, r, float(truth.predict(b, r)) * math.exp(rng.normal(0, 0.05))] for b, r in train]
    got = fit(noisy, truth.tail_ranks, truth.tail)
    y = [float(truth.predict(b, r)) for b, r in held]
    yhat = [float(got.predict(b, r)) for b, r in held]
    assert r2_log(y, yhat) > 0.97
    assert abs(got.theta[1] - truth.theta[1]) < 0.1  # ~4x per bit recovered


def test_serialisation_round_trip_and_monotone():
    truth, _ = _law()
    again = ErrorModel.from_dict(truth.to_dict())
    assert again.predict(3, 17) == pytest.approx(truth.predict(3, 17))
    bits = np.arange(2, 9)
    assert np.all(np.diff(truth.predict(bits, 10)) < 0)
    ranks = np.arange(0, 101)
    assert np.all(np.diff(truth.predict(4, ranks)) <= 1e-15)
    with pytest.raises(ValueError, match="family"):
        ErrorModel.from_dict({"family": "nope"})


def test_group_factor_interpolates_and_defaults_to_one():
    m = ErrorModel((0.0, -1.3, 0.1), 0.05, [0, 10], [1.0, 0.5], None,
                   {"128": [[2, 1.0], [4, 1.0]], "512": [[2, 1.2], [4, 1.5]]})
    assert m.groups() == [128, 512]
    assert float(m.group_factor(3, 128)) == pytest.approx(1.0)
    # log-linear in bits between the samples, clamped outside them
    assert float(m.group_factor(3, 512)) == pytest.approx(math.sqrt(1.2 * 1.5))
    assert float(m.group_factor(8, 512)) == pytest.approx(1.5)
    # an unsampled group: log₂ g interpolation between sampled ones, no extrapolation below
    assert float(m.group_factor(2, 256)) == pytest.approx(math.exp(math.log(1.2) / 2))
    assert float(m.group_factor(2, 64)) == pytest.approx(1.0)
    assert float(m.predict(3, 4, 512)) == pytest.approx(float(m.predict(3, 4)) * m.group_factor(3, 512))
    back = ErrorModel.from_dict(m.to_dict())
    assert back.group_factors == m.group_factors
    # a model from before group sizes were planned: every group predicts the same error
    old = {k: v for k, v in m.to_dict().items() if k != "group_factors"}
    assert float(ErrorModel.from_dict(old).predict(2, 0, 512)) == pytest.approx(float(m.predict(2, 0)))
