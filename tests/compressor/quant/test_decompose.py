"""CALDERA decomposition, LDLQ and Hadamard incoherence (compressor.quant.decompose / rounding)."""

from __future__ import annotations

import math

import pytest
import torch

from compressor.quant.decompose import decompose
from compressor.quant.decomposed import Decomposed, DecompositionConfig, Rounding
from compressor.quant.problem import h_norm, lowrank_error_curve
from compressor.quant.rounding import (
    BlockHadamard,
    fwht,
    hadamard_block,
    rotate_hessian,
    rotate_weight,
    unrotate_weight,
)
from solver.bytes import Option, option_bytes
from tests.helpers.models import correlated_problem

torch.set_num_threads(1)
FAST = DecompositionConfig(outer_iters=1, lr_iters=2)


@pytest.fixture(scope="module")
def problem():
    return correlated_problem(112, 200, seed=0)   # min(m, n) = 112 ≥ 100; 200 = 128 + 72


def _direct_rel_err(W, w_hat, X) -> float:
    return (((W - w_hat).double() @ X.T.double()).norm() / (W.double() @ X.T.double()).norm()).item()


@pytest.mark.parametrize("rank", [0, 1, 40, 57, 100, 112, 500])
def test_any_rank_group_128_exact_bytes(problem, rank: int) -> None:
    W, X, H = problem
    opt = Option(3, rank, 4, 128)
    d = decompose(W, H, opt, FAST)
    assert d.rank == min(rank, 112)
    assert d.nbytes == option_bytes(112, 200, opt)
    assert sum(t.nbytes for t in d.tensors().values()) == option_bytes(112, 200, opt)
    assert d.w_hat().shape == (112, 200)
    assert math.isclose(d.rel_h_err, _direct_rel_err(W, d.w_hat(), X), rel_tol=1e-3)
    assert math.isclose(d.rel_fro_err, ((W - d.w_hat()).norm() / W.norm()).item(), rel_tol=1e-3)


@pytest.mark.parametrize("opt", [Option(2, 40, 3, 64, True), Option(5, 57, 8, 32),
                                 Option(4, 13, 16, 128), Option(16, 8, 4, 128),
                                 Option(4, 10, 2, 7, True)])
def test_exact_bytes_across_options(problem, opt: Option) -> None:
    W, _, H = problem
    d = decompose(W, H, opt, FAST)
    assert d.nbytes == option_bytes(112, 200, opt)
    back = Decomposed.from_tensors(d.tensors(), d.record())
    assert torch.equal(back.w_hat(), d.w_hat())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_decomposition_never_worse_than_q_alone(problem, bits: int) -> None:
    W, _, H = problem
    cfg = DecompositionConfig(outer_iters=3, lr_iters=3)   # the full CALDERA alternation
    q_only = decompose(W, H, Option(bits, 0), cfg)
    for rank in (8, 40):
        d = decompose(W, H, Option(bits, rank, 4), cfg)
        assert len(d.history) == 1 + 3 * 2 * 3
        assert d.q_only_rel_h_err == pytest.approx(q_only.rel_h_err, rel=1e-9)
        assert d.rel_h_err <= q_only.rel_h_err + 1e-12
        assert d.rel_h_err < q_only.rel_h_err * (0.97 if rank == 8 else 0.9)  # and it helps


def test_ldlq_beats_round_to_nearest(problem) -> None:
    W, _, H = problem
    for bits in (2, 3, 4):
        rtn = decompose(W, H, Option(bits, 0), DecompositionConfig(q_rounding=Rounding.RTN))
        ldlq = decompose(W, H, Option(bits, 0), DecompositionConfig(q_rounding=Rounding.LDLQ))
        assert ldlq.rel_h_err < 0.9 * rtn.rel_h_err


def test_full_rank_8bit_factors_nearly_exact(problem) -> None:
    W, X, H = problem
    d = decompose(W, H, Option(2, 112, 8, 128), DecompositionConfig(outer_iters=1, lr_iters=3))
    assert d.q_only_rel_h_err > 0.2
    assert d.rel_h_err < 0.01
    d16 = decompose(W, H, Option(2, 112, 16, 128), FAST)
    assert d16.rel_h_err < 1e-3
    assert _direct_rel_err(W, d16.w_hat(), X) < 1e-3
    assert d16.output_cosine > 0.99999


def test_hadamard_transform_is_orthogonal() -> None:
    n = 16
    Hm = torch.tensor([[1.0]])
    while Hm.shape[0] < n:
        Hm = torch.cat([torch.cat([Hm, Hm], 1), torch.cat([Hm, -Hm], 1)], 0)
    x = torch.randn(3, n)
    assert torch.allclose(fwht(x), x @ Hm.T, atol=1e-5)
    assert [hadamard_block(d) for d in (192, 520, 97, 64, 1)] == [64, 8, 1, 64, 1]
    for dim in (192, 520, 97):
        t = BlockHadamard(dim, seed=3)
        y = torch.randn(5, dim)
        assert torch.allclose(t.invert(t.apply(y)), y, atol=1e-5)
        assert torch.allclose(t.apply(y).norm(dim=1), y.norm(dim=1), atol=1e-4)
    W, X, H = correlated_problem(24, 40, seed=2)
    t_out, t_in = BlockHadamard(24, 0), BlockHadamard(40, 1)
    Wr, Hr = rotate_weight(W, t_out, t_in), rotate_hessian(H, t_in)
    assert torch.allclose(unrotate_weight(Wr, t_out, t_in), W, atol=1e-5)
    assert math.isclose(h_norm(Wr, Hr), h_norm(W, H), rel_tol=1e-4)   # error metric invariant


def test_hadamard_decomposition_reports_true_errors(problem) -> None:
    W, X, H = problem
    cfg = DecompositionConfig(hadamard=True, outer_iters=1, lr_iters=2, seed=7)
    d = decompose(W, H, Option(2, 16), cfg)
    assert math.isclose(d.rel_h_err, _direct_rel_err(W, d.w_hat(), X), rel_tol=1e-3)
    assert d.nbytes == option_bytes(112, 200, Option(2, 16))
    back = Decomposed.from_tensors(d.tensors(), d.record())       # signs rebuilt from the seed
    assert torch.allclose(back.w_hat(), d.w_hat())
    odd = correlated_problem(31, 45, seed=1)                        # odd dims: identity blocks
    d_odd = decompose(odd[0], odd[2], Option(3, 4, 4, 16), cfg)
    assert math.isclose(d_odd.rel_h_err, _direct_rel_err(odd[0], d_odd.w_hat(), odd[1]),
                        rel_tol=1e-3)


def test_lowrank_error_curve_matches_truncated_svd(problem) -> None:
    W, X, H = problem
    A = W - decompose(W, H, Option(3, 0), FAST).w_hat()
    curve = lowrank_error_curve(A, H)
    assert curve.shape == (113,)
    assert (curve[1:] <= curve[:-1] + 1e-9).all() and curve[-1] == 0
    assert math.isclose(curve[0].item(), h_norm(A, H), rel_tol=1e-5)
    # rank-r optimum of ‖(A − B)X‖: truncated SVD of A·C (C Cᵀ = H), mapped back by C⁻¹
    C = torch.linalg.cholesky(H.double())
    U, S, Vh = torch.linalg.svd(A.double() @ C, full_matrices=False)
    for r in (1, 10, 57):
        B = (U[:, :r] * S[:r]) @ Vh[:r] @ torch.linalg.inv(C)
        assert math.isclose(curve[r].item(), h_norm((A.double() - B).float(), H), rel_tol=1e-3)
    # the decomposition with 16-bit factors reaches close to the curve's unquantized bound
    d = decompose(W, H, Option(3, 10, 16), FAST)
    assert d.rel_h_err <= curve[10].item() / h_norm(W, H) * 1.05
    singular = torch.zeros(200, 200)
    singular[:50, :50] = H[:50, :50]
    assert torch.isfinite(lowrank_error_curve(A, singular)).all()


def test_config_round_trip_and_validation() -> None:
    cfg = DecompositionConfig(q_rounding="rtn", hadamard=True, damp=0.05)
    assert cfg.q_rounding is Rounding.RTN
    assert DecompositionConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        DecompositionConfig(damp=0)
    with pytest.raises(ValueError):
        DecompositionConfig(outer_iters=0)
    with pytest.raises(ValueError):
        decompose(torch.randn(4, 5), torch.eye(4), Option(4))
