"""Shared per-linear work (compressor.quant.problem): a `Problem` reused across roundings, anchors
started from the Q-only sample, the vectorized clip search and cached codes give bit-identical
results; the opt-in Gram-route LPLR (gram_lplr) agrees with the SVD route in its math."""

from __future__ import annotations

import pytest
import torch

from compressor.pipeline.profile import ProfileConfig
from compressor.pipeline.sampling import sample_linear
from compressor.quant import grids as quant
from compressor.quant.decompose import decompose, q_only_many
from compressor.quant.decomposed import Decomposed, DecompositionConfig, Rounding
from compressor.quant.grids import QuantizedTensor, group_params, pack
from compressor.quant.problem import h_sq, lowrank_start, lr_err, prepare
from compressor.quant.rounding import inverse_cholesky_upper, ldlq_many
from solver.bytes import Option
from tests.helpers.models import correlated_problem

torch.set_num_threads(1)


@pytest.fixture(scope="module", params=[(112, 200), (200, 112)], ids=["wide", "tall"])
def problem(request):
    W, _, H = correlated_problem(*request.param, seed=3)
    return W, H


def _same(a: Decomposed, b: Decomposed) -> None:
    assert a.rel_h_err == b.rel_h_err and a.q_only_rel_h_err == b.q_only_rel_h_err
    assert a.rel_fro_err == b.rel_fro_err and a.history == b.history
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("config", [DecompositionConfig(), DecompositionConfig(hadamard=False),
                                    DecompositionConfig(q_rounding=Rounding.RTN, outer_iters=2),
                                    DecompositionConfig(factor_rounding=Rounding.RTN)])
def test_shared_problem_and_q_start_are_bit_identical(problem, config) -> None:
    W, H = problem
    p = prepare(W, H, config)
    opts = [Option(2, 0), Option(4, 0), Option(3, 0, 4, 64, True)]
    starts = q_only_many(W, H, opts, config, p)
    for start, opt in zip(starts, [Option(2, 24, 4), Option(4, 7, 3), Option(3, 16, 4, 64, True)],
                          strict=True):
        plain = decompose(W, H, opt, config)
        _same(decompose(W, H, opt, config, problem=p), plain)
        _same(decompose(W, H, opt, config, problem=p, q_start=start), plain)
    with pytest.raises(ValueError, match="q_start"):
        decompose(W, H, Option(3, 8), config, problem=p, q_start=starts[0])   # 2-bit Q


def test_problem_of_another_config_is_not_used(problem) -> None:
    W, H = problem
    p = prepare(W, H, DecompositionConfig(hadamard=False))
    _same(decompose(W, H, Option(3, 8), DecompositionConfig(), problem=p),
          decompose(W, H, Option(3, 8), DecompositionConfig()))
    # fp16 Q drops the rotation: a rotated problem is ignored there too
    rotated = prepare(W, H, DecompositionConfig())
    _same(decompose(W, H, Option(16, 8), DecompositionConfig(), problem=rotated),
          decompose(W, H, Option(16, 8), DecompositionConfig()))


def test_problem_factors_equal_the_standalone_ones(problem) -> None:
    W, H = problem
    p = prepare(W, H, DecompositionConfig())
    assert torch.equal(p.u(), inverse_cholesky_upper(p.Hd))
    assert torch.equal(p.c(), torch.linalg.cholesky(p.Hd.double()).float())
    got = ldlq_many(p.Wt, p.Hd, [(3, 128), (2, 64)], inv_chol=p.u())
    for (c1, m1), (c2, m2) in zip(got, ldlq_many(p.Wt, p.Hd, [(3, 128), (2, 64)]), strict=True):
        assert torch.equal(c1, c2) and torch.equal(m1.scale, m2.scale)


def test_sample_linear_anchors_equal_plain_decompositions() -> None:
    W, _, H = correlated_problem(64, 160, seed=5)
    cfg = ProfileConfig(q_bits=(2, 3, 4), anchors=((3, 0.5), (4, 0.25)), extra_groups=(),
                        max_rank_fraction=0.5)
    samples, *_ = sample_linear(W, H, cfg)
    R = cfg.max_rank(64, 160)
    for b, frac in cfg.anchors:
        r = max(1, round(frac * R))
        d = decompose(W, H, Option(b, r, cfg.factor_bits, cfg.group_size), cfg.decomposition)
        assert [b, r, d.rel_h_err ** 2] in samples


@pytest.mark.parametrize("symmetric", [False, True])
def test_vectorized_clip_search_equals_the_loop(monkeypatch, symmetric) -> None:
    g = torch.Generator().manual_seed(0)
    for rows, cols, bits in [(50, 128, 2), (7, 33, 4), (300, 64, 3), (1, 1, 8)]:
        x = torch.randn(cols, rows, generator=g).T * torch.rand(rows, 1, generator=g) ** 3
        x[0] = 0.0                                      # a constant group
        fast = group_params(x, bits, symmetric)
        monkeypatch.setattr(quant, "_CLIP_BATCH", 0)
        slow = group_params(x, bits, symmetric)
        monkeypatch.undo()
        assert torch.equal(fast[0], slow[0])
        assert (fast[1] is None and slow[1] is None) or torch.equal(fast[1], slow[1])


def test_cached_codes_are_the_packed_codes() -> None:
    x = torch.randn(9, 40)
    qt = QuantizedTensor.quantize(x, 3, 16)
    bare = qt.without_codes()
    assert torch.equal(qt.codes(), bare.codes()) and torch.equal(bare.packed, qt.packed)
    assert bare._codes is None and torch.equal(pack(qt.codes(), 3), qt.packed)
    assert torch.equal(qt.dequantize(), bare.dequantize())


def test_gram_config_keeps_old_keys_and_round_trips() -> None:
    assert "gram_lplr" not in DecompositionConfig().to_dict()
    g = DecompositionConfig(gram_lplr=True)
    assert g.to_dict()["gram_lplr"] is True
    assert DecompositionConfig.from_dict(g.to_dict()) == g
    assert DecompositionConfig.from_dict(DecompositionConfig().to_dict()) == DecompositionConfig()


@pytest.mark.parametrize("rank", [1, 8, 40])
def test_gram_start_spans_the_svd_start(problem, rank) -> None:
    """R0 is defined up to an orthogonal factor on the left (signs, rotations inside repeated
    singular values), so compare R0ᵀR0 = C⁻ᵀ·Vᵣ·Sᵣ·Vhᵣ·C⁻¹ — gauge-free — and the error."""
    W, H = problem
    p = prepare(W, H, DecompositionConfig())
    A = p.Wt - quant.dequantize(*quant.quantize(p.Wt, 3, 128))
    AHd = A @ p.Hd
    svd, gram = lowrank_start(A, AHd, p, rank, False), lowrank_start(A, AHd, p, rank, True)
    assert svd.shape == gram.shape == (rank, A.shape[1])
    ref = svd.T @ svd
    assert torch.allclose(gram.T @ gram, ref, atol=2e-4 * ref.abs().max().item())


def test_trace_error_equals_direct_error(problem) -> None:
    W, H = problem
    p = prepare(W, H, DecompositionConfig())
    g = torch.Generator().manual_seed(1)
    A = p.Wt * 0.3
    L, R = torch.randn(A.shape[0], 12, generator=g) * 0.1, torch.randn(12, A.shape[1], generator=g)
    AH = A @ p.Ht
    a2 = (AH * A).sum(dtype=torch.float64).item()
    assert lr_err(AH, a2, L, R, p.Ht) == pytest.approx(h_sq(A - L @ R, p.Ht), rel=1e-5)


@pytest.mark.parametrize("opt", [Option(2, 16, 4), Option(3, 40, 4), Option(4, 8, 8, 64, True)])
def test_gram_lplr_matches_the_svd_route(problem, opt) -> None:
    W, H = problem
    base = decompose(W, H, opt)
    gram = decompose(W, H, opt, DecompositionConfig(gram_lplr=True))
    assert gram.config.gram_lplr and gram.nbytes == base.nbytes
    assert gram.q_only_rel_h_err == base.q_only_rel_h_err     # the same Q
    assert gram.rel_h_err <= gram.q_only_rel_h_err
    assert gram.rel_h_err == pytest.approx(base.rel_h_err, rel=0.03)
    # the reported error is measured, not the trace estimate
    what = gram.w_hat()
    direct = h_sq(W - what, (H + H.T) / 2) ** 0.5 / h_sq(W, (H + H.T) / 2) ** 0.5
    assert gram.rel_h_err == pytest.approx(direct, rel=1e-3)
