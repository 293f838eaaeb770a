"""Matmul against a packed quantized tensor without ever holding it dense: y = x·Ŵᵀ where Ŵ
[rows, cols] is stored exactly as `compressor.quant.grids` writes it (b-bit codes packed row-major,
LSB first; fp16 scale and, asymmetric, zero per group of `group_size` columns; 16 bits = plain
fp16 bytes).

The torch path walks Ŵ in tiles of whole rows, dequantizes one tile, multiplies and drops it:
the transient is at most `TILE_ELEMS` dequantized values, whatever the layer's size. A tile
starts on a row that is a multiple of 8, so its first code starts on a byte boundary
(8 codes of b bits are exactly b bytes), and the unpacking is a reshape: view the tile's bytes
as [n/8, b], assemble each b-byte run into one little-endian integer, and shift out its 8 codes
(`unpack_run`). On CUDA the fused Triton kernel (`compressor.runtime.triton_kernels`) dequantizes
inside the matmul's K loop instead; this module dispatches to it when Triton is importable.

Pure functions of tensors and a `PackedSpec`: no caching, no device moves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from solver.bytes import FP16_BITS, quantized_bytes

log = logging.getLogger(__name__)

TILE_ELEMS = 1 << 18   # dequantized values per tile (1 MiB in fp32)


@dataclass(frozen=True)
class PackedSpec:
    """Shape and format of one stored tensor (what its packed/scale/zero buffers mean)."""

    rows: int
    cols: int
    bits: int
    group_size: int
    symmetric: bool

    @property
    def n_groups(self) -> int:
        return -(-self.cols // self.group_size)

    @property
    def nbytes(self) -> int:
        """Exact stored bytes: the one formula (solver.bytes)."""
        return quantized_bytes(self.rows, self.cols, self.bits, self.group_size, self.symmetric)

    def tile_rows(self, elems: int = TILE_ELEMS) -> int:
        """Rows per tile: a multiple of 8 (tiles start on a byte) holding ≈ `elems` values."""
        return max(8, (elems // max(self.cols, 1)) // 8 * 8)


def unpack_run(data: Tensor, bits: int, count: int) -> Tensor:
    """`count` b-bit codes from bytes `data` that start on a code boundary at bit 0 → int
    tensor [count] (8 codes of b bits are b bytes, assembled into an int64 word)."""
    if bits == 8:
        return data[:count].to(torch.int32)
    if bits in (2, 4):             # whole codes per byte: shift the bytes themselves
        per = 8 // bits
        shifts = torch.arange(per, device=data.device, dtype=torch.uint8) * bits
        nbytes = -(-count // per)
        codes = (data[:nbytes].unsqueeze(1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(-1)[:count].to(torch.int32)
    runs = -(-count // 8)
    need = runs * bits
    if data.numel() < need:       # the tensor's last run: pad the partial byte group
        data = F.pad(data, (0, need - data.numel()))
    wide = torch.int64
    b = data[:need].view(runs, bits).to(wide)
    word = b[:, 0].clone()
    for k in range(1, bits):      # little-endian: byte k holds bits 8k … 8k+7
        word |= b[:, k] << (8 * k)
    shifts = torch.arange(8, device=data.device, dtype=wide) * bits
    codes = (word.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:count]


def dequantize_rows(packed: Tensor, scale: Tensor | None, zero: Tensor | None,
                    spec: PackedSpec, r0: int, r1: int) -> Tensor:
    """Rows [r0, r1) of Ŵ in float32 (r0 a multiple of 8). Same arithmetic as
    `quant.dequantize_with` — (q − z)·s in float32 — so the values are bit-identical."""
    n, rows = spec.cols, r1 - r0
    if spec.bits == FP16_BITS:
        return packed[2 * r0 * n: 2 * r1 * n].view(torch.float16).view(rows, n).float()
    first = r0 * n * spec.bits // 8
    last = -(-r1 * n * spec.bits // 8)
    codes = unpack_run(packed[first:last], spec.bits, rows * n).view(rows, n)
    return _scaled(codes, scale[r0:r1], None if zero is None else zero[r0:r1], spec)


def dequantize_tiles(packed: Tensor, scale: Tensor | None, zero: Tensor | None,
                     spec: PackedSpec, tiles: Tensor) -> Tensor:
    """Rows 8t … 8t + 7 of Ŵ for every tile index t in `tiles` → [8·len(tiles), cols] float32
    (an embedding lookup's rows; rows past the last are garbage, never asked for). A tile
    starts on a byte and spans cols·b bytes, so the gathered tiles are one packed run."""
    n, b = spec.cols, spec.bits
    rows = (tiles.unsqueeze(1) * 8 + torch.arange(8, device=tiles.device)).reshape(-1)
    rows = rows.clamp(max=spec.rows - 1)
    if b == FP16_BITS:
        return packed.view(torch.float16).view(spec.rows, n)[rows].float()
    span = n * b    # bytes per 8-row tile
    idx = (tiles.unsqueeze(1) * span + torch.arange(span, device=tiles.device)).reshape(-1)
    codes = unpack_run(packed[idx.clamp(max=packed.numel() - 1)], b, len(rows) * n)
    return _scaled(codes.view(len(rows), n), scale[rows],
                   None if zero is None else zero[rows], spec)


def _scaled(codes: Tensor, scale: Tensor, zero: Tensor | None, spec: PackedSpec) -> Tensor:
    """(q − z)·s per group of `group_size` columns, in float32, for codes [rows, cols]."""
    rows, n = codes.shape
    g, gs = spec.n_groups, spec.group_size
    codes = codes.float()
    pad = g * gs - n
    if pad:                        # a partial last group: pad to whole groups, trim after
        codes = F.pad(codes, (0, pad))
    codes = codes.view(rows, g, gs)
    s = scale.float().unsqueeze(-1)
    z = zero.float().unsqueeze(-1) if zero is not None else ((1 << spec.bits) - 1) / 2
    w = ((codes - z) * s).view(rows, g * gs)
    return w[:, :n] if pad else w


def torch_packed_matmul(x: Tensor, packed: Tensor, scale: Tensor | None, zero: Tensor | None,
                        spec: PackedSpec, tile_elems: int = TILE_ELEMS) -> Tensor:
    """x [T, cols] (float32) · Ŵᵀ → [T, rows] float32, one dequantized row tile at a time."""
    out = x.new_empty(x.shape[0], spec.rows, dtype=torch.float32)
    if spec.rows == 0:
        return out
    if spec.cols == 0:
        return out.zero_()
    step = spec.tile_rows(tile_elems)
    xf = x.float()
    for r0 in range(0, spec.rows, step):
        r1 = min(r0 + step, spec.rows)
        torch.mm(xf, dequantize_rows(packed, scale, zero, spec, r0, r1).T, out=out[:, r0:r1])
    return out


def _triton():
    """The Triton kernels module, or None where Triton is not installed (CPU-only wheels)."""
    try:
        from compressor.runtime import triton_kernels  # defers importing triton until a CUDA call
    except ImportError:
        return None
    return triton_kernels


def packed_matmul(x: Tensor, packed: Tensor, scale: Tensor | None, zero: Tensor | None,
                  spec: PackedSpec) -> Tensor:
    """x [T, cols] · Ŵᵀ → [T, rows] float32: the fused Triton kernel on CUDA when Triton is
    at hand, else the tiled torch path."""
    if x.is_cuda and spec.rows and spec.cols:
        kernels = _triton()
        if kernels is not None:
            return kernels.dequant_matmul(x, packed, scale, zero, spec)
    return torch_packed_matmul(x, packed, scale, zero, spec)
