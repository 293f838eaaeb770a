"""Streamed calibration Hessians and relative damping (compressor.quant.hessian)."""

from __future__ import annotations

import math

import torch

from compressor.quant.decompose import decompose
from compressor.quant.decomposed import DecompositionConfig, Rounding
from compressor.quant.hessian import collect_hessians, cond, damp_hessian, is_linear
from solver.bytes import Option
from tests.helpers.models import tiny_gpt2, tiny_qwen2, tokens

torch.set_num_threads(1)


def _explicit(model, seqs, names):
    """Reference: hold every input, then XᵀX / tokens."""
    xs = {n: [] for n in names}
    mods = dict(model.named_modules())
    hs = [mods[n].register_forward_pre_hook(
        lambda _m, a, n=n: xs[n].append(a[0].reshape(-1, a[0].shape[-1]).double()))
        for n in names]
    with torch.no_grad():
        model(input_ids=seqs)
    for h in hs:
        h.remove()
    out = {}
    for n, parts in xs.items():
        X = torch.cat(parts)
        out[n] = X.T @ X / X.shape[0]
    return out


def test_streamed_hessians_match_explicit_qwen2() -> None:
    model = tiny_qwen2()
    seqs = tokens(10, 16)
    H = collect_hessians(model, seqs, batch_size=3)   # 3 does not divide 10: a short last batch
    names = [n for n, m in model.named_modules() if is_linear(m) and n != "lm_head"]
    assert sorted(H) == sorted(names) and "lm_head" not in H
    assert H.tokens == 10 * 16
    ref = _explicit(model, seqs, names)
    for n in names:
        assert H[n].dtype == torch.float32
        assert torch.allclose(H[n].double(), ref[n], rtol=1e-4, atol=1e-6), n
    blk = "model.layers.0.self_attn."
    assert torch.equal(H[blk + "q_proj"], H[blk + "k_proj"])   # shared input, computed once
    assert H["model.layers.1.mlp.down_proj"].shape == (72, 72)


def test_gpt2_conv1d_hessians_and_subset() -> None:
    model = tiny_gpt2()
    seqs = tokens(4, 12)
    names = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"]
    H = collect_hessians(model, seqs, names, batch_size=4)
    assert set(H) == set(names)
    assert H[names[1]].shape == (4 * 48, 4 * 48)
    ref = _explicit(model, seqs, names)
    assert torch.allclose(H[names[0]].double(), ref[names[0]], rtol=1e-4, atol=1e-6)


def test_damping_is_relative_to_mean_diagonal() -> None:
    H = torch.diag(torch.tensor([4.0, 2.0, 0.0]))
    Hd = damp_hessian(H, 0.1)
    assert torch.allclose(Hd.diagonal(), torch.tensor([4.2, 2.2, 0.2]))
    assert torch.equal(H.diagonal(), torch.tensor([4.0, 2.0, 0.0]))   # input untouched
    assert torch.equal(damp_hessian(torch.zeros(3, 3), 0.01), torch.eye(3))  # dead input


def test_ill_conditioned_hessian_is_finite_and_sane() -> None:
    # Activations with singular values over 8 decades: cond(H) ≥ 1e11, like the research note's
    # absolute-ridge failure (7.7e11). Relative damping bounds cond whatever the scale.
    g = torch.Generator().manual_seed(0)
    n, m, t = 96, 64, 512
    U, _ = torch.linalg.qr(torch.randn(t, n, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    X = U @ torch.diag(torch.logspace(0, -8, n, dtype=torch.float64)) @ V.T
    H = (X.T @ X).float()
    assert cond(H) >= 1e11
    frac = 0.01
    Hd = damp_hessian(H, frac)
    assert cond(Hd) <= n / frac + 1          # λmax ≤ tr H = n·mean diag, λmin ≥ frac·mean diag
    assert math.isclose(cond(damp_hessian(H * 1e-6, frac)), cond(Hd), rel_tol=1e-3)  # scale-free
    W = torch.randn(m, n, generator=g)
    rtn = decompose(W, H, Option(3, 0), DecompositionConfig(q_rounding=Rounding.RTN))
    for rank in (0, 16):
        d = decompose(W, H, Option(3, rank), DecompositionConfig(outer_iters=1, lr_iters=2))
        w_hat = d.w_hat()
        assert torch.isfinite(w_hat).all() and w_hat.abs().max() < 10 * W.abs().max()
        assert math.isfinite(d.rel_h_err) and d.rel_h_err <= rtn.rel_h_err
        assert d.rel_fro_err < 1.0
        direct = (((W - w_hat).double() @ X.T).norm() / (W.double() @ X.T).norm()).item()
        assert math.isclose(d.rel_h_err, direct, rel_tol=1e-3)


def test_symmetrize_in_place_is_the_textbook_formula_bit_for_bit():
    """Calibration Hessians are symmetrised in place, block by block (no n × n temporary), to
    exactly (H + Hᵀ)/2; the solvers then use them as they are instead of copying."""
    from compressor.quant.decomposed import DecompositionConfig
    from compressor.quant.hessian import symmetrize_
    from compressor.quant.problem import prepare, symmetric

    gen = torch.Generator().manual_seed(0)
    H = torch.randn(300, 300, generator=gen)
    want = (H + H.T) / 2
    assert not symmetric(H, block=64)
    got = symmetrize_(H.clone(), block=64)      # 300 = 4 · 64 + 44: a partial block
    assert torch.equal(got, want) and symmetric(got, block=64)
    W = torch.randn(20, 300, generator=gen)
    spd = symmetrize_(W.T @ W / 20 + torch.eye(300))
    p = prepare(W, spd, DecompositionConfig(hadamard=False))
    # no copy (the same storage), and no damped H until asked for
    assert p.Ht.data_ptr() == spd.data_ptr() and p._hd is None
    assert torch.equal(p.Hd, damp_hessian(spd)) and p._hd is not None
