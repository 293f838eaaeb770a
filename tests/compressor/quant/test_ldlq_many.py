"""Stacked, lazy-batched LDLQ (compressor.quant.rounding.ldlq_many) and the profile's batched Q-only
samples (compressor.quant.decompose.q_only_many) against the one-at-a-time paths."""

from __future__ import annotations

import pytest
import torch

from compressor.quant.decompose import decompose, q_only_many
from compressor.quant.decomposed import DecompositionConfig, Rounding
from compressor.quant.grids import dequantize, group_params, quantize
from compressor.quant.hessian import damp_hessian
from compressor.quant.problem import h_sq
from compressor.quant.rounding import inverse_cholesky_upper, ldlq, ldlq_many
from solver.bytes import Option

torch.set_num_threads(1)

# group sizes that divide the width, that don't (7, 100, 128 of 333), and that exceed it
VARIANTS = [(2, 128), (3, 128), (4, 128), (6, 128), (2, 256), (4, 512), (3, 7), (4, 100),
            (8, 64)]


def _problem(m: int, n: int, ill: bool, dtype=torch.float64):
    g = torch.Generator().manual_seed(m * 1000 + n)
    W = torch.randn(m, n, generator=g, dtype=dtype)
    if ill:   # fewer samples than inputs and a 10⁶ spread: singular before the tiny ridge
        X = torch.randn(n // 2, n, generator=g, dtype=dtype) * torch.logspace(0, -6, n,
                                                                               dtype=dtype)
        H = damp_hessian(X.T @ X, 1e-6)
    else:
        X = torch.randn(2 * n, n, generator=g, dtype=dtype)
        H = damp_hessian(X.T @ X, 0.01)
    return W, H


def _unbatched_ldlq(W, H, bits: int, group_size: int, symmetric: bool):
    """LDLQ as the papers write it: one column at a time, every later column updated at once
    (no lazy batches), each group's grid from its fully updated columns."""
    W = W.clone()
    U = inverse_cholesky_upper(H)
    m, n = W.shape
    qmax = (1 << bits) - 1
    codes = torch.empty(m, n)
    for j in range(n):
        if j % group_size == 0:
            s, z = group_params(W[:, j:j + group_size], bits, symmetric)
            s_f = s.to(W.dtype)
            off = z.to(W.dtype) if z is not None else torch.full_like(s_f, qmax / 2)
        q = torch.round(W[:, j] / s_f + off).clamp(0, qmax)
        codes[:, j] = q
        e = (W[:, j] - (q - off) * s_f) / U[j, j]
        W[:, j:] -= torch.outer(e, U[j, j:])
    return codes.to(torch.uint8)


@pytest.mark.parametrize(("m", "n", "ill"), [(24, 333, False), (17, 200, True), (40, 64, False)])
@pytest.mark.parametrize("block", [1, 5, 32, 128, 1000])
def test_batched_lazy_equals_unbatched_column_loop_in_float64(m, n, ill, block) -> None:
    """In float64 every code is the textbook loop's, for every block size and group size (lazy
    batches and stacking only regroup sums)."""
    W, H = _problem(m, n, ill)
    for sym in (False, True):
        got = ldlq_many(W, H, VARIANTS, symmetric=sym, block_size=block)
        for (bits, gs), (codes, meta) in zip(VARIANTS, got, strict=True):
            assert torch.equal(codes, _unbatched_ldlq(W, H, bits, gs, sym)), (bits, gs, sym)
            assert (meta.bits, meta.group_size, meta.symmetric) == (bits, gs, sym)
            assert meta.scale.shape == (m, -(-n // gs)) and codes.dtype == torch.uint8
            assert (meta.zero is None) == sym
            assert int(codes.max()) <= (1 << bits) - 1


@pytest.mark.parametrize(("m", "n", "ill"), [(96, 333, False), (64, 200, True)])
def test_batched_equals_one_at_a_time_in_float32(m, n, ill) -> None:
    """The profile's case: float32, default block. Codes agree (at most a rare tie flips) and
    the H-weighted errors agree to float tolerance."""
    W, H = (t.float() for t in _problem(m, n, ill))
    got = ldlq_many(W, H, VARIANTS)
    for (bits, gs), (codes, meta) in zip(VARIANTS, got, strict=True):
        ref, ref_meta = ldlq(W, H, bits, gs)
        assert (codes != ref).float().mean().item() < 1e-3, (bits, gs)
        e_got = h_sq(W - dequantize(codes, meta), H)
        e_ref = h_sq(W - dequantize(ref, ref_meta), H)
        assert e_got == pytest.approx(e_ref, rel=1e-4), (bits, gs)


def test_ldlq_many_beats_round_to_nearest_and_handles_edge_variants() -> None:
    W, H = (t.float() for t in _problem(32, 96, False))
    variants = [(3, 128), (3, 256), (16, 128), (3, 128)]  # ≥ n twice, fp16, a duplicate
    out = ldlq_many(W, H, variants)
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][0], out[3][0])
    assert out[0][0] is not out[3][0] and out[0][0] is not out[1][0]   # callers own them
    assert out[1][1].group_size == 256 and out[1][1].scale.shape == (32, 1)
    assert out[2][1].bits == 16 and torch.equal(out[2][0], W.half())
    rtn = quantize(W, 3, 128)
    assert h_sq(W - dequantize(*out[0]), H) < 0.9 * h_sq(W - dequantize(*rtn), H)
    with pytest.raises(ValueError, match="bits"):
        ldlq_many(W, H, [(9, 128)])
    with pytest.raises(ValueError, match="group_size"):
        ldlq_many(W, H, [(3, 0)])
    assert ldlq_many(W[:0], H, [(3, 128)])[0][0].shape == (0, 96)


@pytest.mark.parametrize("config", [DecompositionConfig(), DecompositionConfig(hadamard=False),
                                    DecompositionConfig(q_rounding=Rounding.RTN)])
def test_q_only_many_equals_decompose_at_rank_0(config) -> None:
    W, H = (t.float() for t in _problem(48, 200, False))
    opts = [Option(2, 0), Option(4, 0), Option(3, 0, 4, 64, True), Option(2, 5, 4, 256),
            Option(16, 0)]
    got = q_only_many(W, H, opts, config)
    for opt, q in zip(opts, got, strict=True):
        d = decompose(W, H, Option(opt.bits, 0, opt.factor_bits, opt.group_size, opt.symmetric),
                      config)
        assert q.rel_h_err == pytest.approx(d.rel_h_err, rel=1e-4), opt
        assert torch.allclose(q.w_hat(), d.w_hat(), atol=1e-5), opt
        assert q.meta.group_size == opt.group_size and q.meta.symmetric == opt.symmetric
