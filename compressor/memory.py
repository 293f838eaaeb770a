"""Peak memory and time per stage, as jobs and `bitplan profile --json` report them.

Host: the peak resident set of this process (getrusage's ru_maxrss, KiB on Linux) — a high-water
mark over the process's life, so a benchmark measures it in a fresh child process. GPU:
torch.cuda.max_memory_allocated on CUDA devices (None elsewhere).
"""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager

import torch


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)   # macOS reports bytes


def peak_gpu_bytes(device: str | torch.device) -> int | None:
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    return int(torch.cuda.max_memory_allocated(dev))


class StageClock:
    """Seconds spent per named stage (a stage entered twice adds up)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def report(self, device: str | torch.device = "cpu") -> dict:
        return {"stage_s": {k: round(v, 3) for k, v in self.seconds.items()},
                "peak_rss_bytes": peak_rss_bytes(), "peak_gpu_bytes": peak_gpu_bytes(device)}
