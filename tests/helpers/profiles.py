"""Profiles for tests: small profiling configs for the tiny and demo models, and a synthetic
profile built from numbers (no model run)."""

from __future__ import annotations

import json
import math
import uuid

from compressor.pipeline.profile_store import LinearProfile, Profile
from solver.errormodel import ErrorModel

# Small enough that profiling the tiny model takes seconds (part of the profile key).
TINY_PROFILE = {"calib_seqs": 4, "probe_seqs": 2, "seq_len": 64, "q_bits": [2, 4, 8],
                "anchors": [[3, 0.5]],
                "decomposition": {"outer_iters": 1, "lr_iters": 1, "hadamard": False}}
# The demo model's e2e: the same sparse grid on the real model, a small calibration set.
DEMO_PROFILE = TINY_PROFILE


def synthetic_profile(n_blocks: int = 3, key: str | None = None, model_ref: str = "tiny"
                      ) -> Profile:
    """A profile built from numbers (no model run): a known error law per linear, in the fitted
    error model's real serialised form, and samples drawn from it."""
    linears, params = [], 0
    for b in range(n_blocks):
        for kind, (m, n) in {"self_attn.q_proj": (32, 32), "mlp.down_proj": (32, 72)}.items():
            alpha = 1.0 + b * 0.5 + (0.3 if "mlp" in kind else 0.0)
            em = ErrorModel(theta=(math.log(0.01), -math.log(4), 0.05), c=0.1,
                            tail_ranks=[0, 4, 8, 16], tail=[1.0, 0.6, 0.4, 0.25], r2_fit=0.99)
            samples = [[bits, rank, float(em.predict(bits, rank))]
                       for bits in (2, 3, 4, 6, 8) for rank in (0, 8)]
            linears.append(LinearProfile(
                name=f"model.layers.{b}.{kind}", block=b, out_features=m, in_features=n,
                alpha=alpha, proxy=alpha / 2, samples=samples,
                fit=json.loads(json.dumps(em.to_dict()))))   # as stored: lists, not tuples
            params += m * n
    return Profile(key=key or uuid.uuid4().hex[:32], model_ref=model_ref,
                   weights_hash="w" * 64, calib_hash="c" * 16, config={"grid": "sparse"},
                   fixed_bytes=12345, linears=linears,
                   block_sensitivity=[1.0, 0.5, 2.0, 1.5][:n_blocks],
                   block_proxy=[0.1, 0.2, 0.3, 0.4][:n_blocks],
                   stats={"fit_r2_mean": 0.99, "linear_params": params,
                          "fp16_bytes": 2 * params + 12345})
