"""The GGUF target (llama.cpp): a linear's options are llama.cpp tensor types, each sampled by
our own encoders (compressor.quant.gguf_blocks), so the profile's errors describe exactly the
weights llama.cpp will run.

Where the native target fits a parametric E_i(b, r) to a few samples (a CALDERA menu has
hundreds of (bits, rank, group) options), a GGUF menu has at most a dozen types per tensor and
each encode is cheap: every type the row length allows is measured, and the "fit" is that table
of t² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) (‖ΔW‖²_F / ‖W‖²_F for a lookup, which has no Hessian). The
predicted damage of a type is α_i · t²_i(type), the same linear model as the native target's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from compressor.pipeline.planning import GGUF_FIT
from compressor.quant.gguf_blocks import GGUFEncoded, HessianFactor, encode_gguf, hessian_factor
from compressor.quant.problem import fro_sq, h_sq
from solver.gguf_types import GGUF_MENU, types_for_row


def row_types(cols: int, menu: Sequence[str] = GGUF_MENU) -> list[str]:
    """The types of `menu` a row of `cols` elements fits (k-quants need multiples of 256)."""
    types = types_for_row(cols, tuple(menu))
    if not types:
        raise ValueError(f"no GGUF type of {list(menu)} stores rows of {cols} elements")
    return types


@torch.no_grad()
def encode_for_plan(W: Tensor, type_name: str, H: Tensor | None, lookup: bool,
                    factor: HessianFactor | None = None) -> GGUFEncoded:
    """What a plan's tensor is stored as: LDLQ under H for a linear, nearest rounding with
    uniform importance for a lookup (its rows are read, never mixed)."""
    if lookup:
        return encode_gguf(W, type_name, None, error_feedback=False)
    return encode_gguf(W, type_name, H, factor=factor)


@torch.no_grad()
def relative_error(W: Tensor, w_hat: Tensor, H: Tensor | None) -> float:
    """t² of one encode: H-weighted for a linear, Frobenius for a lookup (H None)."""
    delta = W - w_hat
    if H is None:
        return fro_sq(delta) / max(fro_sq(W), 1e-30)
    return h_sq(delta, H) / max(h_sq(W, H), 1e-30)


@torch.no_grad()
def sample_gguf(W: Tensor, H: Tensor | None, menu: Sequence[str], lookup: bool
                ) -> tuple[list[list], dict]:
    """Samples [[type, t²], …] of every type in `menu` that fits W's rows, and the fit record
    {"kind": "gguf", "errors": {type: t²}} the planner reads (callers refuse NaN/inf W
    first, naming the tensor)."""
    samples = []
    factor = None if lookup or H is None else hessian_factor(H)   # once for every type
    for t in row_types(W.shape[1], menu):
        enc = encode_for_plan(W, t, H, lookup, factor)
        samples.append([t, relative_error(W, enc.w_hat, None if lookup else H)])
        del enc
    return samples, {"kind": GGUF_FIT, "errors": {t: e for t, e in samples}}
