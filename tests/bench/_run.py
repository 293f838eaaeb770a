"""Run `bitplan bench NAME --json` as a user would (a subprocess) and return its figures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from service.settings import REPO_ROOT


def bench(name: str, data_dir: Path, *args: str, env: dict[str, str] | None = None,
          timeout: float = 600) -> dict:
    full_env = os.environ | {"BITPLAN_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1"} | (env or {})
    full_env.pop("BITPLAN_REDIS_URL", None)
    out = subprocess.run([sys.executable, "-m", "service.cli", "bench", name, "--json", *args],
                         cwd=REPO_ROOT, env=full_env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    fig = json.loads(out.stdout)
    assert "error" not in fig, fig
    return fig


def positive(*xs: float) -> bool:
    return all(isinstance(x, int | float) and math.isfinite(x) and x > 0 for x in xs)


def linear_shapes(model: Path, vocab: bool = True) -> list[tuple[int, int]]:
    """(out, in) of every planned item of a checkpoint, from its config alone: the blocks'
    linears and (unless `vocab` is False) the token embedding and LM head, which are planned
    too (a tied pair is one item)."""
    from compressor.checkpoint.loading import inventory  # torch: only the tests that ask

    return [(li.out_features, li.in_features) for li in inventory(str(model)).linears
            if vocab or not li.is_vocab]


def model_params(model: Path) -> int:
    """Every parameter of a checkpoint (planned items and kept tensors, a tied one once): what
    a bpp budget is per."""
    from compressor.checkpoint.loading import inventory

    inv = inventory(str(model))
    return inv.linear_params + sum(math.prod(k.shape) for k in inv.kept)


def rate_fits_latency(rps: float, p50_ms: float, clients: int) -> bool:
    """Each client sends one request at a time, so over the run clients × wall ≥ Σ latencies
    ≥ (requests / 2) · p50: a request rate above 2000 · clients / p50_ms was not measured over
    those requests (5 % slack for the printed rounding)."""
    return 0 < rps <= 1.05 * 2000 * clients / p50_ms
