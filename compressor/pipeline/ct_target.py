"""The compressed-tensors target (vLLM): a linear's options are pack-quantized schemes W{b}A16
with groups of 32/64/128 (those that divide its rows), each optionally with an fp16 LoRA
adapter of a vLLM rank (solver.ct_schemes). Like the GGUF target, every option is measured,
not modelled: one stacked GPTQ sweep rounds the linear at every scheme
(compressor.quant.ct_int), and the H-weighted spectrum of each scheme's residual gives the
error after the best rank-r LoRA for every rank at once (Eckart–Young:
quant.problem.lowrank_error_curve). The fit record is the table
{"kind": "ct", "errors": {label: t²}} with t² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ).

The embedding and head are not in the menu: vLLM serves compressed-tensors embeddings and
heads dense, so they stay in the model's dtype, counted in the fixed bytes (targets.fixed_bytes).
Modules vLLM fuses (q/k/v, gate/up) are tied in the solver (planning.fused_ties).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from compressor.pipeline.planning import CT_FIT
from compressor.quant.ct_int import dequantize_ct, round_ct_many
from compressor.quant.gguf_blocks import hessian_factor
from compressor.quant.problem import h_sq, lowrank_error_curve
from solver.bytes import ct_dense, ct_option
from solver.ct_schemes import CT_BITS, CT_GROUPS, LORA_RANKS, fits_cols

CT_RANKS: tuple[int, ...] = LORA_RANKS[:-1]   # 8 … 256: 512 exceeds half of most widths
_STACK = 6                # schemes per stacked sweep (memory: _STACK · rows · cols floats)


def schemes_for(cols: int, bits: Sequence[int] = CT_BITS,
                groups: Sequence[int] = CT_GROUPS) -> list[tuple[int, int]]:
    """The (bits, group) a row of `cols` inputs can be stored in (vLLM: cols % group == 0);
    none when no group divides it (the linear is then kept dense: ct_schemes.DENSE)."""
    return [(b, g) for g in groups if fits_cols(g, cols) for b in bits]


@torch.no_grad()
def sample_ct(W: Tensor, H: Tensor, bits: Sequence[int], groups: Sequence[int],
              ranks: Sequence[int], max_rank: int) -> tuple[list[list], dict]:
    """Samples [[label, t²], …] of every scheme that fits W's rows, each alone and with every
    LoRA rank of `ranks` up to `max_rank`, and the fit record the planner reads (the dense
    option alone, error 0, when no scheme fits)."""
    W = W.detach().float().cpu()
    schemes = schemes_for(W.shape[1], bits, groups)
    norm2 = max(h_sq(W, H), 1e-30)
    factor = hessian_factor(H)
    samples: list[list] = [] if schemes else [[ct_dense().label, 0.0]]
    for k in range(0, len(schemes), _STACK):
        part = schemes[k:k + _STACK]
        for (b, g), (codes, scale) in zip(part, round_ct_many(W, H, part, factor), strict=True):
            E = W - dequantize_ct(codes, scale, b).float()
            curve = lowrank_error_curve(E, H).square() / norm2     # t² after rank r, every r
            samples.append([ct_option(b, g).label, float(curve[0])])
            samples += [[ct_option(b, g, r).label, float(curve[r])]
                        for r in ranks if r <= max_rank]
            del E, codes, scale
    return samples, {"kind": CT_FIT, "errors": {label: t2 for label, t2 in samples}}
