"""Exact stored bytes of a compressed linear: the one formula every byte count in bitplan uses.

Storage format (the compressor's packer writes exactly this, and tests hold it to it):
- a b-bit quantized tensor of shape [rows, cols] is grouped along `cols` in groups of
  `group_size` (the last group of a row may be partial);
- codes of the whole tensor are packed contiguously, row-major, b bits each:
  ceil(rows·cols·b / 8) bytes;
- each group stores an fp16 scale and, when asymmetric, an fp16 zero point;
- a "16-bit" tensor is stored as plain fp16 (2 bytes an element, no scales).
A CALDERA option stores Q [m, n] at `bits`, L [m, r] and R [r, n] at `factor_bits`.
A GGUF option (`gguf_type` set: the llama.cpp target) stores the tensor in that ggml block type,
its bytes given by solver.gguf_types (no rank, no factors).
A compressed-tensors option (`ct` set: the vLLM target) stores the weight pack-quantized, a
symmetric `bits`-bit scheme with groups of `group_size`, plus an fp16 LoRA adapter of rank
`rank` (factor_bits 16); its bytes given by solver.ct_schemes.

`check_option_fields` is the one validator of option fields a user writes (a constraint pin, a
recipe entry): what each field accepts, and the words every such error uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from solver.ct_schemes import (
    CT_GROUPS,
    DENSE,
    LORA_BITS,
    check_scheme,
    ct_weight_bytes,
    lora_bytes,
    scheme_name,
)
from solver.gguf_types import GGUF_TYPES, gguf_tensor_bytes, gguf_type

# what a plan is served by: our runtime, llama.cpp (GGUF) or vLLM (compressed-tensors)
TARGETS = ("native", "gguf", "compressed-tensors")

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
    gguf_type: str = ""        # a llama.cpp block type (Q4_K …): the GGUF target's options
    ct: bool = False           # a compressed-tensors scheme (+ LoRA rank): the vLLM target's

    def __post_init__(self) -> None:
        if self.ct:
            check_scheme(self.bits, self.group_size, self.rank)
            if not self.symmetric or self.factor_bits != LORA_BITS or self.gguf_type:
                raise ValueError("a compressed-tensors option is symmetric with fp16 (16-bit) "
                                 "LoRA factors (use ct_option)")
        if self.gguf_type:
            t = gguf_type(self.gguf_type)
            if (self.bits, self.rank, self.group_size) != (t.bits, 0, t.block):
                raise ValueError(f"a {t.name} option is bits={t.bits}, rank=0, "
                                 f"group_size={t.block} (use gguf_option)")
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
        d = asdict(self)
        if not self.gguf_type:   # native options keep the dict (and profile keys) they had
            del d["gguf_type"]
        if not self.ct:
            del d["ct"]
        return d

    @property
    def label(self) -> str:
        """How a plan table names the option: ``Q4_K`` or ``3b/r40/fb4/g128[/sym]``."""
        if self.gguf_type:
            return self.gguf_type
        if self.ct:
            return scheme_name(self.bits, self.group_size) + (f"+r{self.rank}" if self.rank else "")
        return (f"{self.bits}b/r{self.rank}/fb{self.factor_bits}/g{self.group_size}"
                + ("/sym" if self.symmetric else ""))

    @classmethod
    def from_dict(cls, d: dict) -> Option:
        return cls(**{k: d[k] for k in OPTION_FIELDS if k in d})


OPTION_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Option))


def gguf_option(name: str) -> Option:
    """The option storing a tensor as GGUF type `name` (Q4_K, Q8_0, …)."""
    t = gguf_type(name)
    return Option(t.bits, 0, group_size=t.block, gguf_type=t.name)


def ct_option(bits: int, group_size: int, rank: int = 0) -> Option:
    """The option storing a weight as compressed-tensors W{bits}A16 with groups of
    `group_size`, plus an fp16 LoRA of `rank` (0: none)."""
    return Option(bits, rank, LORA_BITS, group_size, symmetric=True, ct=True)


def ct_dense() -> Option:
    """The compressed-tensors target's dense option: kept in fp16, in the config's ignore."""
    return ct_option(FP16_BITS, CT_GROUPS[-1])


def ct_option_from_label(label: str) -> Option:
    """The option a label names (``W4A16-g128`` or ``W4A16-g128+r16``, Option.label's form)."""
    if label == DENSE:
        return ct_dense()
    try:
        scheme, _, rank = label.partition("+r")
        w, g = scheme.split("A16-g")
        return ct_option(int(w.removeprefix("W")), int(g), int(rank or 0))
    except ValueError as e:
        raise ValueError(f"not a compressed-tensors option label: {label!r} ({e})") from None
MAX_RANK = 1 << 16        # the largest rank and group size a request may ask for
MAX_GROUP_SIZE = 1 << 16


def _int_in(lo: int, hi: int, also: int | None = None) -> Callable[[Any], bool]:
    def ok(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and (lo <= v <= hi or v == also)
    return ok


_BITS_RULE = (_int_in(MIN_BITS, MAX_BITS, FP16_BITS),
              f"in {MIN_BITS}..{MAX_BITS} or {FP16_BITS} (an integer)")
# field -> (accepts, what it accepts in words); one entry per Option field
_FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "bits": _BITS_RULE,
    "rank": (_int_in(0, MAX_RANK), f"in 0..{MAX_RANK} (an integer)"),
    "factor_bits": _BITS_RULE,
    "group_size": (_int_in(1, MAX_GROUP_SIZE), f"in 1..{MAX_GROUP_SIZE} (an integer)"),
    "symmetric": (lambda v: isinstance(v, bool), "true or false"),
    "gguf_type": (lambda v: isinstance(v, str) and (v == "" or v in GGUF_TYPES),
                  f"one of {', '.join(GGUF_TYPES)}"),
    "ct": (lambda v: isinstance(v, bool), "true or false"),
}


def field_problem(name: str, value: Any) -> str | None:
    """None when `value` is a valid `name` field of an Option, else why not, in the words every
    option-field error uses: ``"<name> must be <rule>, got <value>"``."""
    ok, rule = _FIELD_RULES[name]
    return None if ok(value) else f"{name} must be {rule}, got {value!r}"


def check_option_fields(value: Any, where: str, *, values: bool = True,
                        error: type[ValueError] = ValueError) -> dict[str, Any]:
    """`value` as a dict of option fields, or `error` naming `where` and what is wrong: not a
    mapping, a key that is no Option field, or (with `values`) a value `field_problem` refuses.
    A partial mapping is fine (which fields are required is the caller's rule)."""
    if not isinstance(value, Mapping):
        raise error(f"{where} must be a mapping of option fields, got {value!r}")
    unknown = set(value) - set(OPTION_FIELDS)
    if unknown:
        raise error(f"{where}: unknown option fields {sorted(unknown, key=str)} "
                    f"(known: {', '.join(OPTION_FIELDS)})")
    for k, v in value.items() if values else ():
        problem = field_problem(k, v)
        if problem:
            raise error(f"{where}: {problem}")
    return dict(value)


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
    if opt.gguf_type:
        return gguf_tensor_bytes(opt.gguf_type, out_features, in_features)
    if opt.ct:
        return (ct_weight_bytes(out_features, in_features, opt.bits, opt.group_size)
                + lora_bytes(out_features, in_features, opt.rank))
    rank = min(opt.rank, out_features, in_features)
    q = quantized_bytes(out_features, in_features, opt.bits, opt.group_size, opt.symmetric)
    left = quantized_bytes(out_features, rank, opt.factor_bits, opt.group_size, opt.symmetric)
    right = quantized_bytes(rank, in_features, opt.factor_bits, opt.group_size, opt.symmetric)
    return q + left + right


def fp16_bytes(out_features: int, in_features: int) -> int:
    return out_features * in_features * 2
