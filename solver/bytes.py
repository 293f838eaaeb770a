"""Exact stored bytes of a compressed linear: the one formula every byte count in bitplan uses.

Storage format (the compressor's packer writes exactly this, and tests hold it to it):
- a b-bit quantized tensor of shape [rows, cols] is grouped along `cols` in groups of
  `group_size` (the last group of a row may be partial);
- codes of the whole tensor are packed contiguously, row-major, b bits each:
  ceil(rows·cols·b / 8) bytes;
- each group stores an fp16 scale and, when asymmetric, an fp16 zero point;
- a "16-bit" tensor is stored as plain fp16 (2 bytes an element, no scales).
A CALDERA option stores Q [m, n] at `bits`, L [m, r] and R [r, n] at `factor_bits`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

SCALE_BYTES = 2  # fp16 scale (and fp16 zero point when asymmetric)
MIN_BITS, MAX_BITS = 2, 8
FP16_BITS = 16


@dataclass(frozen=True, order=True)
class Option:
    """One way to store a linear: Q at `bits`, a rank-`rank` correction L·R at `factor_bits`."""

    bits: int
    rank: int = 0
    factor_bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        if not (MIN_BITS <= self.bits <= MAX_BITS or self.bits == FP16_BITS):
            raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS} or 16, got {self.bits}")
        if not (MIN_BITS <= self.factor_bits <= MAX_BITS or self.factor_bits == FP16_BITS):
            raise ValueError(f"factor_bits must be in {MIN_BITS}..{MAX_BITS} or 16, "
                             f"got {self.factor_bits}")
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0, got {self.rank}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Option:
        return cls(**{k: d[k] for k in OPTION_FIELDS if k in d})


OPTION_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Option))


def quantized_bytes(rows: int, cols: int, bits: int, group_size: int,
                    symmetric: bool = False) -> int:
    """Exact bytes of a [rows, cols] tensor quantized groupwise along cols."""
    if rows == 0 or cols == 0:
        return 0
    if bits >= FP16_BITS:
        return rows * cols * 2
    codes = math.ceil(rows * cols * bits / 8)
    groups = rows * math.ceil(cols / group_size)
    return codes + groups * SCALE_BYTES * (1 if symmetric else 2)


def option_bytes(out_features: int, in_features: int, opt: Option) -> int:
    """Exact bytes of one compressed linear (weights only; biases are kept parameters)."""
    rank = min(opt.rank, out_features, in_features)
    q = quantized_bytes(out_features, in_features, opt.bits, opt.group_size, opt.symmetric)
    left = quantized_bytes(out_features, rank, opt.factor_bits, opt.group_size, opt.symmetric)
    right = quantized_bytes(rank, in_features, opt.factor_bits, opt.group_size, opt.symmetric)
    return q + left + right


def fp16_bytes(out_features: int, in_features: int) -> int:
    return out_features * in_features * 2
