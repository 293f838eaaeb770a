"""Profile once: per-linear sensitivity α_i and error samples → fitted E_i(b, r), stored per
linear so a killed run resumes where it stopped. Then any budget is solved from the profile
alone: predicted ΔKL(plan) = Σ α_i · E_i(b_i, r_i) (HIGGS-style linearity, see sensitivity.py).

Per linear the profile costs: one stacked LDLQ sweep for the Q-only samples at every sampled
bit width and group size (compressor.rounding.ldlq_many), one SVD of the H-weighted residual
(the rank curve for every rank at once), a few full CALDERA decompositions at anchor
(bits, rank) points, and one noise probe that replays the blocks after it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from compressor.blocks import capture
from compressor.data import Split, token_sequences
from compressor.decompose import (
    DecompositionConfig,
    decompose,
    h_norm,
    lowrank_error_curve,
    q_only_many,
)
from compressor.hessian import collect_hessians, linear_weight
from compressor.loading import discover, load_model, load_tokenizer
from compressor.profile_store import LinearProfile, Profile, ProfileStore, profile_key
from compressor.sensitivity import measure_alpha, summarize
from solver.budget import fp16_reference_bytes
from solver.bytes import Option
from solver.errormodel import ErrorModel, fit, sample_tail

Progress = Callable[[str, float], None]

# One outer CALDERA iteration with two L/R alternations: about a third of the default's time.
# Plans are executed with the same config they were profiled with, so predictions match.
FAST_DECOMPOSITION = DecompositionConfig(outer_iters=1, lr_iters=2)


@dataclass(frozen=True)
class ProfileConfig:
    calib_seqs: int = 32                 # Hessians: 32 × 256 tokens
    probe_seqs: int = 8                  # sensitivity probes replay the first 8 of them
    seq_len: int = 256
    seed: int = 0
    probe_t: float = 0.1                 # relative error of the sensitivity noise probe
    q_bits: tuple[int, ...] = (2, 3, 4, 6)             # Q-only samples (rank 0)
    # full decompositions at (bits, rank as a fraction of max_rank)
    anchors: tuple[tuple[int, float], ...] = ((2, 0.5), (4, 0.25))
    tail_bits: int = 3                   # bits of the residual whose spectrum gives S(r)
    max_rank_fraction: float = 0.5       # ranks considered: 0 … fraction · min(m, n)
    factor_bits: int = 4
    group_size: int = 128
    # larger groups the planner may choose (cheaper scales, slightly more error): κ_g sampled
    # Q-only at group_bits, relative to group_size (see solver/errormodel.py)
    extra_groups: tuple[int, ...] = (256, 512)
    group_bits: tuple[int, ...] = (2, 4)
    decomposition: DecompositionConfig = field(default_factory=lambda: FAST_DECOMPOSITION)

    def __post_init__(self) -> None:
        if self.extra_groups and not set(self.group_bits) <= set(self.q_bits):
            raise ValueError(f"group_bits {self.group_bits} must be among q_bits {self.q_bits}")

    def to_dict(self) -> dict:
        return asdict(self) | {"decomposition": self.decomposition.to_dict(),
                               "q_bits": list(self.q_bits),
                               "extra_groups": list(self.extra_groups),
                               "group_bits": list(self.group_bits),
                               "anchors": [list(a) for a in self.anchors]}

    @classmethod
    def from_dict(cls, d: dict) -> ProfileConfig:
        d = dict(d)
        d["decomposition"] = DecompositionConfig.from_dict(d.get("decomposition", {}))
        d["q_bits"] = tuple(d.get("q_bits", cls.q_bits))
        # profiles made before group sizes were planned carry no extra groups
        d["extra_groups"] = tuple(d.get("extra_groups", ()))
        d["group_bits"] = tuple(d.get("group_bits", cls.group_bits))
        d["anchors"] = tuple(tuple(a) for a in d.get("anchors", cls.anchors))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def q_only_options(self) -> list[Option]:
        """The Q-only (rank 0) samples of a linear: every q_bits at group_size, then every
        group_bits at each extra group, in that order."""
        return ([Option(b, 0, self.factor_bits, self.group_size) for b in self.q_bits]
                + [Option(b, 0, self.factor_bits, g) for g in self.extra_groups
                   for b in self.group_bits])

    def max_rank(self, out_features: int, in_features: int) -> int:
        return max(1, int(self.max_rank_fraction * min(out_features, in_features)))


def calibration(tokenizer, cfg: ProfileConfig) -> torch.Tensor:
    return token_sequences(tokenizer, Split.TRAIN, cfg.seq_len, cfg.calib_seqs, seed=cfg.seed)


def tensor_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def weights_hash(model_ref: str, model=None) -> str:
    """sha256 of the safetensors files; for weights not on disk, of the loaded tensors."""
    from compressor.artifact import source_sha256

    digest = source_sha256(model_ref)
    if digest is None and model is not None:
        h = hashlib.sha256()
        for name, p in sorted(model.state_dict().items()):
            h.update(name.encode() + p.detach().cpu().float().numpy().tobytes())
        digest = h.hexdigest()
    return digest or "unknown"


@torch.no_grad()
def sample_linear(W: torch.Tensor, H: torch.Tensor,
                  cfg: ProfileConfig) -> tuple[list, list, list, dict]:
    """Error samples [(bits, rank, t²)], the sampled spectral tail S(r) and the group-size
    factors {str(g): [[bits, κ], …]} of one linear. Every Q-only sample (each bit width at
    group_size, each group_bits at each extra group) comes from one stacked LDLQ sweep
    (`q_only_many`); the anchors are full decompositions."""
    m, n = W.shape
    R = cfg.max_rank(m, n)
    dcfg = cfg.decomposition
    samples: list[list[float]] = []
    norm = max(h_norm(W, H), 1e-30)
    tail_ranks, tail = [0], [1.0]
    q_only = q_only_many(W, H, cfg.q_only_options(), dcfg)
    for b, d in zip(cfg.q_bits, q_only[:len(cfg.q_bits)], strict=True):
        samples.append([b, 0, d.rel_h_err ** 2])
        if b == cfg.tail_bits:
            curve = lowrank_error_curve(W - d.w_hat(), H) / norm
            tail_ranks, tail = sample_tail(curve.tolist(), R)
    for b, frac in cfg.anchors:
        r = max(1, round(frac * R))
        d = decompose(W, H, Option(b, r, cfg.factor_bits, cfg.group_size), dcfg)
        samples.append([b, r, d.rel_h_err ** 2])
    groups: dict[str, list[list[float]]] = {}
    if cfg.extra_groups:
        base = {int(b): t2 for b, r, t2 in samples if r == 0}
        groups[str(cfg.group_size)] = [[b, 1.0] for b in cfg.group_bits]
        g_only = iter(q_only[len(cfg.q_bits):])
        for g in cfg.extra_groups:
            groups[str(g)] = [[b, next(g_only).rel_h_err ** 2 / max(base[b], 1e-30)]
                              for b in cfg.group_bits]
    return samples, tail_ranks, tail, groups


def run_profile(model_ref: str, store: ProfileStore, *, device: str = "cpu",
                trust_remote_code: bool = False, progress: Progress | None = None,
                config: ProfileConfig | None = None) -> Profile:
    """Profile `model_ref` (or return the stored profile with the same key). Idempotent and
    resumable: finished linears are read back from the store, not measured again."""
    cfg = config or ProfileConfig()
    report = progress or (lambda stage, frac: None)
    t_start = time.perf_counter()
    report("load", 0.0)
    tokenizer = load_tokenizer(model_ref, trust_remote_code)
    model = load_model(model_ref, trust_remote_code, device=device)
    calib = calibration(tokenizer, cfg)
    key = profile_key(weights_hash(model_ref, model), tensor_hash(calib), cfg.to_dict())
    if (done := store.get(key)) is not None:
        report("done", 1.0)
        return done
    inv = discover(model)
    names = [li.name for li in inv.linears]
    report("hessians", 0.02)
    hessians = collect_hessians(model, calib, names)
    cache = capture(model, calib[: cfg.probe_seqs].to(device))
    records = store.linear_records(key)
    modules = dict(model.named_modules())
    timings = {"sampling_s": 0.0, "probe_s": 0.0}
    for k, li in enumerate(inv.linears):
        if li.name in records:
            continue
        t0 = time.perf_counter()
        W = linear_weight(modules[li.name]).detach().float()
        H = hessians[li.name].to(W.device)
        if not torch.isfinite(W).all():
            raise ValueError(f"linear {li.name} has NaN/inf weights; cannot profile this model")
        samples, tail_ranks, tail, groups = sample_linear(W, H, cfg)
        model_fit = fit(samples, tail_ranks, tail)
        model_fit.group_factors = groups
        t1 = time.perf_counter()
        alpha = measure_alpha(model, cache, hessians, [li.name], t=cfg.probe_t, seed=cfg.seed)
        timings["sampling_s"] += t1 - t0
        timings["probe_s"] += time.perf_counter() - t1
        rec = LinearProfile(li.name, li.block, li.out_features, li.in_features,
                            alpha=alpha[li.name], samples=samples,
                            fit=json.loads(json.dumps(model_fit.to_dict())))  # as stored
        store.put_linear(key, rec)
        records[li.name] = rec
        report("linears", 0.05 + 0.93 * (k + 1) / len(inv.linears))
    linears = [records[n] for n in names]
    sens = summarize({lp.name: lp.alpha for lp in linears}, cache)
    for lp in linears:
        lp.proxy = sens.block_influence[lp.block] if lp.block is not None else 0.0
    fits = [ErrorModel.from_dict(lp.fit) for lp in linears]
    profile = Profile(
        key=key, model_ref=str(model_ref), weights_hash=weights_hash(model_ref, model),
        calib_hash=tensor_hash(calib), config=cfg.to_dict(), fixed_bytes=inv.kept_bytes,
        linears=linears, block_sensitivity=sens.block_alpha, block_proxy=sens.block_influence,
        stats={"fit_r2_mean": sum(f.r2_fit or 0 for f in fits) / max(len(fits), 1),
               "spearman_alpha_vs_proxy": spearman(sens.block_alpha, sens.block_influence),
               "wall_s": round(time.perf_counter() - t_start, 2),
               "num_blocks": inv.num_blocks, "linear_params": inv.linear_params,
               "fp16_bytes": fp16_reference_bytes(
                   inv.linear_params, sum(math.prod(k.shape) for k in inv.kept)),
               **{k: round(v, 2) for k, v in timings.items()}},
    )
    store.put(profile)
    report("done", 1.0)
    return profile


def spearman(a, b) -> float | None:
    from scipy.stats import spearmanr

    if len(a) < 3:
        return None  # undefined; None (not NaN) so the value survives JSON and SQL round trips
    rho = float(spearmanr(a, b).statistic)
    return rho if math.isfinite(rho) else None


