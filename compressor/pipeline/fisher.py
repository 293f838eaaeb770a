"""Per-linear sensitivity α_i from the Fisher information, streamed: the second-order limit of
sensitivity.py's noise probe, at the cost of one backward pass instead of one forward stream
per linear carried through every later block.

Math. For a small perturbation Δ of the weights, KL(p ‖ p_Δ) ≈ ½ vec(Δ)ᵀ F vec(Δ), F the
Fisher information of the model's own output distribution (averaged over positions). The
probe's perturbation is isotropic noise Δ = s·N (N standard Gaussian, m × n) at relative size
t² = s² tr(N H Nᵀ) / tr(W H Wᵀ), so in expectation over N, KL ≈ ½ s² tr F and t² ≈ s² m tr H /
tr(W H Wᵀ), giving

    α_i = KL / t² = ½ tr(F_i) · tr(W_i H_i W_iᵀ) / (m_i · tr H_i).

tr F_i is estimated without per-position backward passes: draw labels y_t ~ p(· | x_<t) at
every position (K draws), G = ∇_W Σ_t log p(y_t | x_<t). Positions are independent given the
input and each score has mean zero, so E ‖G‖² = Σ_t E ‖g_t‖² (the cross terms vanish):
tr F = E ‖G‖² / positions, one backward per sequence and draw for every linear at once (the
"empirical Fisher with sampled labels" of Kunstner et al. 2019, §3, on a teacher-forced input).
For a linear y = x Wᵀ, G = Σ_t gy_t x_tᵀ and ‖G‖²_F = Σ_{t,t'} (gy_t·gy_t')(x_t·x_t') — two
T × T Gram matrices instead of an m × n gradient per sequence.

Streamed like the probes: the forward sweep keeps each block's probe input (P sequences);
`finish` samples labels at the head, then reads the blocks again last to first, recomputes
each block's forward with autograd on the kept input and carries the gradient down. A lookup
(embedding, tied tensor) has H = I and its gradient is a scatter of the embedding output's
gradient into the looked-up rows (plus, when tied, the head's gradient of the same tensor).
The clean stream also gives ShortGPT's Block Influence, as in sensitivity.py.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compressor.checkpoint.loading import block_index
from compressor.checkpoint.stream import StreamedModel
from compressor.pipeline.sensitivity import StreamedProbes
from compressor.quant.problem import h_inner

GRAD_BATCH = 8   # probe sequences recomputed with autograd per block call


def make_probes(sm: StreamedModel, calib: Tensor, cfg,
                report=None) -> FisherProbes | StreamedProbes:
    """The sensitivity estimator a ProfileConfig names, on its first calibration sequences
    (`report(stage, fraction)`: the Fisher backward sweep's progress)."""
    if cfg.sensitivity == "fisher":
        return FisherProbes(sm, calib[: cfg.fisher_seqs], cfg.fisher_samples, cfg.seed, report)
    return StreamedProbes(sm, calib[: cfg.probe_seqs], cfg.probe_t, cfg.seed)


class FisherProbes:
    """The protocol of sensitivity.StreamedProbes (`scale`, `block`, `finish`, `pending`,
    `block_influence`) with α from the Fisher trace; vocabulary items join through `vocab`."""

    def __init__(self, sm: StreamedModel, probe_ids: Tensor, samples: int, seed: int,
                 report=None) -> None:
        self.sm, self.ids, self.samples, self.seed = sm, probe_ids, samples, seed
        self.report = report or (lambda stage, frac: None)
        self.h, _ = sm.inputs(probe_ids)
        self.inputs: dict[int, Tensor] = {}          # block → its clean input, kept for finish
        self.keep = torch.float32 if sm.stored_dtype == torch.float32 else sm.stored_dtype
        self.block_influence: list[float] = []
        self.ratio: dict[str, float] = {}             # linear → tr(W H Wᵀ) / (m · tr H)
        self.by_block: dict[int, list[str]] = defaultdict(list)
        self.vocab_kind: dict[str, str] = {}          # vocabulary item → embedding/head/tied

    @property
    def pending(self) -> bool:
        """Whether anything was probed (the clean stream must then reach the head)."""
        return bool(self.ratio)

    def scale(self, name: str, W: Tensor, H: Tensor) -> None:
        """Note linear `name`'s tr(W H Wᵀ) / (m tr H) while its Hessian is at hand."""
        self.ratio[name] = _ratio(W, H)
        self.by_block[block_index(name)].append(name)

    def vocab(self, name: str, kind: str, W: Tensor, H: Tensor | None) -> None:
        """A vocabulary item of `kind`: its ratio under its H (None: a lookup's H = I)."""
        self.ratio[name] = _ratio(W, H)
        self.vocab_kind[name] = kind

    @torch.no_grad()
    def block(self, j: int, blk: nn.Module, names: list[str]) -> None:
        """Advance the clean stream through resident block j, keeping its input when anything
        at or before j is probed (`names` were `scale`d before)."""
        if self.ratio:
            self.inputs[j] = self.h.to(self.keep)
        clean = self.sm.run(blk, self.h, batch=len(self.h))
        self.block_influence.append(
            (1 - F.cosine_similarity(self.h.float(), clean.float(), dim=-1)).mean().item())
        self.h = clean

    def finish(self) -> dict[str, float]:
        """α per probed linear and vocabulary item (module docstring)."""
        if not self.ratio:
            return {}
        sq: dict[str, float] = defaultdict(float)    # Σ over sequences and draws of ‖G‖²
        grads, head = self._head(sq)
        lookups = [n for n, k in self.vocab_kind.items() if k in ("embedding", "tied")]
        # back to the first probed block (block 0 when a lookup is probed); none when only an
        # untied head is (its ‖G‖² is the head's alone)
        first = 0 if lookups else min(self.by_block, default=self.sm.num_blocks)
        L = self.sm.num_blocks
        for j in range(L - 1, first - 1, -1):
            grads = self._backward_block(j, grads, sq)
            # the profile's last 5 %: its blocks' sweep reports up to 0.95
            self.report(f"sensitivity block {j + 1}", 0.95 + 0.05 * (L - j) / max(L - first, 1))
        for name in lookups:
            self._lookup(name, grads, head if self.vocab_kind[name] == "tied" else None, sq)
        positions = self.samples * self.ids.numel()
        self.inputs.clear()
        return {n: 0.5 * sq[n] / positions * r for n, r in self.ratio.items()}

    # -- the head: labels drawn from the model, the gradient at the final hidden states ---------
    def _head(self, sq: dict) -> tuple[list[Tensor], list[dict]]:
        """Per draw k the gradient of Σ_t log p(y_t) w.r.t. the final hidden states [P, T, D];
        the untied head's ‖G‖² into `sq`; per sequence what a tied tensor's cross term needs."""
        sm, K = self.sm, self.samples
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        heads = [n for n, k in self.vocab_kind.items() if k in ("head", "tied")]
        grads = [torch.empty(self.h.shape, dtype=torch.float32, device=self.h.device)
                 for _ in range(K)]
        kept: list[dict] = []
        for s in range(len(self.h)):
            with torch.enable_grad():
                h = self.h[s:s + 1].float().requires_grad_()
                x = sm.norm(h).float()[0]                   # [T, D]
            xd = x.detach()
            T = xd.shape[0]
            lse = torch.full((T,), -math.inf, device=xd.device)
            best = torch.full((K, T), -math.inf, device=xd.device)
            y = torch.zeros((K, T), dtype=torch.long, device=xd.device)
            for a, b, W, bias in sm.head_chunks():         # pass 1: normalizer, Gumbel-max draws
                m = F.linear(xd, W, bias)
                lse = torch.logaddexp(lse, torch.logsumexp(m, -1))
                u = torch.rand((K, T, b - a), generator=gen).to(xd.device).clamp_(1e-20, 1.0)
                z = m.unsqueeze(0) - torch.log(-torch.log(u))
                zmax, zarg = z.max(-1)
                upd = zmax > best
                best, y = torch.where(upd, zmax, best), torch.where(upd, zarg + a, y)
            pW = torch.zeros_like(xd)
            pp = torch.zeros((T, T), device=xd.device)
            Wy = torch.zeros((K, T, xd.shape[1]), device=xd.device)
            Py = torch.zeros((K, T, T), device=xd.device)   # Py[k, t', t] = p_t'(y_k,t)
            ids = self.ids[s].to(xd.device)
            Px = torch.zeros((T, T), device=xd.device)      # Px[t', t] = p_t'(x_t)
            for a, b, W, bias in sm.head_chunks():         # pass 2: p against the draws
                p = torch.exp(F.linear(xd, W, bias) - lse[:, None])
                pW += p @ W
                pp += p @ p.T
                for k in range(K):
                    inside = (y[k] >= a) & (y[k] < b)
                    cols = (y[k][inside] - a)
                    Wy[k][inside] = W[cols]
                    Py[k][:, inside] = p[:, cols]
                inside = (ids >= a) & (ids < b)
                Px[:, inside] = p[:, ids[inside] - a]
            xx = xd @ xd.T
            for k in range(K):
                gx = Wy[k] - pW                              # ∂/∂x_t Σ log p(y_t)
                (gh,) = torch.autograd.grad(x, h, gx, retain_graph=k < K - 1)
                grads[k][s] = gh[0]
                if heads:   # gy_t = e_{y_t} − p_t: (gy gyᵀ)_{tt'} from draws and p alone
                    eq = (y[k][:, None] == y[k][None, :]).float()
                    gg = eq - Py[k] - Py[k].T + pp
                    for name in heads:
                        sq[name] += float((gg * xx).sum())
            kept.append({"x": xd, "cross": [(y[k][:, None] == ids[None, :]).float() - Px
                                             for k in range(K)]})
        return grads, kept

    # -- the blocks, last to first ------------------------------------------------------------
    def _backward_block(self, j: int, grads: list[Tensor], sq: dict) -> list[Tensor]:
        """Recompute block j's forward on its kept input with autograd, add its probed
        linears' ‖G‖² per sequence and draw, and return the gradients at its input."""
        sm = self.sm
        names = self.by_block.get(j, [])
        out_grads = [torch.empty_like(g) for g in grads]
        with sm.block(j) as blk:
            prefix = sm.block_name(j) + "."
            stats: dict[str, list] = {}
            hooks = [blk.get_submodule(n[len(prefix):]).register_forward_hook(
                _gram_hook(n, stats)) for n in names]
            try:
                h_all = self.inputs.get(j)
                for i in range(0, len(h_all), GRAD_BATCH):
                    with torch.enable_grad():
                        h = h_all[i:i + GRAD_BATCH].float().requires_grad_()
                        res = blk(h, **sm.kwargs_for(len(h), h.shape[1]))
                        out = res[0] if isinstance(res, tuple) else res
                    for k, g in enumerate(grads):
                        for n in names:
                            stats[n][1] = k
                        (gh,) = torch.autograd.grad(out, h, g[i:i + GRAD_BATCH],
                                                    retain_graph=k < len(grads) - 1)
                        out_grads[k][i:i + GRAD_BATCH] = gh
                    for n in names:
                        sq[n] += stats[n][2]
                        stats[n][2] = 0.0
            finally:
                for hk in hooks:
                    hk.remove()
        return out_grads

    # -- lookups --------------------------------------------------------------------------------
    def _lookup(self, name: str, grads: list[Tensor], head: list[dict] | None,
                sq: dict) -> None:
        """‖G‖² of a looked-up table: the gradient at the embedding output scattered into its
        rows (Σ_{t,t'} [x_t = x_t'] g_t·g_t'); for a tied tensor also the head's share and
        twice the cross term Σ_{t,t'} (g_t·x̂_t') ([y_t' = x_t] − p_t'(x_t))."""
        sm = self.sm
        for s in range(len(self.ids)):
            ids = self.ids[s:s + 1]
            with torch.enable_grad():
                emb = sm.embed(ids).float().requires_grad_()
                h0, _ = sm.inputs(ids, embeds=emb)
            same = (ids[0][:, None] == ids[0][None, :]).float().to(emb.device)
            for k, g in enumerate(grads):
                (ge,) = torch.autograd.grad(h0, emb, g[s:s + 1].to(h0.dtype),
                                            retain_graph=k < len(grads) - 1)
                ge = ge[0].float()
                sq[name] += float((same * (ge @ ge.T)).sum())
                if head is not None:
                    M = ge @ head[s]["x"].T                  # [t (lookup), t' (head)]
                    sq[name] += 2 * float((M * head[s]["cross"][k].T).sum())


def _ratio(W: Tensor, H: Tensor | None) -> float:
    """tr(W H Wᵀ) / (m · tr H): α's weight factor (module docstring); H = None means I, where it
    is the mean squared weight (no [n, n] identity, no matmul: an embedding is 49152 rows)."""
    if H is None:
        return float(W.float().pow(2).mean())
    Hf = H.float().to(W.device)
    return h_inner(W, W, Hf) / max(W.shape[0] * float(Hf.diagonal().sum()), 1e-30)


def _gram_hook(name: str, stats: dict):
    """Forward hook of a linear: ‖G‖²_F = Σ_b Σ_{t,t'} (gy gyᵀ ⊙ x xᵀ)_{tt'} per sequence b,
    added when the gradient of its output arrives (once per draw)."""
    stats[name] = [None, 0, 0.0]      # x xᵀ of the current batch, draw index, accumulated ‖G‖²

    def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
        x = args[0].detach().float()
        stats[name][0] = x @ x.transpose(-1, -2)        # [B, T, T]
        y = out[0] if isinstance(out, tuple) else out

        def on_grad(gy: Tensor) -> None:
            gy = gy.detach().float()
            stats[name][2] += float((stats[name][0] * (gy @ gy.transpose(-1, -2))).sum())

        y.register_hook(on_grad)

    return hook
