"""`bitplan bench quant`: Q-only vs CALDERA Q + L·R on the demo model's linears.

The blocks' linears only: the token embedding and the LM head are planned Q alone (rank 0, a
lookup has no L·R; compressor.pipeline.vocab), so a rank sweep says nothing about them.

For b_Q ∈ {2, 3, 4} at a fixed rank: mean relative output error ‖(W − Ŵ)Xᵀ‖/‖WXᵀ‖ of Q alone
(the decomposition's rank-0 start, same rounding) and of Q + L·R, their plain Frobenius
counterparts, and the mean per-linear output cosine; plus the wall time of one decomposition as
a ratio to one full SVD of the same matrix, both timed in this run on this device. The research
note's Qwen2-1.5B figures (59/9/1.7% Q-only, 38/6.5/1.2% Q + L·R at r = 64) are quoted beside
them for comparison; they are Frobenius-style reconstruction errors on a much larger model.

`gram_lplr`: the same sweep with `DecompositionConfig(gram_lplr=True)` (LPLR from the Gram
matrix and trace errors instead of the residual's SVD and [m, n]-wide error products): its mean
errors, their relative change against the default, and the timed linear's decomposition time as
a speedup over the default's, both timed in this run.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from compressor.checkpoint.data import Split, token_sequences
from compressor.checkpoint.loading import discover, load_model, load_tokenizer
from compressor.quant.decompose import decompose
from compressor.quant.decomposed import DecompositionConfig
from compressor.quant.hessian import collect_hessians, linear_weight
from service.settings import DEMO_MODEL, get_settings
from solver.bytes import Option

log = logging.getLogger(__name__)

BITS = (2, 3, 4)
DEFAULT_RANK = 16
RESEARCH_NOTE = {"model": "Qwen2-1.5B", "rank": 64,
                 "q_only_rel_err": {"2": 0.59, "3": 0.09, "4": 0.017},
                 "caldera_rel_err": {"2": 0.38, "3": 0.065, "4": 0.012}}


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(args) -> dict:
    settings = get_settings()
    model_ref = Path(getattr(args, "model", None) or DEMO_MODEL)
    device = getattr(args, "device", None) or settings.device
    rank = int(getattr(args, "rank", None) or DEFAULT_RANK)
    factor_bits, group_size = 4, 128
    config = DecompositionConfig()
    quick = bool(getattr(args, "quick", False))   # smoke size: 3 linears, less calibration
    if not model_ref.exists():
        return {"error": f"model not found at {model_ref}; train it with `bitplan train-demo`"}
    model = load_model(model_ref, device=device)
    tokenizer = load_tokenizer(model_ref)
    calib = token_sequences(tokenizer, Split.TRAIN, 128 if quick else 256,
                            n_seqs=8 if quick else 32, seed=0)
    linears = [li for li in discover(model).linears if not li.is_vocab]   # module docstring
    if quick:
        linears = linears[:3]
    t0 = time.perf_counter()
    hessians = collect_hessians(model, calib, [li.name for li in linears], batch_size=8)
    hessian_s = time.perf_counter() - t0
    modules = dict(model.named_modules())
    weights = {li.name: linear_weight(modules[li.name]).detach().float() for li in linears}

    per_bits: dict[str, dict] = {}
    t0 = time.perf_counter()
    for b in BITS:
        rows = []
        for li in linears:
            d = decompose(weights[li.name], hessians[li.name], Option(b, rank, factor_bits,
                                                                       group_size), config)
            rows.append(d)
        n = len(rows)
        per_bits[str(b)] = {
            "q_only_rel_err": sum(d.q_only_rel_h_err for d in rows) / n,
            "caldera_rel_err": sum(d.rel_h_err for d in rows) / n,
            "cosine": sum(d.output_cosine for d in rows) / n,
            "q_only_rel_fro_err": sum(d.q_only_rel_fro_err for d in rows) / n,
            "caldera_rel_fro_err": sum(d.rel_fro_err for d in rows) / n,
            "min_cosine": min(d.output_cosine for d in rows),
        }
        log.info("b=%d: %s", b, per_bits[str(b)])
    sweep_s = time.perf_counter() - t0
    gram = replace(config, gram_lplr=True)
    gram_bits = {}
    for b in BITS:
        errs = [decompose(weights[li.name], hessians[li.name],
                          Option(b, rank, factor_bits, group_size), gram).rel_h_err
                for li in linears]
        mean = sum(errs) / len(errs)
        base = per_bits[str(b)]["caldera_rel_err"]
        gram_bits[str(b)] = {"caldera_rel_err": mean, "rel_change": (mean - base) / base}

    # Timing: the largest linear, one decomposition vs one full SVD, medians, same run/device.
    big = max(linears, key=lambda li: li.numel)
    W, H = weights[big.name], hessians[big.name]
    opt = Option(3, rank, factor_bits, group_size)
    decompose(W, H, opt, config)                              # warm-up
    torch.linalg.svd(W, full_matrices=False)
    t_dec = _median_time(lambda: decompose(W, H, opt, config), reps=1 if quick else 3)
    t_svd = _median_time(lambda: torch.linalg.svd(W, full_matrices=False), reps=1 if quick else 5)
    t_gram = _median_time(lambda: decompose(W, H, opt, gram), reps=1 if quick else 3)
    return {
        "rank": rank,
        "bits": per_bits,
        "decompose_over_svd_time": t_dec / t_svd,
        "timed_linear": {"name": big.name, "shape": [big.out_features, big.in_features],
                         "decompose_s": t_dec, "svd_s": t_svd, "option": opt.to_dict()},
        "gram_lplr": {"bits": gram_bits, "decompose_s": t_gram, "speedup": t_dec / t_gram,
                      "config": gram.to_dict()},
        "factor_bits": factor_bits,
        "group_size": group_size,
        "config": config.to_dict(),
        "n_linears": len(linears),
        "calib_tokens": hessians.tokens,
        "hessian_s": hessian_s,
        "sweep_s": sweep_s,
        "model": str(model_ref),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "error_metric": "rel_err = ‖(W−Ŵ)Xᵀ‖/‖WXᵀ‖ over calibration activations; *_fro_err = "
                        "‖W−Ŵ‖/‖W‖; cosine = cos(WXᵀ, ŴXᵀ) per linear, averaged",
        "research_note": RESEARCH_NOTE,
    }
