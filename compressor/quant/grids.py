"""Groupwise uniform quantization, bit packing, and exact stored bytes.

The storage format is the one `solver.bytes` defines and counts (read its docstring); this
module writes exactly those bytes:
- a tensor of any shape is viewed as [rows, cols] with cols = its last dimension (a 0-d tensor
  is [1, 1]); groups of `group_size` run along cols and the last group of a row may be partial;
- codes are `bits`-bit unsigned integers, packed contiguously row-major, LSB first within each
  byte (code i occupies bits i·b … i·b+b−1 of the little-endian bit stream);
- each group stores an fp16 scale s and, asymmetric, an fp16 zero point z (in code units):
      asymmetric  x̂ = (q − z)·s,          q ∈ [0, 2^b − 1], z = −min/s
      symmetric   x̂ = (q − (2^b−1)/2)·s,  the midpoint is implicit, so no zero is stored;
  the symmetric grid is the half-integer one, which uses all 2^b levels (the usual
  absmax/(2^(b−1)−1) grid wastes one; at 2 bits that is a quarter of them);
- codes are computed against the fp16-rounded scale and zero, so dequantization sees exactly
  the parameters it was quantized with;
- 16 "bits" means plain fp16 (codes are the fp16 values, no scales).

Pure primitives in pairs (hqq style): `quantize` → (codes, meta) / `dequantize`, and
`pack` / `unpack`; no device moves, no printing, no caching.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from solver.bytes import FP16_BITS, MAX_BITS, MIN_BITS, quantized_bytes

FP16_MAX = 65504.0
FP16_TINY = 2.0 ** -24  # smallest positive fp16 (subnormal): a scale never rounds to zero
_PACK_CHUNK = 1 << 18   # elements per packing chunk (its int32 bit stream: 8 MiB at 8 bits);
                        # a multiple of 8 so chunks end on bytes


@dataclass(frozen=True)
class QuantMeta:
    """Everything but the codes: shape, format, and the per-group fp16 scales / zero points
    (shape [rows, n_groups]; None for 16-bit tensors, zero None when symmetric)."""

    shape: tuple[int, ...]
    bits: int
    group_size: int
    symmetric: bool
    scale: Tensor | None
    zero: Tensor | None

    @property
    def rows(self) -> int:
        return _rows_cols(self.shape)[0]

    @property
    def cols(self) -> int:
        return _rows_cols(self.shape)[1]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to(self, device: torch.device | str) -> QuantMeta:
        scale = None if self.scale is None else self.scale.to(device)
        zero = None if self.zero is None else self.zero.to(device)
        return QuantMeta(self.shape, self.bits, self.group_size, self.symmetric, scale, zero)


def _check_bits(bits: int) -> None:
    if not (MIN_BITS <= bits <= MAX_BITS or bits == FP16_BITS):
        raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS} or 16, got {bits}")


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    cols = shape[-1]
    return math.prod(shape[:-1]), cols


def _grouped(x2: Tensor, group_size: int) -> Tensor:
    """[rows, cols] → [rows, n_groups, group_size]; a partial last group is padded with copies
    of the row's last element, which changes neither its min, max nor absmax. (The research
    note's bug was trimming every group instead of the tail: we only ever trim the tail.)"""
    rows, cols = x2.shape
    n_groups = -(-cols // group_size)
    pad = n_groups * group_size - cols
    if pad:
        x2 = torch.cat([x2, x2[:, -1:].expand(rows, pad)], dim=1)
    return x2.reshape(rows, n_groups, group_size)


# MSE-optimal clipping: shrink each group's range by p ∈ CLIP_GRID and keep, per group, the p
# with the least squared round-to-nearest error (the grid search of GPTQ's reference code,
# Frantar et al. 2022; also AWQ and llama.cpp). Min-max grids spend levels on the tails: at
# 2 bits on the demo model's Hadamard-rotated weights the search cut the H-weighted error of
# LDLQ rounding 31–52 % (3 bits 10–25 %, 4 bits 2–9 %). Bytes are unchanged.
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)


def _minmax_params(lo: Tensor, hi: Tensor, qmax: int,
                   symmetric: bool) -> tuple[Tensor, Tensor | None]:
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        return (amax / (qmax / 2)).clamp(FP16_TINY, FP16_MAX).half(), None
    span = hi - lo
    # A constant group has no span: take |value|/qmax so that z = ±qmax stays representable.
    flat = torch.maximum(lo.abs(), hi.abs()) / qmax
    scale = torch.where(span > 0, span / qmax, flat).clamp(FP16_TINY, FP16_MAX).half()
    zero = (-lo / scale.float()).clamp(-FP16_MAX, FP16_MAX).half()
    return scale, zero


# elements of x times len(CLIP_GRID) up to which the grid is one pass: on the host 16 MiB of
# float32 per temporary (whole matrices go factor by factor, in bounded memory), on a GPU
# 64 MiB (every LDLQ column group of a real width in one pass: fewer kernel launches)
_CLIP_BATCH = 1 << 22
_CLIP_BATCH_CUDA = 1 << 24


def group_params(x: Tensor, bits: int, symmetric: bool,
                 clip: bool = True) -> tuple[Tensor, Tensor | None]:
    """fp16 scale (and zero) for groups laid out along the last dim of `x` [..., group]: the
    clipped range with the least squared error (`clip`), or plain min-max.

    The clip grid is searched in one broadcast pass over a leading grid dimension (a dozen
    kernels instead of a dozen per clip factor: the LDLQ column loop calls this at every
    group's first column) when that fits `_CLIP_BATCH`, otherwise factor by factor. Both
    are the same elementwise float operations and pick the first least error, so they agree
    bit for bit (tested)."""
    qmax = (1 << bits) - 1
    xf = x.float()
    lo, hi = xf.amin(dim=-1), xf.amax(dim=-1)
    if not clip:
        return _minmax_params(lo, hi, qmax, symmetric)
    if xf.numel() * len(CLIP_GRID) <= (_CLIP_BATCH_CUDA if xf.is_cuda else _CLIP_BATCH):
        p = _clip_factors(xf.device, xf.dtype).reshape(-1, *[1] * lo.dim())
        scale, zero = _minmax_params(lo * p, hi * p, qmax, symmetric)   # [P, ...]
        err = _clip_err(xf, scale, zero, qmax)
        pick = err.nan_to_num(nan=torch.inf).argmin(0, keepdim=True)   # first least error
        return (scale.gather(0, pick).squeeze(0),
                None if zero is None else zero.gather(0, pick).squeeze(0))
    best: tuple[Tensor, Tensor, Tensor | None] | None = None
    for p in CLIP_GRID:
        scale, zero = _minmax_params(lo * p, hi * p, qmax, symmetric)
        err = _clip_err(xf, scale, zero, qmax)
        if best is None:
            best = (err, scale, zero)
            continue
        better = err < best[0]
        best = (torch.where(better, err, best[0]), torch.where(better, scale, best[1]),
                None if zero is None else torch.where(better, zero, best[2]))
    return best[1], best[2]


def signed_params(x: Tensor, bits: int, clip: bool = True) -> tuple[Tensor, Tensor]:
    """fp16 scale s and fixed zero 2^(b−1) for groups along x's last dim on the signed grid
    ŵ = q·s, q ∈ [−2^(b−1), 2^(b−1) − 1] (compressed-tensors' symmetric int), as codes
    c = q + 2^(b−1) with zero z = 2^(b−1), which `dequantize_with` reads unchanged. The scale
    fits the side that needs more, clipped to the least squared error over CLIP_GRID."""
    half = 1 << (bits - 1)
    qmax = (1 << bits) - 1
    xf = x.float()
    lo, hi = xf.amin(dim=-1), xf.amax(dim=-1)
    need = torch.maximum(hi / max(half - 1, 1), -lo / half)

    zero = torch.full_like(lo, float(half)).half()
    best_s = need.clamp(FP16_TINY, FP16_MAX).half()
    if clip:
        best_e = _clip_err(xf, best_s, zero, qmax)
        for p in CLIP_GRID[1:]:
            s = (need * p).clamp(FP16_TINY, FP16_MAX).half()
            e = _clip_err(xf, s, zero, qmax)
            better = e < best_e
            best_e, best_s = torch.where(better, e, best_e), torch.where(better, s, best_s)
    return best_s, zero


@functools.cache
def _clip_factors(device: torch.device, dtype: torch.dtype) -> Tensor:
    """CLIP_GRID as a tensor, made once per device (no host→device copy per group)."""
    return torch.tensor(CLIP_GRID, dtype=dtype, device=device)


def _clip_err(xf: Tensor, scale: Tensor, zero: Tensor | None, qmax: int) -> Tensor:
    """Squared round-to-nearest error of each group of xf on the grid (scale, zero)."""
    s = scale.float().unsqueeze(-1)
    off = zero.float().unsqueeze(-1) if zero is not None else qmax / 2
    # ((round(x/s + off).clamp(0, qmax) − off)·s − x)², in place: one buffer, same operations
    y = (xf / s).add_(off).round_().clamp_(0, qmax).sub_(off).mul_(s).sub_(xf)
    return y.square_().sum(-1)


def quantize_with(x: Tensor, scale: Tensor, zero: Tensor | None, bits: int) -> Tensor:
    """Codes of `x` on a given grid; `scale`/`zero` broadcast against `x` (the LDLQ loop calls
    this one column at a time with a group's parameters)."""
    qmax = (1 << bits) - 1
    offset = zero.float() if zero is not None else qmax / 2
    # in place after the division: the same operations as round(x / s + o), one temporary
    return (x.float() / scale.float()).add_(offset).round_().clamp_(0, qmax).to(torch.uint8)


def dequantize_with(codes: Tensor, scale: Tensor, zero: Tensor | None, bits: int) -> Tensor:
    qmax = (1 << bits) - 1
    offset = zero.float() if zero is not None else qmax / 2
    return codes.float().sub_(offset).mul_(scale.float())   # (c − o)·s, one temporary


# rows at a time for whole-matrix passes: 4 MiB float32 temporaries (a float64 sum of one
# makes an 8 MiB copy)
ROW_CHUNK_ELEMENTS = 1 << 20


def chunk_rows(cols: int) -> int:
    """Rows per chunk of a [rows, cols] matrix whose float32 temporaries stay ~4 MiB."""
    return max(1, ROW_CHUNK_ELEMENTS // max(cols, 1))


def quantize(x: Tensor, bits: int, group_size: int = 128,
             symmetric: bool = False) -> tuple[Tensor, QuantMeta]:
    """Round-to-nearest groupwise quantization → (uint8 codes of x's shape, meta).

    Rows are independent (groups run along a row), so a large x is quantized a row chunk at a
    time: the same codes and parameters, with temporaries of `chunk_rows` rows instead of
    several copies of x. 16 bits returns the fp16 values as the codes."""
    _check_bits(bits)
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    shape = tuple(x.shape)
    if bits == FP16_BITS:
        return x.detach().half().clone(), QuantMeta(shape, bits, group_size, symmetric, None, None)
    rows, cols = _rows_cols(shape)
    x2 = x.detach().reshape(rows, cols)
    n_groups = -(-cols // group_size)
    if x2.numel() == 0:
        empty = torch.empty(rows, n_groups, dtype=torch.float16, device=x.device)
        codes = torch.empty(shape, dtype=torch.uint8, device=x.device)
        return codes, QuantMeta(shape, bits, group_size, symmetric, empty,
                                None if symmetric else empty.clone())
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=x.device)
    scale = torch.empty(rows, n_groups, dtype=torch.float16, device=x.device)
    zero = None if symmetric else torch.empty_like(scale)
    step = chunk_rows(n_groups * group_size)
    for a in range(0, rows, step):
        g = _grouped(x2[a:a + step], group_size)
        s, z = group_params(g, bits, symmetric)
        c = quantize_with(g, s.unsqueeze(-1), None if z is None else z.unsqueeze(-1), bits)
        codes[a:a + step] = c.reshape(len(g), n_groups * group_size)[:, :cols]
        scale[a:a + step] = s
        if zero is not None:
            zero[a:a + step] = z
    return codes.reshape(shape), QuantMeta(shape, bits, group_size, symmetric, scale, zero)


def dequantize(codes: Tensor, meta: QuantMeta, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of `quantize` (up to rounding): a tensor of meta.shape in `dtype`."""
    if meta.bits == FP16_BITS:
        return codes.reshape(meta.shape).to(dtype)
    rows, cols = meta.rows, meta.cols
    if rows * cols == 0:
        return torch.zeros(meta.shape, dtype=dtype, device=codes.device)
    gs = meta.group_size
    n_groups = -(-cols // gs)
    c2 = codes.reshape(rows, cols)
    pad = n_groups * gs - cols
    if pad:
        c2 = torch.cat([c2, c2.new_zeros(rows, pad)], dim=1)
    zero = None if meta.zero is None else meta.zero.unsqueeze(-1)
    x = dequantize_with(c2.reshape(rows, n_groups, gs), meta.scale.unsqueeze(-1), zero, meta.bits)
    return x.reshape(rows, n_groups * gs)[:, :cols].reshape(meta.shape).to(dtype)


def dequantize_rows(codes: Tensor, meta: QuantMeta, start: int, stop: int,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """Rows [start, stop) of `dequantize(codes, meta)` of a 2-D tensor (the same values)."""
    if len(meta.shape) != 2:
        raise ValueError(f"dequantize_rows needs a 2-D tensor, got shape {meta.shape}")
    stop = min(stop, meta.rows)
    part = QuantMeta((stop - start, meta.cols), meta.bits, meta.group_size, meta.symmetric,
                     None if meta.scale is None else meta.scale[start:stop],
                     None if meta.zero is None else meta.zero[start:stop])
    return dequantize(codes.reshape(meta.rows, meta.cols)[start:stop], part, dtype)


def pack(codes: Tensor, bits: int) -> Tensor:
    """Codes (any shape) → 1-D uint8 of exactly ceil(numel·bits/8) bytes (16 bits: fp16 bytes)."""
    _check_bits(bits)
    if bits == FP16_BITS:
        return codes.detach().half().contiguous().reshape(-1).view(torch.uint8).clone()
    flat = codes.reshape(-1).to(torch.uint8)
    n = flat.numel()
    out = torch.empty(-(-n * bits // 8), dtype=torch.uint8, device=codes.device)
    shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8)
    byte_w = (1 << torch.arange(8, device=codes.device, dtype=torch.int32))
    for start in range(0, n, _PACK_CHUNK):
        chunk = flat[start:start + _PACK_CHUNK]
        stream = ((chunk.unsqueeze(-1) >> shifts) & 1).reshape(-1)      # LSB-first bit stream
        tail = -stream.numel() % 8
        if tail:
            stream = torch.cat([stream, stream.new_zeros(tail)])
        byte_vals = (stream.view(-1, 8).to(torch.int32) * byte_w).sum(-1).to(torch.uint8)
        first = start * bits // 8                                     # exact: start % 8 == 0
        out[first:first + byte_vals.numel()] = byte_vals
    return out


def unpack(packed: Tensor, bits: int, shape: tuple[int, ...]) -> Tensor:
    """Inverse of `pack`: uint8 codes (fp16 values for 16 bits) of `shape`."""
    _check_bits(bits)
    n = math.prod(shape)
    if bits == FP16_BITS:
        return packed.reshape(-1)[: 2 * n].view(torch.float16).reshape(shape).clone()
    expected = -(-n * bits // 8)
    if packed.numel() != expected:
        raise ValueError(f"{packed.numel()} packed bytes, expected {expected} for {shape} "
                         f"at {bits} bits")
    out = torch.empty(n, dtype=torch.uint8, device=packed.device)
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    code_w = (1 << torch.arange(bits, device=packed.device, dtype=torch.int32))
    for start in range(0, n, _PACK_CHUNK):
        count = min(_PACK_CHUNK, n - start)
        first = start * bits // 8
        chunk = packed[first:first + -(-count * bits // 8)]
        stream = ((chunk.unsqueeze(-1) >> shifts) & 1).reshape(-1)[: count * bits]
        out[start:start + count] = (stream.view(count, bits).to(torch.int32) * code_w).sum(-1)
    return out.reshape(shape)


def stored_bytes(shape: tuple[int, ...], bits: int, group_size: int,
                 symmetric: bool = False) -> int:
    """Exact stored bytes of a quantized tensor; delegates to `solver.bytes.quantized_bytes`."""
    rows, cols = _rows_cols(tuple(shape))
    return quantized_bytes(rows, cols, bits, group_size, symmetric)


@dataclass
class QuantizedTensor:
    """Packed codes + meta: the stored form of one tensor (what the artifact writes)."""

    packed: Tensor
    meta: QuantMeta
    # the codes it was packed from, when known: `codes()` then skips unpacking (decompose
    # dequantizes every rounding it tries); `without_codes()` drops them for storage
    _codes: Tensor | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_codes(cls, codes: Tensor, meta: QuantMeta) -> QuantizedTensor:
        return cls(pack(codes, meta.bits), meta, codes)

    def without_codes(self) -> QuantizedTensor:
        """The same stored tensor holding only its packed bytes (codes take 8/bits× more)."""
        return QuantizedTensor(self.packed, self.meta)

    @classmethod
    def quantize(cls, x: Tensor, bits: int, group_size: int = 128,
                 symmetric: bool = False) -> QuantizedTensor:
        return cls.from_codes(*quantize(x, bits, group_size, symmetric))

    def codes(self) -> Tensor:
        if self._codes is not None:
            return self._codes
        return unpack(self.packed, self.meta.bits, self.meta.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.codes(), self.meta, dtype)

    def tensors(self) -> dict[str, Tensor]:
        """The stored tensors by suffix (empty ones left out: they hold no bytes)."""
        out = {"packed": self.packed, "scale": self.meta.scale, "zero": self.meta.zero}
        return {k: v.contiguous() for k, v in out.items() if v is not None and v.numel() > 0}

    @property
    def nbytes(self) -> int:
        """Bytes actually held by the stored tensors (tests hold this == `stored_bytes`)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def accounted_bytes(self) -> int:
        m = self.meta
        return stored_bytes(m.shape, m.bits, m.group_size, m.symmetric)

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], shape: tuple[int, ...], bits: int,
                     group_size: int, symmetric: bool) -> QuantizedTensor:
        """Rebuild from `tensors()` output; missing (empty) tensors are recreated empty."""
        rows, cols = _rows_cols(tuple(shape))
        n_groups = -(-cols // group_size)
        dev = next((t.device for t in tensors.values()), torch.device("cpu"))
        empty = torch.empty(0, dtype=torch.float16, device=dev)
        packed = tensors.get("packed", torch.empty(0, dtype=torch.uint8, device=dev))
        if bits == FP16_BITS:
            return cls(packed, QuantMeta(tuple(shape), bits, group_size, symmetric, None, None))
        scale = tensors.get("scale", empty).reshape(rows, n_groups)
        zero = None if symmetric else tensors.get("zero", empty).reshape(rows, n_groups)
        return cls(packed, QuantMeta(tuple(shape), bits, group_size, symmetric, scale, zero))

    def to(self, device: torch.device | str) -> QuantizedTensor:
        return QuantizedTensor(self.packed.to(device), self.meta.to(device))
