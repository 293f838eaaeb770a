"""The compressed-tensors schemes bitplan plans with (the vLLM target), and their exact bytes.

A module's weight [rows, cols] is stored in the "pack-quantized" format of the compressed-tensors
library (compressed_tensors/compressors/pack_quantized): weight-only integer quantization,
symmetric, groups of `group` consecutive input columns (strategy "group"), each group one scale
in the model's dtype (fp16 here), codes q ∈ [−2^(b−1), 2^(b−1) − 1] with ŵ = q·s. The codes are
offset by 2^(b−1) to unsigned and packed densely, LSB first, into int32 words:
ceil(cols·b / 32) words per row (32 codes fill exactly b words). A module also stores its shape
as two int64s (`weight_shape`). So a scheme costs
    rows·ceil(cols·b/32)·4 + rows·(cols/group)·2 + 16 bytes.
vLLM's kernels (Marlin for 4/8 bits, its mixed-precision W2–W7 A16 kernels otherwise) and the
library's own quantizer require `cols` to be a multiple of the group: SmolLM2's 576-wide inputs
take groups of 32 and 64, not 128.

A module no group fits (or one a constraint pins to 16 bits) is kept dense in fp16 and listed in
the config's `ignore` (vLLM serves it unquantized): the "FP16" option, rows·cols·2 bytes.

An optional L·R correction is served as a LoRA adapter on top (PEFT layout: lora_A [r, cols],
lora_B [rows, r], fp16, 2·r·(rows + cols) bytes), its rank one of vLLM's max_lora_rank choices.
"""

from __future__ import annotations

import math

CT_TARGET = "compressed-tensors"   # the target's name (solver.bytes.TARGETS)
CT_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
CT_GROUPS: tuple[int, ...] = (32, 64, 128)
LORA_RANKS: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512)   # vLLM's --max-lora-rank values
SCALE_BYTES = 2          # one fp16 scale per group
SHAPE_BYTES = 16         # weight_shape: two int64
LORA_BITS = 16           # adapters are fp16 (vLLM serves LoRA in the model's dtype)
DENSE_BITS = 16
DENSE = "FP16"
# fused by vLLM into one projection each: every member must carry one scheme
FUSED: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def check_scheme(bits: int, group: int, rank: int = 0) -> None:
    if bits == DENSE_BITS:
        if rank or group != CT_GROUPS[-1]:
            raise ValueError(f"the dense {DENSE} option has rank 0 and group_size "
                             f"{CT_GROUPS[-1]} (its bytes do not depend on it)")
        return
    if bits not in CT_BITS:
        raise ValueError(f"compressed-tensors bits must be one of {list(CT_BITS)}, got {bits}")
    if group not in CT_GROUPS:
        raise ValueError(f"compressed-tensors group_size must be one of {list(CT_GROUPS)}, "
                         f"got {group}")
    if rank and rank not in LORA_RANKS:
        raise ValueError(f"a LoRA rank must be one of {list(LORA_RANKS)}, got {rank}")


def fits_cols(group: int, cols: int) -> bool:
    """Whether a row of `cols` inputs is a whole number of groups (what vLLM requires)."""
    return cols % group == 0


def scheme_name(bits: int, group: int) -> str:
    """vLLM's name for a weight-only scheme with its group: ``W4A16-g128`` (or FP16)."""
    if bits == DENSE_BITS:
        return DENSE
    return f"W{bits}A16-g{group}"


def ct_weight_bytes(rows: int, cols: int, bits: int, group: int) -> int:
    """Exact bytes of one pack-quantized weight: packed codes, scales, shape."""
    check_scheme(bits, group)
    if bits == DENSE_BITS:
        return rows * cols * 2
    if not fits_cols(group, cols):
        raise ValueError(f"a row of {cols} inputs is not a whole number of {group}-groups "
                         f"(vLLM needs cols % group_size == 0)")
    return rows * math.ceil(cols * bits / 32) * 4 + rows * (cols // group) * SCALE_BYTES \
        + SHAPE_BYTES


def lora_bytes(rows: int, cols: int, rank: int) -> int:
    """fp16 lora_A [rank, cols] and lora_B [rows, rank]."""
    return rank * (rows + cols) * LORA_BITS // 8


def menu_bytes_range(rows: int, cols: int, max_rank: int,
                     ranks: tuple[int, ...] = LORA_RANKS) -> tuple[int, int]:
    """(cheapest, dearest) bytes of a linear's default menu: every scheme its rows fit, each
    with every rank ≤ max_rank (dense fp16 alone when none fits)."""
    fits = [(b, g) for g in CT_GROUPS if fits_cols(g, cols) for b in CT_BITS]
    if not fits:
        return rows * cols * 2, rows * cols * 2
    top = max([0] + [r for r in ranks if r <= max_rank])
    costs = [ct_weight_bytes(rows, cols, b, g) for b, g in fits]
    return min(costs), max(costs) + lora_bytes(rows, cols, top)
