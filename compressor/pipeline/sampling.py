"""One linear's error samples and the fit the planner reads, per target (targets.py): the
native target's samples and fitted E_i(b, r), or the measured table of a GGUF or
compressed-tensors menu."""

from __future__ import annotations

import json

import torch

from compressor.pipeline.ct_target import sample_ct
from compressor.pipeline.gguf_target import sample_gguf
from compressor.pipeline.profile_store import LinearProfile
from compressor.quant.decompose import decompose, q_only_many
from compressor.quant.hessian import linear_weight
from compressor.quant.problem import lowrank_error_curve, prepare
from solver.bytes import Option
from solver.ct_schemes import CT_TARGET
from solver.errormodel import fit, group_factor_samples, sample_tail


@torch.no_grad()
def sample_linear(W: torch.Tensor, H: torch.Tensor,
                  cfg) -> tuple[list, list, list, dict]:
    """Error samples [(bits, rank, t²)], the sampled spectral tail S(r) and the group-size
    factors {str(g): [[bits, κ], …]} of one linear. Every Q-only sample (each bit width at
    group_size, each group_bits at each extra group) comes from one stacked LDLQ sweep
    (`q_only_many`); the anchors are full decompositions that share its `Problem` (rotation,
    factorizations) and start from the Q-only sample at their bits — the same numbers as
    decomposing from scratch, without recomputing them."""
    m, n = W.shape
    R = cfg.max_rank(m, n)
    dcfg = cfg.decomposition
    samples: list[list[float]] = []
    tail_ranks, tail = [0], [1.0]
    problem = prepare(W, H, dcfg)
    norm = max(problem.w_norm2 ** 0.5, 1e-30)   # ‖W Xᵀ‖_F (prepare's trace, not a second one)
    q_only = q_only_many(W, H, cfg.q_only_options(), dcfg, problem)
    for b, d in zip(cfg.q_bits, q_only[:len(cfg.q_bits)], strict=True):
        samples.append([b, 0, d.rel_h_err ** 2])
        if b == cfg.tail_bits:
            curve = lowrank_error_curve(W - d.w_hat(), H) / norm
            tail_ranks, tail = sample_tail(curve.tolist(), R)
    starts = {d.option.bits: d for d in q_only[:len(cfg.q_bits)] if d.config == dcfg}
    for b, frac in cfg.anchors:
        r = max(1, round(frac * R))
        d = decompose(W, H, Option(b, r, cfg.factor_bits, cfg.group_size), dcfg,
                      problem=problem, q_start=starts.get(b))
        samples.append([b, r, d.rel_h_err ** 2])
    groups = group_factor_samples(
        cfg.group_size, cfg.group_bits, cfg.extra_groups,
        {int(b): t2 for b, r, t2 in samples if r == 0},
        [d.rel_h_err ** 2 for d in q_only[len(cfg.q_bits):]]) if cfg.extra_groups else {}
    return samples, tail_ranks, tail, groups


def sample_record(li, mod: torch.nn.Module, H: torch.Tensor, cfg) -> LinearProfile:
    """Linear `li`'s samples and fitted error model (its α still to come)."""
    W = linear_weight(mod).detach().float()
    if not torch.isfinite(W).all():
        raise ValueError(f"linear {li.name} has NaN/inf weights; cannot profile this model")
    if cfg.target in ("gguf", CT_TARGET):   # every option measured: the fit is the table
        samples, table = (sample_gguf(W, H, cfg.gguf_types, lookup=False) if cfg.target == "gguf"
                          else sample_ct(W, H, cfg.ct_bits, cfg.ct_groups, cfg.ct_ranks,
                                         cfg.max_rank(*W.shape)))
        return LinearProfile(li.name, li.block, li.out_features, li.in_features,
                             samples=samples, fit=table)
    samples, tail_ranks, tail, groups = sample_linear(W, H, cfg)
    model_fit = fit(samples, tail_ranks, tail)
    model_fit.group_factors = groups
    return LinearProfile(li.name, li.block, li.out_features, li.in_features, samples=samples,
                         fit=json.loads(json.dumps(model_fit.to_dict())))
