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
read once, not O(L²) times; the cost is one probe activation [P, T, D] held per probed linear
(in the checkpoint's dtype for a half-precision one: `_pack`). A linear's noise scale is taken
while its Hessian is at hand (`scale`), so the probes themselves hold no Hessian.
Streams travel in groups by the block that started them, so every forward call sees the same
rows whichever blocks a profile shard probes: a sharded profile's α equal the unsharded ones.

Cheap proxy: ShortGPT's Block Influence (Men et al. 2024, §3.1): 1 − mean cos(block input,
block output) on the clean probe stream, reported beside α with their rank correlation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compressor.checkpoint.loading import block_index
from compressor.checkpoint.stream import OnlineKL, StreamedModel
from compressor.quant.hessian import linear_weight
from compressor.quant.problem import h_inner

STREAM_BATCH = 64   # perturbed probe sequences carried through a block per forward call


@dataclass
class Sensitivity:
    alpha: dict[str, float]            # ΔKL per unit t² for each linear
    block_alpha: list[float]           # sum of α over each block's linears
    block_influence: list[float]       # ShortGPT BI per block (the cheap proxy)


def noise(shape: tuple[int, ...], seed: int, device) -> Tensor:
    """The probe's standard Gaussian draw for a linear of `shape` (CPU generator: the same
    draw on every device)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=gen).to(device, torch.float32)


def noise_scale(W: Tensor, H: Tensor, t: float, seed: int) -> float:
    """s with ‖s·N Xᵀ‖ / ‖W Xᵀ‖ = t exactly for the probe's draw N (H = XᵀX/tokens). Both
    traces row-chunked in float64 (problem.h_inner): no W-sized products, W upcast per chunk."""
    N = noise(tuple(W.shape), seed, W.device)
    Hf = H.float().to(W.device)
    w2, n2 = h_inner(W, W, Hf), h_inner(N, N, Hf)
    return t * math.sqrt(w2 / max(n2, 1e-30))


class StreamedProbes:
    """The clean probe stream and one perturbed stream per probed linear, advanced together
    block by block; `finish()` gives α per linear."""

    def __init__(self, sm: StreamedModel, probe_ids: Tensor, t: float, seed: int) -> None:
        self.sm, self.t, self.seed, self.ids = sm, t, seed, probe_ids
        self.h, _ = sm.inputs(probe_ids)
        # block that started them → (probed linears, their perturbed streams stacked [k·P, T, D])
        self.pending: dict[int, tuple[list[str], Tensor]] = {}
        self.block_influence: list[float] = []
        # a half-precision checkpoint's pending streams are held as their difference from the
        # clean stream in its dtype (half the memory; see `_pack`); float32 ones as they are
        half = sm.stored_dtype in (torch.float16, torch.bfloat16)
        self.delta_dtype = sm.stored_dtype if half and sm.dtype == torch.float32 else None
        self.scales: dict[str, float] = {}   # linear → its noise scale (`scale`)
        self.heads: dict[str, Tensor] = {}    # stream → the perturbed head it meets at the end

    def start_input(self, name: str, table: Tensor) -> None:
        """Before block 0: `name`'s stream from the probe tokens looked up in a perturbed
        embedding `table` (compressor.pipeline.vocab)."""
        h, _ = self.sm.inputs(self.ids, table)
        self.pending[-1] = ([name], self._pack(h, self.h))   # a model has one embedding

    def perturb_head(self, name: str, head: Tensor) -> None:
        """At the end, `name`'s stream (the clean one when it has none: the head alone is
        perturbed) meets the dense float32 `head` [vocab, D] instead of the checkpoint's."""
        self.heads[name] = head

    def scale(self, name: str, W: Tensor, H: Tensor) -> None:
        """Note linear `name`'s noise scale while its Hessian is at hand (the caller can then
        free H before `block` runs: the probes hold no Hessian)."""
        self.scales[name] = noise_scale(W, H, self.t, self.seed)

    @torch.no_grad()
    def block(self, j: int, blk: nn.Module, names: list[str]) -> None:
        """Carry every stream through resident block j; start the streams of `names` (each
        `scale`d before)."""
        p = len(self.h)
        batch = max(p, STREAM_BATCH // p * p)
        clean = self.sm.run(blk, self.h, batch=p)
        for origin, (probed, packed) in self.pending.items():
            out = self.sm.run(blk, self._unpack(packed, self.h), batch=batch)
            self.pending[origin] = (probed, self._pack(out, clean))
        modules = dict(blk.named_modules())
        prefix = self.sm.block_name(j) + "."
        started = []
        for name in names:
            mod = modules[name[len(prefix):]]
            W = linear_weight(mod)
            # perturbed in float32 whatever the resident weight's dtype, in its own layout
            # (Conv1D stores Wᵀ): the same values and memory order as adding in place
            # the draw `scale` measured, made again rather than kept from sampling (a W-sized
            # tensor per linear of the block held meanwhile)
            delta = noise(tuple(W.shape), self.seed, W.device).mul_(self.scales.pop(name))
            perturbed = W.to(torch.float32, copy=True).add_(delta)
            del delta
            stored = mod._parameters["weight"]
            mod._parameters["weight"] = nn.Parameter(
                perturbed.t().contiguous() if W is not mod.weight else perturbed,
                requires_grad=False)
            del perturbed
            try:
                started.append(self.sm.run(blk, self.h, batch=p))
            finally:
                mod._parameters["weight"] = stored
        if names:
            self.pending[j] = (list(names), self._pack(torch.cat(started), clean))
        self.block_influence.append(
            (1 - F.cosine_similarity(self.h.float(), clean.float(), dim=-1)).mean().item())
        self.h = clean

    def _pack(self, streams: Tensor, clean: Tensor) -> Tensor:
        """Perturbed streams [k·P, T, D] as held between blocks: themselves (float32
        checkpoints: exact), or for a half-precision checkpoint their difference from the
        clean stream [P, T, D] in its dtype. The difference is the perturbation's own size
        (t = 0.1 of one linear's output), so its rounding is ~1e-3 of the perturbation —
        far below the model's own half-precision rounding of the hidden state it rides on."""
        if self.delta_dtype is None:
            return streams
        k = len(streams) // len(clean)
        return (streams.view(k, *clean.shape) - clean).to(self.delta_dtype).view(streams.shape)

    def _unpack(self, packed: Tensor, clean: Tensor) -> Tensor:
        if self.delta_dtype is None:
            return packed
        k = len(packed) // len(clean)
        return (packed.view(k, *clean.shape).float() + clean).view(packed.shape)

    @torch.no_grad()
    def finish(self) -> dict[str, float]:
        """α = KL(clean ‖ perturbed) / t², mean over the probe positions."""
        p = len(self.h)
        names = [n for probed, _ in self.pending.values() for n in probed]
        streams = dict(zip(names, (h for _, packed in self.pending.values()
                                   for h in self._unpack(packed, self.h).split(p)), strict=True))
        plain = [n for n in names if n not in self.heads]
        kls = dict(zip(plain, kl_to_reference(self.sm, [streams[n] for n in plain], self.h)
                       if plain else [], strict=True))
        for name, head in self.heads.items():   # vocabulary probes: through their own head
            kls[name] = self.sm.head_stats(streams.get(name, self.h), ref=self.h, head=head).kl
        self.pending.clear()
        self.heads.clear()
        return {n: max(kl.mean().item(), 0.0) / self.t ** 2 for n, kl in kls.items()}


@torch.no_grad()
def kl_to_reference(sm: StreamedModel, streams: list[Tensor], ref: Tensor) -> list[Tensor]:
    """KL(ref ‖ stream_k) per position for every final hidden state stream_k [B, T, D]
    against one reference [B, T, D]: `StreamedModel.head_stats`'s arithmetic (stream.OnlineKL),
    but the head is read once for all streams and the reference's side of each chunk is folded
    once (with one stream at a time the head was read, and the reference's logits recomputed,
    per stream)."""
    xr = sm.norm(ref).float()
    shape = ref.shape[:-1]
    acc = OnlineKL(shape, ref.device, len(streams))
    lse = [torch.full(shape, -math.inf, device=ref.device) for _ in streams]
    for _, _, W, bias in sm.head_chunks():
        acc.chunk(F.linear(xr, W, bias))
        for k, h in enumerate(streams):
            m = F.linear(sm.norm(h).float(), W, bias)
            lse[k] = torch.logaddexp(lse[k], torch.logsumexp(m, -1))
            acc.fold(k, m)
    return [acc.kl(k, lse_k) for k, lse_k in enumerate(lse)]


def summarize(alpha: Mapping[str, float], block_influence: list[float]) -> Sensitivity:
    per_block = [0.0] * len(block_influence)
    for name, a in alpha.items():
        if (j := block_index(name)) is not None:   # the embedding and head are in no block
            per_block[j] += a
    return Sensitivity(dict(alpha), per_block, list(block_influence))


def _average_ranks(x) -> np.ndarray:
    """Ranks 0 … n − 1 of x, ties given their mean rank (as Spearman's ρ needs)."""
    x = np.asarray(x, dtype=float)
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="stable")] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def spearman(a, b) -> float | None:
    """Spearman's ρ: the Pearson correlation of average ranks (numpy only: importing
    scipy.stats for this cost ~0.2 s per profile)."""
    if len(a) < 3:
        return None  # undefined; None (not NaN) so the value survives JSON and SQL round trips
    ra, rb = _average_ranks(a), _average_ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    rho = float(np.corrcoef(ra, rb)[0, 1])
    return rho if math.isfinite(rho) else None


