"""Quantizer, packing and exact bytes (compressor.quant.grids)."""

from __future__ import annotations

import math

import pytest
import torch

from compressor.quant.grids import (
    QuantizedTensor,
    dequantize,
    pack,
    quantize,
    stored_bytes,
    unpack,
)
from solver.bytes import quantized_bytes

torch.set_num_threads(1)


def _sqnr_db(x: torch.Tensor, xh: torch.Tensor) -> float:
    return 10 * math.log10(x.pow(2).mean().item() / (x - xh).pow(2).mean().item())


@pytest.mark.parametrize("symmetric", [False, True])
def test_sqnr_rises_about_6db_per_bit(symmetric: bool) -> None:
    x = torch.randn(64, 300, generator=torch.Generator().manual_seed(0))  # 300 = 2·128 + 44
    sqnr = []
    for bits in range(2, 9):
        codes, meta = quantize(x, bits, 128, symmetric)
        sqnr.append(_sqnr_db(x, dequantize(codes, meta)))
    steps = [b - a for a, b in zip(sqnr, sqnr[1:], strict=False)]
    # clipped grids: 2 bits on Gaussian data reaches ~9.2 dB (Lloyd-Max 4-level: 9.30 dB)
    assert 8.5 < sqnr[0] < 9.31
    # a uniform quantizer gains 6.02 dB a bit (a little less from 2 to 3: 2 bits gains most
    # from clipping)
    assert all(5.0 <= s <= 8.0 for s in steps), (sqnr, steps)
    assert 5.5 <= (sqnr[-1] - sqnr[0]) / 6 <= 6.6
    assert 40.0 < sqnr[-1] < 48.0


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_clipped_grid_never_worse_than_minmax(bits: int) -> None:
    """Per group the clip search includes p = 1 (min-max), so its RTN error is never larger;
    on Gaussian data it is clearly smaller at 2–3 bits."""
    from compressor.quant.grids import _grouped, group_params

    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    g = _grouped(x, 128)

    def err(clip: bool) -> torch.Tensor:
        s, z = group_params(g, bits, False, clip=clip)
        s, z = s.float().unsqueeze(-1), z.float().unsqueeze(-1)
        qmax = (1 << bits) - 1
        return ((torch.round(g / s + z).clamp(0, qmax) - z) * s - g).square().sum(-1)

    clipped, minmax = err(True), err(False)
    assert bool((clipped <= minmax + 1e-6).all())
    gain = 1 - clipped.sum() / minmax.sum()
    assert gain > {2: 0.3, 3: 0.15, 4: 0.05}[bits], float(gain)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [False, True])
def test_round_trip_error_within_half_step(bits: int, symmetric: bool) -> None:
    x = torch.randn(33, 257, generator=torch.Generator().manual_seed(bits)) * 3 + 1
    gs = 64
    codes, meta = quantize(x, bits, gs, symmetric)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= (1 << bits) - 1
    err = (x - dequantize(codes, meta)).abs()
    step = meta.scale.float().repeat_interleave(gs, dim=1)[:, :257]
    qmax = (1 << bits) - 1
    off = (meta.zero.float().repeat_interleave(gs, dim=1)[:, :257] if meta.zero is not None
           else torch.full_like(step, qmax / 2))
    lo, hi = (0 - off) * step, (qmax - off) * step      # the group's (clipped) range
    outside = (x - x.clamp(lo, hi)).abs()
    # inside its range: half a step, plus the fp16 rounding of scale and zero (≤ 2^(b−10)
    # steps at b bits); clipped tails land on the range's nearest end
    tol = (0.5 + 2.0 ** (bits - 10)) * step + 1e-6
    assert (err <= outside + tol).all()
    # clipping keeps at least CLIP_GRID's smallest share of each group's min-max range
    assert float(outside.max()) <= 0.41 * float(x.abs().max())   # (fp16 scale rounding)
    assert (meta.zero is None) == symmetric


@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 5, 7), (0, 5), (5, 0), (2, 3, 129), (1, 1000)])
@pytest.mark.parametrize("group_size", [1, 3, 64, 128, 1000])
@pytest.mark.parametrize("bits", [2, 3, 5, 8, 16])
def test_any_shape_any_group_exact_bytes(shape, group_size: int, bits: int) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    codes, meta = quantize(x, bits, group_size)
    assert tuple(codes.shape) == tuple(shape)
    packed = pack(codes, bits)
    assert torch.equal(unpack(packed, bits, tuple(shape)), codes)
    xh = dequantize(codes, meta)
    assert xh.shape == x.shape
    if x.numel():
        assert _sqnr_db(x, xh) > 5 * min(bits, 10) - 8  # min-max grid, up to 1000 per group
    qt = QuantizedTensor.from_codes(codes, meta)
    rows = math.prod(shape[:-1]) if shape else 1
    cols = shape[-1] if shape else 1
    expect = quantized_bytes(rows, cols, bits, group_size, False)
    assert qt.nbytes == expect == stored_bytes(shape, bits, group_size) == qt.accounted_bytes


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 7, 8])
def test_symmetric_bytes_and_no_zero_point(bits: int) -> None:
    x = torch.randn(10, 130)
    qt = QuantizedTensor.quantize(x, bits, 128, symmetric=True)
    assert qt.meta.zero is None
    assert qt.nbytes == quantized_bytes(10, 130, bits, 128, True)
    assert qt.nbytes < QuantizedTensor.quantize(x, bits, 128).nbytes


def test_partial_last_group_gets_its_own_scale() -> None:
    # The research note's bug trimmed every group when cols % group_size != 0. Here the partial
    # tail (2 huge values) must neither crash nor pollute the first (full) group's scale.
    x = torch.linspace(-1, 1, 130).repeat(3, 1)
    x[:, 128:] = torch.tensor([100.0, -100.0])
    codes, meta = quantize(x, 4, 128)
    assert meta.scale.shape == (3, 2)
    xh = dequantize(codes, meta)
    assert (x[:, :128] - xh[:, :128]).abs().max() <= 2 / 15 / 2 + 1e-3
    assert torch.allclose(xh[:, 128:], x[:, 128:], rtol=1e-3)


def test_pack_bit_layout_is_lsb_first_contiguous() -> None:
    assert pack(torch.tensor([1, 2, 3], dtype=torch.uint8), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    # 3-bit codes cross byte boundaries: stream 111 000 101 → bytes 0b01000111, 0b00000001
    assert pack(torch.tensor([7, 0, 5], dtype=torch.uint8), 3).tolist() == [71, 1]
    assert pack(torch.tensor([[0xAB]], dtype=torch.uint8), 8).tolist() == [0xAB]


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_round_trip_random_codes(bits: int) -> None:
    n = 1000 + bits  # not a multiple of 8
    codes = torch.randint(0, 1 << bits, (n,), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack(packed, bits, (n,)), codes)
    with pytest.raises(ValueError):
        unpack(packed[:-1], bits, (n,))


def test_constant_and_zero_groups_are_exact() -> None:
    x = torch.zeros(4, 20)
    x[1] = 0.37
    x[2] = -5.0
    for sym in (False, True):
        codes, meta = quantize(x, 2, 8, sym)
        assert torch.allclose(dequantize(codes, meta), x, atol=1e-3 if not sym else 5e-3)
    codes, meta = quantize(torch.zeros(3, 5), 3, 4)
    assert torch.equal(dequantize(codes, meta), torch.zeros(3, 5))


def test_fp16_passthrough_and_invalid_bits() -> None:
    x = torch.randn(5, 7)
    codes, meta = quantize(x, 16)
    assert codes.dtype == torch.float16 and meta.scale is None
    assert torch.allclose(dequantize(codes, meta), x, atol=1e-2)
    assert torch.equal(unpack(pack(codes, 16), 16, (5, 7)), codes)
    assert QuantizedTensor.from_codes(codes, meta).nbytes == 5 * 7 * 2
    for bad in (1, 9, 12):
        with pytest.raises(ValueError):
            quantize(x, bad)
    with pytest.raises(ValueError):
        quantize(x, 4, 0)


def test_from_tensors_round_trip() -> None:
    x = torch.randn(6, 50)
    for sym in (False, True):
        qt = QuantizedTensor.quantize(x, 3, 16, sym)
        back = QuantizedTensor.from_tensors(qt.tensors(), (6, 50), 3, 16, sym)
        assert torch.equal(back.dequantize(), qt.dequantize())
    empty = QuantizedTensor.quantize(torch.zeros(6, 0), 4, 128)
    assert empty.tensors() == {} and empty.nbytes == 0
    back = QuantizedTensor.from_tensors({}, (6, 0), 4, 128, False)
    assert back.dequantize().shape == (6, 0)
