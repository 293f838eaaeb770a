"""Whole-matrix passes in bounded memory: row-chunked traces, residuals and quantization give the
numbers of whole-matrix arithmetic; a real-width decomposition's temporaries stay near one copy
of W; a half-precision checkpoint's probe streams are held as half-precision differences and
give the α of float32 streams."""

from __future__ import annotations

import sys
from functools import partial

import pytest
import torch

import compressor.quant.grids as quant
from bench.synthetic import Shape, write_checkpoint
from compressor.checkpoint.memory import _vmhwm, map_large_allocations, reset_peak_rss, rss_bytes
from compressor.pipeline import sensitivity
from compressor.pipeline.profile import ProfileConfig, run_profile
from compressor.pipeline.profile_store import FileProfileStore
from compressor.quant.decompose import decompose
from compressor.quant.decomposed import DecompositionConfig, Rounding
from compressor.quant.grids import dequantize, dequantize_rows, quantize
from compressor.quant.problem import fro_sq, h_inner, h_sq, residual
from solver.bytes import Option


def _w_h(m: int = 300, n: int = 70, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g)
    X = torch.randn(4 * n, n, generator=g)
    H = X.T @ X / (4 * n)
    return W, (H + H.T) / 2


@pytest.fixture
def small_chunks(monkeypatch):
    """7-row chunks of a 70-wide matrix: many chunks and a ragged last one."""
    monkeypatch.setattr(quant, "ROW_CHUNK_ELEMENTS", 7 * 70)


def test_chunked_traces_equal_whole_matrix_arithmetic(small_chunks):
    W, H = _w_h()
    A = W + 0.1 * torch.randn(W.shape, generator=torch.Generator().manual_seed(1))
    Wd, Ad, Hd = W.double(), A.double(), H.double()
    assert h_inner(W, A, H) == pytest.approx(((Wd @ Hd) * Ad).sum().item(), rel=1e-6)
    assert h_sq(W, H) == pytest.approx(((Wd @ Hd) * Wd).sum().item(), rel=1e-6)
    assert fro_sq(W) == pytest.approx(Wd.pow(2).sum().item(), rel=1e-6)
    # a half-precision operand is upcast a chunk at a time: the trace of its float32 copy
    assert h_sq(W.half(), H) == h_sq(W.half().float(), H)


def test_residual_from_row_chunks_is_bit_identical(small_chunks):
    W, H = _w_h()
    codes, meta = quantize(W, 3, 16)
    what = dequantize(codes, meta)
    res = residual(W, H, partial(dequantize_rows, codes, meta), outputs=True)
    assert res.err2 == h_sq(W - what, H) and res.fro2 == fro_sq(W - what)
    assert res.what2 == h_sq(what, H) and res.cross == h_inner(what, W, H)
    plain = residual(W, H, partial(dequantize_rows, codes, meta))
    assert (plain.err2, plain.fro2) == (res.err2, res.fro2)


@pytest.mark.parametrize("bits,group,symmetric", [(2, 16, False), (4, 32, True), (3, 128, False)])
def test_quantize_in_row_chunks_equals_one_pass(monkeypatch, bits, group, symmetric):
    W, _ = _w_h()
    monkeypatch.setattr(quant, "ROW_CHUNK_ELEMENTS", 1 << 40)   # one chunk: the whole matrix
    whole_codes, whole = quantize(W, bits, group, symmetric)
    monkeypatch.setattr(quant, "ROW_CHUNK_ELEMENTS", 7 * 70)
    codes, meta = quantize(W, bits, group, symmetric)
    assert torch.equal(codes, whole_codes) and torch.equal(meta.scale, whole.scale)
    assert (meta.zero is None) == symmetric
    if not symmetric:
        assert torch.equal(meta.zero, whole.zero)
    full = dequantize(codes, meta)
    for a, b in [(0, 7), (5, 123), (280, 400)]:
        assert torch.equal(dequantize_rows(codes, meta, a, b), full[a:b])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_real_width_decomposition_temporaries_stay_near_one_w():
    """TinyLlama's down_proj shape (2048 × 5632): whole-matrix arithmetic made ~3.4 W-sized
    float32 temporaries (155 MB beyond W and H); with row chunks the extra peak is the codes
    (11.5 MB), the packed Q and a few ~4 MiB chunks: measured 38–40 MB. Bound: 1.25 W (57 MB),
    so one more W-sized temporary anywhere fails it."""
    map_large_allocations()
    g = torch.Generator().manual_seed(0)
    W = torch.randn(2048, 5632, generator=g) * 0.02
    X = torch.randn(256, 5632, generator=g)
    H = X.T @ X / 256
    del X
    H = (H + H.T) / 2
    cfg = DecompositionConfig(q_rounding=Rounding.RTN, factor_rounding=Rounding.RTN,
                              lr_iters=1, hadamard=False)
    decompose(W, H, Option(2, 0, 4, 128), cfg)   # first call: code pages, library buffers
    before = rss_bytes()
    if not reset_peak_rss():
        pytest.skip("this kernel does not let a process reset its VmHWM")
    d = decompose(W, H, Option(2, 0, 4, 128), cfg)
    extra = _vmhwm() - before
    assert d.rel_h_err > 0
    assert extra < 1.25 * W.numel() * 4, f"{extra / 1e6:.1f} MB of temporaries"


def test_half_precision_probe_streams_held_as_differences(tmp_path, monkeypatch):
    model = str(write_checkpoint(tmp_path / "m", Shape("llama", 3, 64, 96, 4, 2, 4096)))
    # probe_t 1: this untrained model's output barely moves, and at t = 0.1 its KL (~1e-6) is
    # float32 noise of the head's log-sum-exp
    cfg = ProfileConfig(sensitivity="probe", calib_seqs=4, probe_seqs=2, seq_len=32, q_bits=(2, 3, 4), anchors=(),
                        probe_t=1.0,
                        tail_bits=0, extra_groups=(),
                        decomposition=DecompositionConfig(q_rounding=Rounding.RTN,
                                                          factor_rounding=Rounding.RTN,
                                                          lr_iters=1, hadamard=False))
    held: set[torch.dtype] = set()
    real_pack = sensitivity.StreamedProbes._pack

    def pack(self, streams, clean):
        out = real_pack(self, streams, clean)
        held.add(out.dtype)
        return out

    monkeypatch.setattr(sensitivity.StreamedProbes, "_pack", pack)
    half = run_profile(model, FileProfileStore(tmp_path / "a"), config=cfg)
    assert held == {torch.float16}

    real_init = sensitivity.StreamedProbes.__init__

    def float32_streams(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.delta_dtype = None

    monkeypatch.setattr(sensitivity.StreamedProbes, "__init__", float32_streams)
    held.clear()
    full = run_profile(model, FileProfileStore(tmp_path / "b"), config=cfg)
    assert held == {torch.float32}
    a_half = {lp.name: lp.alpha for lp in half.linears}
    top = max(lp.alpha for lp in full.linears)
    assert top > 0
    for lp in full.linears:   # (a random model's q/k barely move its output: α ≈ 0)
        assert a_half[lp.name] == pytest.approx(lp.alpha, rel=0.02, abs=1e-3 * top), lp.name
