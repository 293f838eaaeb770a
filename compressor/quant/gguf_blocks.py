"""Byte-exact GGUF block encoders (ggml's layouts), Hessian-aware: `encode_gguf` / `decode_gguf`.

A [rows, cols] weight becomes the bytes ggml stores for it (row-major, blocks of `block`
elements along cols, solver.gguf_types' sizes), and `w_hat`, their float32 decode — equal to
gguf-py's `gguf.quants.dequantize` of those bytes (tests/compressor/test_gguf_blocks.py), so a
GGUF file with them loads in llama.cpp with exactly these weights.

Rounding, with w = diag(H) the per-column importance (llama.cpp's imatrix weights; 1 without H):
- per block (k-quants: per sub-block, then the sub-block scales/mins themselves), the scale
  (and min) minimising Σ_j w_j (x_j − x̂_j)² over a few candidates (gguf_kquants' searches);
  the scales are rounded to fp16 (and to their integer sub-scales) BEFORE the codes, so the
  codes are nearest on the grid the decoder sees;
- codes: with H and error_feedback, GPTQ / LDLQ over the columns (as compressor.quant.rounding:
  H damped by DEFAULT_DAMP·mean(diag H), U = the upper Cholesky factor of H⁻¹, column j's
  error (w_j − ŵ_j)/U_jj fed to the later columns through U's row j, lazy batches of
  whole blocks); a block's parameters are fitted when the sweep reaches its first column, from
  the error-updated weights (GPTQ with groups). Otherwise nearest rounding, vectorised.

32-element layouts (ggml/src/ggml-common.h `block_q4_0` … `block_iq4_nl`; gguf-py 0.19
quants.py `Q4_0.dequantize_blocks` …): fp16 d [, fp16 m] [, qh: uint32 LE, bit i = the 5th bit
of element i], then 16 bytes whose byte j holds element j in the low nibble and element j+16
in the high one (Q8_0: 32 int8). IQ4_NL: Q4_0's nibbles index ggml's kvalues_iq4nl.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from compressor.quant.gguf_kquants import (
    KQUANTS,
    Codec,
    bits_in,
    bits_out,
    f16_bytes,
    f16_read,
    fp16,
    search_affine,
    search_sym,
    search_table,
)
from compressor.quant.hessian import DEFAULT_DAMP, damp_hessian
from compressor.quant.rounding import inverse_cholesky_upper
from solver.gguf_types import gguf_tensor_bytes, gguf_type

KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
# elements × candidates per chunk of the vectorised scale search (16 MB per temporary)
_SEARCH_CHUNK = 1 << 22


@dataclass
class GGUFEncoded:
    type_name: str
    data: np.ndarray      # uint8 [rows, row_bytes]: the tensor's GGUF bytes, as ggml stores them
    w_hat: torch.Tensor   # float32 [rows, cols]: the decode of `data` (= gguf-py's dequantize)


def _nibbles(codes: Tensor) -> Tensor:
    """[..., 32] codes → [..., 16] bytes: byte j = element j | element j+16 << 4."""
    return ((codes[..., :16] & 15) | ((codes[..., 16:] & 15) << 4)).to(torch.uint8)


def _unnibble(b: Tensor) -> Tensor:
    b = b.to(torch.int64)
    return torch.cat([b & 15, b >> 4], -1)


def _qh_pack(codes: Tensor) -> Tensor:
    """The 5th bits of 32 codes as a little-endian uint32 → [..., 4] bytes."""
    return bits_in((codes >> 4).unflatten(-1, (4, 8)), list(range(8)), dim=codes.dim())


def _qh_unpack(b: Tensor) -> Tensor:
    return bits_out(b, list(range(8)), 1, dim=b.dim()).flatten(-2) << 4


class _Sym32(Codec):
    """Q8_0 / Q4_0 / Q5_0 / IQ4_NL: x̂ = d·level, one fp16 d per 32 elements."""

    block = group = 32

    def __init__(self, name: str, levels: Tensor, zp: int, uniform: bool = True) -> None:
        self.name, self.levels, self.zp, self.uniform = name, levels, zp, uniform

    def fit(self, x, w):
        if not self.uniform:
            s = search_table(x, w, self.levels)
        else:
            lo, hi = -self.zp, len(self.levels) - 1 - self.zp
            s = search_sym(x, w, 127.0 if self.name == "Q8_0" else float(self.zp), lo, hi)
        d = fp16(s)
        return {"d": d}, d.unsqueeze(-1), torch.zeros_like(d).unsqueeze(-1)

    def pack(self, codes, f):
        d = f16_bytes(f["d"])
        if self.name == "Q8_0":
            return torch.cat([d, (codes - 128).to(torch.int8).view(torch.uint8)], -1)
        if self.name == "Q5_0":
            return torch.cat([d, _qh_pack(codes), _nibbles(codes)], -1)
        return torch.cat([d, _nibbles(codes)], -1)

    def unpack(self, b):
        d = f16_read(b[..., :2]).unsqueeze(-1)
        if self.name == "Q8_0":
            codes = b[..., 2:].contiguous().view(torch.int8).to(torch.int64) + 128
        elif self.name == "Q5_0":
            codes = _unnibble(b[..., 6:]) | _qh_unpack(b[..., 2:6])
        else:
            codes = _unnibble(b[..., 2:])
        return codes, d, torch.zeros_like(d)


class _Affine32(Codec):
    """Q4_1 / Q5_1: x̂ = d·q + m, fp16 d and m per 32 elements, q ∈ [0, 2^bits − 1]."""

    block = group = 32
    uniform, zp = True, 0

    def __init__(self, name: str, qmax: int) -> None:
        self.name, self.qmax = name, qmax
        self.levels = torch.arange(qmax + 1, dtype=torch.float32)

    def fit(self, x, w):
        s, m = search_affine(x, w, self.qmax, min_le_zero=False)
        d, m = fp16(s), fp16(m)
        return {"d": d, "m": m}, d.unsqueeze(-1), m.unsqueeze(-1)

    def pack(self, codes, f):
        qh = [_qh_pack(codes)] if self.qmax == 31 else []
        return torch.cat([f16_bytes(f["d"]), f16_bytes(f["m"]), *qh, _nibbles(codes)], -1)

    def unpack(self, b):
        d, m = f16_read(b[..., :2]).unsqueeze(-1), f16_read(b[..., 2:4]).unsqueeze(-1)
        codes = _unnibble(b[..., -16:])
        if self.qmax == 31:
            codes = codes | _qh_unpack(b[..., 4:8])
        return codes, d, m


def _uniform(lo: int, hi: int) -> Tensor:
    return torch.arange(lo, hi + 1, dtype=torch.float32)


CODECS: dict[str, Codec] = {
    "Q8_0": _Sym32("Q8_0", _uniform(-128, 127), 128),
    "Q5_1": _Affine32("Q5_1", 31),
    "Q5_0": _Sym32("Q5_0", _uniform(-16, 15), 16),
    "Q4_1": _Affine32("Q4_1", 15),
    "Q4_0": _Sym32("Q4_0", _uniform(-8, 7), 8),
    "IQ4_NL": _Sym32("IQ4_NL", torch.tensor(KVALUES_IQ4NL, dtype=torch.float32), 0, False),
    **KQUANTS,
}


def _check(type_name: str, cols: int) -> None:
    t = gguf_type(type_name)
    if type_name != "F16" and type_name not in CODECS:
        raise ValueError(f"no GGUF encoder for {type_name}")
    if cols % t.block:
        raise ValueError(f"{type_name}: a row of length {cols} is not a multiple of the "
                         f"{t.block}-element block")


HessianFactor = tuple[Tensor, Tensor]   # (damped diag H, U = upper Cholesky factor of H⁻¹)


def hessian_factor(H: torch.Tensor, dtype: torch.dtype = torch.float32) -> HessianFactor:
    """The O(n³) part of a Hessian-aware encode, which every type's encode of one linear
    shares: H damped by DEFAULT_DAMP, its diagonal (the importance weights) and U."""
    Hd = damp_hessian(H.detach().to("cpu", dtype), DEFAULT_DAMP)
    return Hd.diagonal().clamp(min=torch.finfo(dtype).tiny).clone(), inverse_cholesky_upper(Hd)


def encode_gguf(W: torch.Tensor, type_name: str, H: torch.Tensor | None = None, *,
                error_feedback: bool = True, factor: HessianFactor | None = None
                ) -> GGUFEncoded:
    """W [rows, cols] → its GGUF bytes of `type_name` and their decode. H [cols, cols]
    (XᵀX/N over the input columns, undamped: damped here by DEFAULT_DAMP) makes the
    rounding Hessian-aware (module docstring); None rounds to nearest with w = 1. `factor`:
    hessian_factor(H) when the caller encodes one W in several types."""
    if W.dim() != 2:
        raise ValueError(f"encode_gguf wants a 2-d weight, got shape {tuple(W.shape)}")
    rows, cols = W.shape
    _check(type_name, cols)
    if type_name == "F16":
        data = W.detach().to(torch.float16).contiguous().view(torch.uint8)
        return GGUFEncoded(type_name, data.numpy().copy(), W.detach().half().float())
    codec = CODECS[type_name]
    if rows == 0:
        data = np.zeros((0, gguf_tensor_bytes(type_name, 1, cols)), np.uint8)
        return GGUFEncoded(type_name, data, torch.zeros(0, cols))
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    X = W.detach().to("cpu", dtype)
    nb = cols // codec.block
    if H is not None:
        if H.shape != (cols, cols):
            raise ValueError(f"H must be [{cols}, {cols}] for a row of {cols}, got "
                             f"{tuple(H.shape)}")
        diag, U = factor if factor is not None else hessian_factor(H, dtype)
        w = diag.to(dtype).reshape(nb, codec.block)
    else:
        w = torch.ones(nb, codec.block, dtype=dtype)
    if H is not None and error_feedback:
        codes, fields = _sweep(X, U, codec, w)
    else:
        codes, fields = _nearest(X, codec, w)
    data = codec.pack(codes, fields).reshape(rows, -1)
    assert data.shape[1] * rows == gguf_tensor_bytes(type_name, rows, cols)
    data = data.numpy().copy()
    return GGUFEncoded(type_name, data, decode_gguf(data, type_name, cols))


def decode_gguf(data: np.ndarray, type_name: str, cols: int) -> torch.Tensor:
    """GGUF bytes uint8 [rows, row_bytes] (or flat) of `type_name` → float32 [rows, cols]."""
    _check(type_name, cols)
    t = gguf_type(type_name)
    b = torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8).reshape(-1))
    row_bytes = cols // t.block * t.block_bytes
    if b.numel() % max(row_bytes, 1):
        raise ValueError(f"{type_name}: {b.numel()} bytes are not whole rows of {cols}")
    rows = b.numel() // row_bytes if row_bytes else 0
    if type_name == "F16":
        return b.view(torch.float16).reshape(rows, cols).to(torch.float32)
    codec = CODECS[type_name]
    out = torch.empty(rows, cols, dtype=torch.float32)
    b = b.reshape(rows, cols // t.block, t.block_bytes)
    step = max(1, _SEARCH_CHUNK // max(cols, 1))
    for r in range(0, rows, step):
        codes, s, o = codec.unpack(b[r:r + step])
        out[r:r + step] = codec.decode(codes, s, o).reshape(-1, cols)
    return out


def _nearest(X: Tensor, codec: Codec, w: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Searched parameters and nearest codes for every block, row chunk by row chunk."""
    rows, cols = X.shape
    nb = cols // codec.block
    step = max(1, _SEARCH_CHUNK // (cols * 20))
    codes = torch.empty(rows, nb, codec.block, dtype=torch.int64)
    parts: list[dict[str, Tensor]] = []
    for r in range(0, rows, step):
        x = X[r:r + step].reshape(-1, nb, codec.block)
        f, s, o = codec.fit(x, w)
        xg = x.unflatten(-1, (-1, codec.group))
        codes[r:r + step] = codec.round(xg, s.unsqueeze(-1), o.unsqueeze(-1)).flatten(-2)
        parts.append(f)
    return codes, {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}


def _sweep(X: Tensor, U: Tensor, codec: Codec, w: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """GPTQ / LDLQ over the columns of X [rows, cols] on `codec`'s grid (module docstring).
    Lazy batches are whole blocks (a multiple of 128 columns and of the block), so a block's
    columns carry every earlier column's update when its parameters are fitted."""
    rows, cols = X.shape
    B = codec.block * max(1, 128 // codec.block)
    Y = X.T.clone()                                          # [cols, rows]: a column per row
    U = U.to(Y.dtype)
    diag = U.diagonal().tolist()
    codes = torch.empty(cols, rows, dtype=torch.int64)
    lv = codec.levels.to(Y.dtype)
    fits: list[dict[str, Tensor]] = []
    s_blk = o_blk = None
    for i1 in range(0, cols, B):
        i2 = min(i1 + B, cols)
        Y1, U1 = Y[i1:i2], U[i1:i2, i1:i2]
        err = Y.new_empty(i2 - i1, rows)
        for i in range(i2 - i1):
            col = i1 + i
            if col % codec.block == 0:
                blk = col // codec.block
                f, s, o = codec.fit(Y[col:col + codec.block].T.unsqueeze(1),
                                    w[blk:blk + 1])
                fits.append(f)
                s_blk, o_blk = s[:, 0].T.to(Y.dtype), o[:, 0].T.to(Y.dtype)   # [groups, rows]
            g = (col % codec.block) // codec.group
            y, s, o = Y1[i], s_blk[g], o_blk[g]
            c = codec.round(y, s, o)
            codes[col] = c
            torch.sub(y, s * lv[c] + o, out=err[i]).div_(diag[col])
            if i + 1 < i2 - i1:
                Y1[i + 1:].addr_(U1[i, i + 1:], err[i], alpha=-1)
        if i2 < cols:
            Y[i2:].addmm_(U[i1:i2, i2:].T, err, alpha=-1)
    fields = {k: torch.cat([f[k] for f in fits], dim=1) for k in fits[0]}
    return codes.T.reshape(rows, cols // codec.block, codec.block), fields
