"""The vocabulary tensors in the plan: the token embedding, the LM head, or one tensor tied as
both ([vocab, hidden] each). They are profiled, planned and compressed like the blocks' linears,
with three differences:

- Rounding. An embedding is a lookup: rows are read, never multiplied by an activation, so it
  has no input Hessian, and its rows must not be mixed (a lookup reads one row) — round to
  nearest, no Hadamard rotation, error ‖ΔW‖_F / ‖W‖_F (H = I). A tied tensor is rounded the
  same way (it is looked up too). An untied head is a linear like the blocks' ones: its
  Hessian comes from the final hidden states after the final norm, what the head reads.
- Sensitivity: the noise probe of sensitivity.py, drawn over the whole table. The embedding's
  stream starts at block 0's input (the probe's tokens looked up in the perturbed table); a
  tied tensor's stream meets the perturbed head too; a head's probe is the clean final stream
  through the perturbed head.
- Menu: Q alone (rank 0): an L·R correction would make a lookup a matmul.
- The GGUF target (gguf_target.py) with Fisher α rounds a tied tensor as the head it also is:
  under the head's Hessian (the normed final states), its α's ratio under the same H
  (`head_reads`). Its head columns' importance is very uneven (one column of SmolLM2's is 1357×
  the median): rounded as a lookup, KLD in llama.cpp was 0.0166 where this gives 0.0060.
The sweep that holds the last block profiles them (it has the final hidden states and carries
every stream from block 0 anyway), so a sharded profile gets them exactly once.
"""

from __future__ import annotations

import json
from dataclasses import replace

import torch
from torch import Tensor

from compressor.checkpoint.headers import LinearInfo
from compressor.checkpoint.stream import StreamedModel
from compressor.pipeline.fisher import FisherProbes
from compressor.pipeline.gguf_target import sample_gguf
from compressor.pipeline.profile_store import LinearProfile
from compressor.pipeline.sensitivity import StreamedProbes, noise, noise_scale
from compressor.quant.decompose import q_only_many
from compressor.quant.decomposed import DecompositionConfig, Rounding
from solver.errormodel import fit, group_factor_samples


def vocab_config(config: DecompositionConfig, kind: str) -> DecompositionConfig:
    """The config a vocabulary tensor of `kind` is rounded with (module docstring)."""
    if kind == "head":
        return config
    return replace(config, hadamard=False, q_rounding=Rounding.RTN)


def check_vocab_option(name: str, kind: str, option) -> None:
    """A lookup takes Q alone: an embedding (or tied) option with a rank is refused."""
    if kind in ("embedding", "tied") and option.rank:
        raise ValueError(f"{name} is an embedding: it is stored as Q alone (rank 0), "
                         f"got rank {option.rank}")


def head_reads(cfg) -> tuple[str, ...]:
    """The vocabulary kinds rounded, sampled and scaled under the head's Hessian: an untied
    head always; a tied tensor too for a GGUF profile with Fisher α (module docstring)."""
    gguf = (getattr(cfg, "target", "native") == "gguf" and cfg.sensitivity == "fisher"
            and cfg.gguf_tied == "head")
    return ("head", "tied") if gguf else ("head",)


def vocab_hessian(sm: StreamedModel, li: LinearInfo, final: Tensor | None,
                  kinds: tuple[str, ...] = ("head",)) -> Tensor:
    """H of a vocabulary item: the identity for a lookup, XᵀX / tokens of the normed final
    hidden states `final` [N, T, D] for an untied head (and the `kinds` read as one)."""
    if li.kind not in kinds:
        return torch.eye(li.in_features, device=sm.device)
    H = torch.zeros(li.in_features, li.in_features, dtype=torch.float64, device=sm.device)
    for i in range(0, len(final), 8):
        x = sm.norm(final[i:i + 8]).double().reshape(-1, li.in_features)
        H += x.T @ x
    return (H / (final.shape[0] * final.shape[1])).float()


@torch.no_grad()
def sample_vocab(li: LinearInfo, W: Tensor, H: Tensor, cfg) -> LinearProfile:
    """Q-only error samples of one vocabulary tensor at every profiled bit width and group
    size (one stacked sweep), and the error model fitted to them (no rank: S(r) = 1)."""
    if not torch.isfinite(W).all():
        raise ValueError(f"{li.name} has NaN/inf weights; cannot profile this model")
    if cfg.target == "gguf":   # every GGUF type its rows fit (gguf_target.py)
        samples, gguf_fit = sample_gguf(W, H, cfg.gguf_types,
                                        lookup=li.kind not in head_reads(cfg))
        return LinearProfile(li.name, None, li.out_features, li.in_features, samples=samples,
                             fit=gguf_fit)
    options = cfg.q_only_options()
    q_only = q_only_many(W, H, options, vocab_config(cfg.decomposition, li.kind))
    n = len(cfg.q_bits)   # q_only_options: q_bits at group_size first, then the extra groups
    samples = [[o.bits, 0, d.rel_h_err ** 2] for o, d in zip(options[:n], q_only[:n],
                                                             strict=True)]
    model = fit(samples, [0], [1.0])
    if cfg.extra_groups:
        model.group_factors = group_factor_samples(
            cfg.group_size, cfg.group_bits, cfg.extra_groups,
            {int(b): t2 for b, _, t2 in samples}, [d.rel_h_err ** 2 for d in q_only[n:]])
    return LinearProfile(li.name, None, li.out_features, li.in_features, samples=samples,
                         fit=json.loads(json.dumps(model.to_dict())))


def perturbed_table(W: Tensor, H: Tensor, t: float, seed: int) -> Tensor:
    """W plus the probe's draw scaled to relative size t under H (sensitivity.noise_scale)."""
    scale = noise_scale(W, H, t, seed)
    return noise(tuple(W.shape), seed, W.device).mul_(scale).add_(W)


def start_vocab_probes(sm: StreamedModel, probes: StreamedProbes | FisherProbes,
                       items: list[LinearInfo], t: float, seed: int,
                       kinds: tuple[str, ...] = ("head",)) -> None:
    """Before block 0: the embedding's (or tied tensor's) perturbed stream; a tied tensor's
    perturbed head is noted for the end. Lookups are scaled against H = I. Fisher probes
    (fisher.py) only note the lookup's weight ratio."""
    for li in items:
        if li.kind in kinds:          # scaled under the head's H, after the last block
            continue
        if li.kind in ("embedding", "tied") and isinstance(probes, FisherProbes):
            probes.vocab(li.name, li.kind, sm.vocab_weight(li.name), None)   # H = I
        elif li.kind in ("embedding", "tied"):
            W = sm.vocab_weight(li.name)
            table = perturbed_table(W, torch.eye(li.in_features, device=W.device), t, seed)
            del W
            probes.start_input(li.name, table)
            if li.kind == "tied":
                probes.perturb_head(li.name, table)
            del table


def finish_head_probe(sm: StreamedModel, probes: StreamedProbes | FisherProbes,
                      li: LinearInfo, H: Tensor, t: float, seed: int) -> None:
    """After the last block: an untied head's probe (its noise scaled against its H); a tied
    tensor read as the head notes its ratio under that H."""
    if isinstance(probes, FisherProbes):
        probes.vocab(li.name, li.kind, sm.vocab_weight(li.name), H)
        return
    probes.perturb_head(li.name, perturbed_table(sm.vocab_weight(li.name), H, t, seed))


@torch.no_grad()
def sample_vocab_items(sm: StreamedModel, probes: StreamedProbes | FisherProbes,
                       items: list[LinearInfo], final: Tensor, cfg, partial: dict, put) -> None:
    """After the last block (`final`: the calibration's final hidden states): sample every
    vocabulary item not yet in `partial` (each handed to `put` as it is done) and start an
    untied head's probe."""
    kinds = head_reads(cfg)
    for li in items:
        H = vocab_hessian(sm, li, final, kinds)
        if li.name not in partial:
            partial[li.name] = sample_vocab(li, sm.vocab_weight(li.name), H, cfg)
            put(partial[li.name])
        if li.kind in kinds:
            finish_head_probe(sm, probes, li, H, cfg.probe_t, cfg.seed)
