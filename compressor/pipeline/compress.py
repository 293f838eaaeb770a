"""Compress a loaded model's linears as a plan assigns them: orchestration beside the math.

Hessians come from the *original* model's calibration activations in one streamed pass, taken
before any linear is replaced (the CALDERA setting: every layer is fitted to the activations of
the uncompressed model, so the layers are independent and a job can resume at any of them).
Each finished linear is swapped in and reported through `on_linear`. The embedding and head
are planned items too (compressor.pipeline.vocab: a lookup's H is the identity).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from compressor.checkpoint.loading import vocab_modules
from compressor.pipeline.vocab import check_vocab_option, vocab_config
from compressor.quant.decompose import decompose
from compressor.quant.decomposed import Decomposed, DecompositionConfig
from compressor.quant.hessian import collect_hessians, linear_weight
from compressor.runtime.modules import replace_linear, replace_vocab
from solver.bytes import Option

log = logging.getLogger(__name__)


@torch.no_grad()
def calibration_hessians(model: nn.Module, calib: Tensor, names: list[str],
                         batch_size: int = 8) -> dict[str, Tensor]:
    """H = XᵀX / tokens per named linear (the head's from its input, the normed final hidden
    states) over the calibration ids `calib`; an embedding is a lookup: H = I (vocab.py)."""
    lookups = {li.name: li for li in vocab_modules(model) if li.kind in ("embedding", "tied")}
    out = {n: torch.eye(lookups[n].in_features) for n in names if n in lookups}
    rest = [n for n in names if n not in lookups]
    if rest:
        fresh = collect_hessians(model, calib, rest, batch_size=batch_size)
        log.info("calibration Hessians for %d linears over %d tokens", len(fresh), fresh.tokens)
        out |= fresh
    return out


@torch.no_grad()
def compress_model(
    model: nn.Module,
    assignments: Mapping[str, Option],
    calib: Tensor,
    config: DecompositionConfig | None = None,
    hessians: Mapping[str, Tensor] | None = None,
    on_linear: Callable[[str, Decomposed], None] | None = None,
    skip: set[str] | frozenset[str] = frozenset(),
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> dict[str, Decomposed]:
    """Decompose every assigned linear (except `skip`: e.g. already done by a resumed job) and
    replace it in `model`, in place. `calib` [N, T] token ids feed the Hessians unless
    `hessians` (name → H, undamped) are given. `device` is where the math runs (default: the
    model's device; the model itself is not moved). Returns name → Decomposed."""
    config = config or DecompositionConfig()
    todo = [n for n in assignments if n not in skip]
    if not todo:
        return {}
    modules = dict(model.named_modules())
    unknown = [n for n in todo if n not in modules]
    if unknown:
        raise KeyError(f"assignments name modules the model does not have: {unknown[:5]}")
    model_device = next(model.parameters()).device
    device = torch.device(device) if device is not None else model_device
    vocab = {li.name: li.kind for li in vocab_modules(model)}
    for name in todo:
        check_vocab_option(name, vocab.get(name, "linear"), assignments[name])
    hessians = dict(hessians or {})
    missing = [n for n in todo if n not in hessians]
    if missing:
        hessians |= calibration_hessians(model, calib, missing, batch_size)
    out: dict[str, Decomposed] = {}
    for i, name in enumerate(todo):
        t0 = time.perf_counter()
        kind = vocab.get(name)
        W = (modules[name].weight if kind else linear_weight(modules[name])).detach().to(
            device=device, dtype=torch.float32)
        dec = decompose(W, hessians[name].to(device), assignments[name],
                        vocab_config(config, kind) if kind else config)
        if kind:
            replace_vocab(model, name, kind, dec)
        else:
            replace_linear(model, name, dec)
        out[name] = dec
        log.info("[%d/%d] %s %s: rel_h_err %.4f (Q only %.4f), %d bytes, %.2fs", i + 1,
                 len(todo), name, assignments[name], dec.rel_h_err, dec.q_only_rel_h_err,
                 dec.nbytes, time.perf_counter() - t0)
        if on_linear is not None:
            on_linear(name, dec)
    return out
