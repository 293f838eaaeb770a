"""The GGUF tensor types bitplan plans with, and their exact stored bytes.

A GGUF tensor of shape [rows, cols] (ggml's ne = [cols, rows]) is stored row-major as blocks of
`block` consecutive elements along cols, each `block_bytes` bytes; a row's length must be a
multiple of the block. The k-quants (Q2_K … Q6_K, IQ4_XS) use 256-element super-blocks, the
older types (Q4_0 … Q8_0, IQ4_NL) 32-element blocks, F16 one element. Sizes and type ids are
ggml's (ggml/include/ggml.h `enum ggml_type`, ggml/src/ggml-common.h `block_*` structs):
e.g. Q4_K = fp16 d, fp16 dmin, 12 bytes of 6-bit sub-block scales and mins, 128 bytes of
4-bit codes = 144 bytes per 256 weights = 4.5 bits per weight.

When a row is not a multiple of 256 (SmolLM2's 576), only the 32-element types fit — what
llama.cpp's own quantizer falls back to as well (llama-quant.cpp: Q4_K → Q5_0, …).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GGUFType:
    name: str
    type_id: int        # ggml_type
    block: int          # elements per block
    block_bytes: int    # bytes per block
    bits: int           # the nominal bit width a plan shows (Q4_K -> 4)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block


GGUF_TYPES: dict[str, GGUFType] = {t.name: t for t in (
    GGUFType("F16", 1, 1, 2, 16),
    GGUFType("Q8_0", 8, 32, 34, 8),
    GGUFType("Q6_K", 14, 256, 210, 6),
    GGUFType("Q5_1", 7, 32, 24, 5),
    GGUFType("Q5_K", 13, 256, 176, 5),
    GGUFType("Q5_0", 6, 32, 22, 5),
    GGUFType("Q4_1", 3, 32, 20, 4),
    GGUFType("Q4_K", 12, 256, 144, 4),
    GGUFType("Q4_0", 2, 32, 18, 4),
    GGUFType("IQ4_NL", 20, 32, 18, 4),
    GGUFType("Q3_K", 11, 256, 110, 3),
    GGUFType("Q2_K", 10, 256, 84, 2),
)}
# the planner's default menu (every type bitplan encodes), best to smallest
GGUF_MENU: tuple[str, ...] = tuple(GGUF_TYPES)


def gguf_type(name: str) -> GGUFType:
    try:
        return GGUF_TYPES[name]
    except KeyError:
        raise ValueError(f"unknown GGUF type {name!r}; bitplan encodes "
                         f"{', '.join(GGUF_TYPES)}") from None


def parse_types(text: str) -> tuple[str, ...]:
    """A comma-separated list of type names ("Q4_0, IQ4_NL,Q8_0"), each checked (gguf_type)."""
    return tuple(gguf_type(t.strip()).name for t in text.split(",") if t.strip())


def fits_row(name: str, cols: int) -> bool:
    """Whether a row of `cols` elements is a whole number of `name`'s blocks."""
    return cols % gguf_type(name).block == 0


def types_for_row(cols: int, menu: tuple[str, ...] = GGUF_MENU) -> list[str]:
    """The types of `menu` a row of `cols` elements can be stored in, in menu order."""
    return [t for t in menu if fits_row(t, cols)]


def gguf_tensor_bytes(name: str, rows: int, cols: int) -> int:
    """Exact data bytes of a [rows, cols] tensor of type `name` (no alignment padding: that is
    the file's, between tensors, at most 31 bytes each)."""
    t = gguf_type(name)
    if cols % t.block:
        raise ValueError(f"{name} stores rows in blocks of {t.block}; a row of {cols} "
                         f"elements does not fit (use a 32-element type such as Q4_0)")
    return rows * (cols // t.block) * t.block_bytes
