"""Per-linear sensitivity: how much the output distribution moves per unit of relative error.

End-to-end measure (HIGGS, Malinovskii et al. 2024, §3 "linearity theorem"): for small
perturbations the KL to the original model is close to Σ_i α_i · t_i², where t_i is the
relative error ‖ΔW_i X‖ / ‖W_i X‖ of linear i. We estimate α_i by injecting Gaussian noise of a
known H-weighted relative size t into linear i alone and measuring KL on calibration sequences:
α_i = KL / t².

Streamed (`StreamedProbes`): every block is resident once per profile. While block j is loaded,
every pending perturbed stream (one per linear probed in blocks < j) is carried through it in
batches, and block j's own linears start their streams (block j run with linear i perturbed).
After the last block each stream meets the head once, against the clean stream. So L blocks are
read once, not O(L²) times; the cost is one probe activation [P, T, D] held per probed linear.
Streams travel in groups by the block that started them, so every forward call sees the same
rows whichever blocks a profile shard probes: a sharded profile's α equal the unsharded ones.

Cheap proxy: ShortGPT's Block Influence (Men et al. 2024, §3.1): 1 − mean cos(block input,
block output) on the clean probe stream, reported beside α with their rank correlation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compressor.hessian import linear_weight
from compressor.loading import block_index
from compressor.stream import StreamedModel

STREAM_BATCH = 64   # perturbed probe sequences carried through a block per forward call


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


class StreamedProbes:
    """The clean probe stream and one perturbed stream per probed linear, advanced together
    block by block; `finish()` gives α per linear."""

    def __init__(self, sm: StreamedModel, probe_ids: Tensor, t: float, seed: int) -> None:
        self.sm, self.t, self.seed = sm, t, seed
        self.h, _ = sm.inputs(probe_ids)
        # block that started them → (probed linears, their perturbed streams stacked [k·P, T, D])
        self.pending: dict[int, tuple[list[str], Tensor]] = {}
        self.block_influence: list[float] = []

    @torch.no_grad()
    def block(self, j: int, blk: nn.Module, hessians: Mapping[str, Tensor],
              names: list[str]) -> None:
        """Carry every stream through resident block j; start the streams of `names`."""
        p = len(self.h)
        batch = max(p, STREAM_BATCH // p * p)
        for origin, (probed, stacked) in self.pending.items():
            self.pending[origin] = (probed, self.sm.run(blk, stacked, batch=batch))
        clean = self.sm.run(blk, self.h, batch=p)
        modules = dict(blk.named_modules())
        prefix = self.sm.block_name(j) + "."
        started = []
        for name in names:
            mod = modules[name[len(prefix):]]
            W = linear_weight(mod)
            delta = h_scaled_noise(W, hessians[name], self.t, self.seed)
            # perturbed in float32 whatever the resident weight's dtype, in its own layout
            # (Conv1D stores Wᵀ): the same values and memory order as adding in place
            perturbed = W.float() + delta
            stored = mod._parameters["weight"]
            mod._parameters["weight"] = nn.Parameter(
                perturbed.t().contiguous() if W is not mod.weight else perturbed,
                requires_grad=False)
            try:
                started.append(self.sm.run(blk, self.h, batch=p))
            finally:
                mod._parameters["weight"] = stored
        if names:
            self.pending[j] = (list(names), torch.cat(started))
        self.block_influence.append(
            (1 - F.cosine_similarity(self.h.float(), clean.float(), dim=-1)).mean().item())
        self.h = clean

    @torch.no_grad()
    def finish(self) -> dict[str, float]:
        """α = KL(clean ‖ perturbed) / t², mean over the probe positions."""
        p = len(self.h)
        names = [n for probed, _ in self.pending.values() for n in probed]
        streams = [h for _, stacked in self.pending.values() for h in stacked.split(p)]
        kls = kl_to_reference(self.sm, streams, self.h)
        self.pending.clear()
        return {n: max(kl.mean().item(), 0.0) / self.t ** 2
                for n, kl in zip(names, kls, strict=True)}


@torch.no_grad()
def kl_to_reference(sm: StreamedModel, streams: list[Tensor], ref: Tensor) -> list[Tensor]:
    """KL(ref ‖ stream_k) per position for every final hidden state stream_k [B, T, D]
    against one reference [B, T, D]: the arithmetic of `StreamedModel.head_stats` (online
    log-sum-exp over vocabulary chunks), but the head is read once for all streams and the
    reference's logits, running max and softmax weights are computed once per chunk (with one
    stream at a time the head was read, and the reference's logits recomputed, per stream)."""
    xr = sm.norm(ref).float()
    shape = ref.shape[:-1]
    c = torch.full(shape, -math.inf, device=ref.device)      # running max of ref logits
    z = torch.zeros(shape, device=ref.device)                 # Σ exp(r − c)
    lse_r = torch.full(shape, -math.inf, device=ref.device)
    lse = [torch.full(shape, -math.inf, device=ref.device) for _ in streams]
    s = [torch.zeros(shape, device=ref.device) for _ in streams]   # Σ exp(r − c)(r − m)
    for _, _, W, bias in sm.head_chunks():
        r = F.linear(xr, W, bias)
        lse_r = torch.logaddexp(lse_r, torch.logsumexp(r, -1))
        c_new = torch.maximum(c, r.max(-1).values)
        scale = torch.exp(c - c_new)
        e = torch.exp(r - c_new.unsqueeze(-1))
        z = z * scale + e.sum(-1)
        for k, h in enumerate(streams):
            m = F.linear(sm.norm(h).float(), W, bias)
            lse[k] = torch.logaddexp(lse[k], torch.logsumexp(m, -1))
            s[k] = s[k] * scale + (e * (r - m)).sum(-1)
        c = c_new
    return [s_k / z + lse_k - lse_r for s_k, lse_k in zip(s, lse, strict=True)]


def summarize(alpha: Mapping[str, float], block_influence: list[float]) -> Sensitivity:
    per_block = [0.0] * len(block_influence)
    for name, a in alpha.items():
        per_block[block_index(name)] += a
    return Sensitivity(dict(alpha), per_block, list(block_influence))
