"""Per-linear sensitivity: how much the output distribution moves per unit of relative error.

End-to-end measure (HIGGS, Malinovskii et al. 2024, §3 "linearity theorem"): for small
perturbations the KL to the original model is close to Σ_i α_i · t_i², where t_i is the
relative error ‖ΔW_i X‖ / ‖W_i X‖ of linear i. We estimate α_i by injecting Gaussian noise of a
known H-weighted relative size t into linear i alone and measuring KL on calibration sequences:
α_i = KL / t². Each probe replays only the blocks from the perturbed one onwards
(compressor.blocks), so the whole profile costs about half a forward pass per linear.

Cheap proxy: ShortGPT's Block Influence (1 − cos(block input, block output)), from the same
cached pass at no extra cost, reported beside α with their rank correlation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from compressor.blocks import BlockCache, block_influence, kl_to_ref, run_from
from compressor.hessian import linear_weight
from compressor.loading import block_index


@dataclass
class Sensitivity:
    alpha: dict[str, float]            # ΔKL per unit t² for each linear
    block_alpha: list[float]           # sum of α over each block's linears
    block_influence: list[float]       # ShortGPT BI per block (the cheap proxy)


def h_scaled_noise(W: Tensor, H: Tensor, t: float, seed: int) -> Tensor:
    """Gaussian ΔW scaled so that ‖ΔW X‖ / ‖W X‖ = t exactly (H = XᵀX/tokens)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(W.shape, generator=gen).to(W.device, torch.float32)
    Hf = H.float().to(W.device)
    w2 = ((W.float() @ Hf) * W.float()).sum()
    n2 = ((noise @ Hf) * noise).sum()
    return noise * (t * (w2 / n2.clamp_min(1e-30)).sqrt())


@torch.no_grad()
def measure_alpha(
    model: nn.Module,
    cache: BlockCache,
    hessians: Mapping[str, Tensor],
    names: list[str],
    t: float = 0.05,
    seed: int = 0,
    done: Mapping[str, float] | None = None,
    on_linear: Callable[[str, float], None] | None = None,
) -> dict[str, float]:
    """α_i for each named linear (noise injection, one linear at a time, restored after)."""
    modules = dict(model.named_modules())
    alpha = dict(done or {})
    for k, name in enumerate(names):
        if name in alpha:
            continue
        mod = modules[name]
        W = linear_weight(mod)
        delta = h_scaled_noise(W, hessians[name], t, seed + k)
        original = mod.weight.data.clone()
        # Conv1D stores the weight transposed; linear_weight is a view, so add through it.
        W.add_(delta.to(W.dtype))
        try:
            kl = kl_to_ref(run_from(model, cache, block_index(name)), cache.ref_logp)
        finally:
            mod.weight.data.copy_(original)
        alpha[name] = max(kl, 0.0) / t**2
        if on_linear:
            on_linear(name, alpha[name])
    return alpha


def summarize(alpha: Mapping[str, float], cache: BlockCache) -> Sensitivity:
    bi = block_influence(cache)
    per_block = [0.0] * len(bi)
    for name, a in alpha.items():
        per_block[block_index(name)] += a
    return Sensitivity(dict(alpha), per_block, bi)
