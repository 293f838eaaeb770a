"""`bitplan bench sampling --json`: the profile's Q-only samples of one linear one at a time vs
in one stacked LDLQ sweep, on real widths; then a fresh demo profile over one compression pass.

Per shape (a synthetic W with heavy-tailed columns and a correlated H, as calibration gives):
- `sequential_s`: the 8 Q-only samples of the default ProfileConfig as the profile took them
  before batching, `decompose(W, H, option)` at rank 0 once per (bits, group size);
  `batched_s`: `q_only_many` (one rotation, one inverse Cholesky, one column loop); `speedup`;
  `max_rel_diff_t2`: the largest relative difference of a sampled t² between the two;
- `ldlq_*`: the rounding alone — `ldlq` per variant vs one `ldlq_many` — and the fraction of
  codes that differ (float summation order only: in float64 they are identical, tested);
- `block_sweep`: `ldlq_many` time per lazy-batch block size B (the device default is
  `rounding.LAZY_BLOCK`).
`profile_over_compress`: `run_profile` of the demo model into an empty store (everything
measured, nothing reused) over loading + `compress_model` of a uniform 3-bit Q-only plan over
every item the profile covers, the token embedding and head included (`compress_bpp` says its
bits per planned parameter), both timed in this run on this device.
`--quick`: small widths, one block size pair. BITPLAN_BENCH_MODEL profiles another model.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from compressor.checkpoint.loading import discover, load_model, load_tokenizer
from compressor.pipeline.compress import compress_model
from compressor.pipeline.profile import ProfileConfig, calibration, run_profile
from compressor.pipeline.profile_store import FileProfileStore
from compressor.quant.decompose import decompose, q_only_many
from compressor.quant.problem import rotated_problem
from compressor.quant.rounding import lazy_block, ldlq, ldlq_many
from service.settings import DEMO_MODEL, get_settings
from solver.bytes import Option, option_bytes

FULL_SHAPES = ((1536, 1536), (8960, 1536))   # Qwen2-1.5B: attention, MLP
QUICK_SHAPES = ((96, 320), (200, 192))        # odd widths: partial groups, groups ≥ n
BLOCKS = (16, 32, 64, 128)


def synthetic_linear(m: int, n: int, seed: int = 0, device: str = "cpu") -> tuple[Tensor, Tensor]:
    """W [m, n] ~ N(0, 0.02²) with 1 % of input columns 5× larger (outlier features), and
    H = XᵀX/N from N = 2n activations with a decaying feature spectrum and a shared low-rank
    part (calibration Hessians are far from white)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g) * 0.02
    W[:, torch.rand(n, generator=g) < 0.01] *= 5
    N = 2 * n
    X = torch.randn(N, n, generator=g) * torch.logspace(0, -2, n)[torch.randperm(n, generator=g)]
    X += torch.randn(N, 8, generator=g) @ torch.randn(8, n, generator=g) * 0.3
    return W.to(device), (X.T @ X / N).to(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(seconds, result) of one call, synchronising CUDA around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


def measure_shape(m: int, n: int, device: str = "cpu", blocks: Sequence[int] = BLOCKS,
                  seed: int = 0) -> dict:
    """Sequential vs batched Q-only samples of one synthetic [m, n] linear (module docstring)."""
    dev = torch.device(device)
    W, H = synthetic_linear(m, n, seed, device)
    cfg = ProfileConfig()
    opts, dcfg = cfg.q_only_options(), cfg.decomposition
    seq_s, seq = timed(lambda: [decompose(W, H, o, dcfg) for o in opts], dev)
    bat_s, bat = timed(lambda: q_only_many(W, H, opts, dcfg), dev)
    rel = [abs(q.rel_h_err ** 2 - d.rel_h_err ** 2) / max(d.rel_h_err ** 2, 1e-30)
           for q, d in zip(bat, seq, strict=True)]
    # the rounding alone, on the rotated W and damped H the samples round
    _, _, Wt, _, Hd = rotated_problem(W, H, dcfg)
    variants = [(o.bits, o.group_size) for o in opts]
    lseq_s, lseq = timed(lambda: [ldlq(Wt, Hd, b, g) for b, g in variants], dev)
    lbat_s, lbat = timed(lambda: ldlq_many(Wt, Hd, variants), dev)
    differ = sum(int((a[0] != b[0]).sum()) for a, b in zip(lseq, lbat, strict=True))
    # seconds to 10 µs: the quick shapes' batched sweeps take a few ms, and at 1 ms the printed
    # times no longer reproduce the printed speedups
    sweep = {str(b): round(timed(lambda b=b: ldlq_many(Wt, Hd, variants, block_size=b),
                                 dev)[0], 5) for b in blocks}
    return {"shape": [m, n], "samples": len(opts),
            "sequential_s": round(seq_s, 5), "batched_s": round(bat_s, 5),
            "speedup": round(seq_s / bat_s, 2), "max_rel_diff_t2": max(rel),
            "ldlq_sequential_s": round(lseq_s, 5), "ldlq_batched_s": round(lbat_s, 5),
            "ldlq_speedup": round(lseq_s / lbat_s, 2),
            "code_mismatch_fraction": differ / (len(variants) * m * n),
            "default_block": lazy_block(dev), "block_sweep": sweep,
            "best_block": int(min(sweep, key=sweep.get))}


def profile_over_compress(ref: str, device: str = "cpu") -> dict:
    """A fresh profile of `ref` over one load + compression pass of a uniform 3-bit plan."""
    cfg = ProfileConfig()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        prof = run_profile(ref, FileProfileStore(Path(tmp)), device=device, config=cfg)
        profile_s = time.perf_counter() - t0
    option = Option(3, 0, cfg.factor_bits, cfg.group_size)
    t0 = time.perf_counter()
    model = load_model(ref, device=device)
    calib = calibration(load_tokenizer(ref), cfg)
    linears = discover(model).linears    # with the embedding and head: rank 0 suits them
    compress_model(model, {li.name: option for li in linears}, calib, config=cfg.decomposition)
    compress_s = time.perf_counter() - t0
    params = sum(li.out_features * li.in_features for li in linears)
    bits = 8 * sum(option_bytes(li.out_features, li.in_features, option) for li in linears)
    stats = prof.stats
    return {"model": ref, "profile_s": round(profile_s, 4), "compress_s": round(compress_s, 4),
            "profile_over_compress": round(profile_s / compress_s, 3),
            "compress_option": option.to_dict(), "compress_bpp": round(bits / params, 3),
            "profile_sampling_s": stats.get("sampling_s"), "profile_probe_s": stats.get("probe_s"),
            "linears": len(linears)}


def run(args) -> dict:
    device = get_settings().device
    quick = bool(getattr(args, "quick", False))
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    rows = [measure_shape(m, n, device, (16, 64) if quick else BLOCKS) for m, n in shapes]
    ref = os.environ.get("BITPLAN_BENCH_MODEL") or str(DEMO_MODEL)
    prof = profile_over_compress(ref, device)
    return {"device": device, "torch_threads": torch.get_num_threads(),
            "variants": [[o.bits, o.group_size] for o in ProfileConfig().q_only_options()],
            "shapes": rows, "profile_over_compress": prof["profile_over_compress"],
            "profile": prof}
