"""Calibration Hessians H = XᵀX / tokens per linear, streamed through forward hooks.

For a linear y = x·Wᵀ the layer-wise proxy loss of GPTQ / CALDERA is ‖(W − Ŵ)Xᵀ‖²_F =
tr(Δ H Δᵀ) with H = Σ_t x_t x_tᵀ (Frantar et al. 2022, §3; Saha et al. 2024, §3). We accumulate
H batch by batch (never holding the activations), in float64, and divide by the token count, so
H is the mean outer product: Hessians from different calibration sizes are comparable.

Damping is relative (`damp_hessian`): H + f·mean(diag H)·I, as GPTQ does. The research note's
absolute ridge λ = 1e-4 left cond(H) ≈ 7.7e11; a relative ridge bounds the condition number by
about (1 + f)/f · max(diag)/mean(diag) whatever the activations' scale.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

DEFAULT_DAMP = 0.01


class Hessians(dict[str, Tensor]):
    """name → H [in, in] (float32, mean over tokens); `tokens` is the count averaged over."""

    tokens: int = 0


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or GPT-2's Conv1D (weight stored [in, out])."""
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D"
                                             and hasattr(module, "nf"))


def linear_weight(module: nn.Module) -> Tensor:
    """The weight as [out, in] for both nn.Linear and Conv1D (a view; do not modify)."""
    if type(module).__name__ == "Conv1D":
        return module.weight.t()
    return module.weight


class HessianHooks:
    """Forward pre-hooks that accumulate Σ x xᵀ (float64) at the named linears of `root`;
    call `batch()` before each forward and `result(tokens)` at the end. Used on a whole model
    (collect_hessians) and on one resident block (compressor.checkpoint.stream).

    Linears fed the very same input tensor (q/k/v, gate/up) share one sum: the product x xᵀ is
    formed once per input (float32, as before) and added once, and `result` hands each of them
    the same H tensor (the callers never modify H in place). The sums are bit-identical to one
    float64 sum per linear; the memory is one [in, in] sum per distinct input — for a Llama
    block 4 instead of 7. A sum of one product (one calibration batch) stays float32 and is
    divided in place: float32(x / t) equals float32(float64(x) / t) for an integer t < 2²⁴,
    since float64 carries more than 2·24 + 2 bits (double rounding is innocuous for division,
    Figueroa 1995); a second product turns it into float64."""

    def __init__(self, root: nn.Module, names: Iterable[str], prefix: str = "") -> None:
        modules = dict(root.named_modules())
        self.names = list(names)
        local = {n: n[len(prefix):] if prefix else n for n in self.names}
        missing = [n for n in self.names
                   if local[n] not in modules or not is_linear(modules[local[n]])]
        if missing:
            raise KeyError(f"not linear modules of the model: {missing[:5]}")
        self.sums: dict[str, Tensor] = {}        # group leader → Σ x xᵀ
        self.leader: dict[str, str] = {}         # linear → first linear seen with its input
        self._last: dict[str, object] = {"input": None, "xtx": None, "leader": None}
        self._handles = [modules[local[n]].register_forward_pre_hook(self._hook(n))
                         for n in self.names]

    def _hook(self, name: str):
        last, sums, leader = self._last, self.sums, self.leader

        def fn(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            if last["input"] is not x:
                x2 = x.detach().reshape(-1, x.shape[-1]).float()
                last["input"], last["xtx"], last["leader"] = x, x2.T @ x2, name
            lead = leader.setdefault(name, last["leader"])
            if lead != name:
                if lead == last["leader"]:
                    return   # its group's sum already holds this product
                raise RuntimeError(f"{name} shared the input of {lead} in one forward and not "
                                   "in another; cannot share its Hessian")
            if name not in sums:
                sums[name] = last["xtx"]     # one product: kept as it is (float32)
            elif sums[name].dtype != torch.float64:
                sums[name] = sums[name].double().add_(last["xtx"])
            else:
                sums[name].add_(last["xtx"])   # float64 += float32, upcast exactly
        return fn

    def batch(self) -> None:
        self._last["input"] = self._last["xtx"] = self._last["leader"] = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.batch()

    def result(self, tokens: int) -> Hessians:
        """H = Σ x xᵀ / tokens (float32) per linear; linears of one group share the tensor."""
        self.remove()
        out = Hessians()
        done: dict[str, Tensor] = {}
        for n in self.names:
            lead = self.leader.get(n)
            if lead is None:
                raise RuntimeError(f"linear {n} saw no input during the calibration pass")
            if lead not in done:
                total = self.sums.pop(lead)
                done[lead] = symmetrize_((total / max(tokens, 1)).float()
                                         if total.dtype == torch.float64
                                         else total.div_(max(tokens, 1)))
            out[n] = done[lead]
        out.tokens = tokens
        return out


def symmetrize_(H: Tensor, block: int = 1024) -> Tensor:
    """H ← (H + Hᵀ)/2 in place, a block pair at a time: no n × n temporary (a 5632-wide H is
    127 MB). Every entry is fl(fl(h_ij + h_ji) / 2), what (H + Hᵀ)/2 gives, so the solvers'
    own symmetrising of an already symmetric H changes nothing and they need no copy."""
    n = H.shape[0]
    for a in range(0, n, block):
        for b in range(a, n, block):
            s = (H[a:a + block, b:b + block] + H[b:b + block, a:a + block].T) / 2
            H[a:a + block, b:b + block] = s
            H[b:b + block, a:a + block] = s.T
    return H


@torch.no_grad()
def collect_hessians(
    model: nn.Module,
    seqs: Tensor,
    names: Iterable[str] | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> Hessians:
    """One streamed pass of `seqs` [N, T] through `model`; H for every named linear (default:
    every nn.Linear / Conv1D except the head)."""
    modules = dict(model.named_modules())
    if names is None:
        names = [n for n, m in modules.items() if is_linear(m) and not n.endswith("lm_head")]
    if device is None:
        device = next(model.parameters()).device
    hooks = HessianHooks(model, names)
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(seqs), batch_size):
            batch = seqs[i:i + batch_size].to(device)
            hooks.batch()
            model(input_ids=batch, use_cache=False)
            tokens += batch.numel()
    finally:
        hooks.remove()
        model.train(was_training)
    out = hooks.result(tokens)
    log.info("collected %d Hessians over %d tokens", len(out), tokens)
    return out


def damp_hessian(H: Tensor, frac: float = DEFAULT_DAMP) -> Tensor:
    """H + frac·mean(diag H)·I (a new tensor). An all-zero H (dead input) becomes I so the
    result is always positive definite."""
    if frac < 0:
        raise ValueError(f"damping fraction must be >= 0, got {frac}")
    mean_diag = H.diagonal().mean()
    lam = frac * mean_diag if mean_diag > 0 else torch.ones((), dtype=H.dtype, device=H.device)
    out = H.clone()
    out.diagonal().add_(lam)
    return out


def cond(H: Tensor) -> float:
    """Condition number of a symmetric PSD matrix from its eigenvalues (float64)."""
    ev = torch.linalg.eigvalsh(H.double())
    lo = ev[0].clamp_min(0).item()
    return float("inf") if lo == 0 else ev[-1].item() / lo
