"""Memory and time in the open: this process's resident and peak memory (Linux /proc), the GPU's
peak allocation, seconds per stage, and the bytes a loaded model's packed linears hold."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import torch
from torch import nn

from compressor.modules import CompressedLinear


def rss_bytes() -> int:
    """Resident set size of this process now."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process image (VmHWM). Not ru_maxrss: Linux carries
    that across fork + exec, so a child started by a big parent would report the parent's."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


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


def packed_linear_bytes(model: nn.Module) -> int:
    """Bytes of every buffer the model's CompressedLinears hold (their packed q/l/r tensors):
    the plan's option_bytes when nothing else is resident."""
    return sum(b.nbytes for m in model.modules() if isinstance(m, CompressedLinear)
               for b in m.buffers())


def dense_linear_bytes(model: nn.Module) -> int:
    """Bytes a dense-Ŵ cache of every CompressedLinear takes in the model's float dtype."""
    itemsize = next(p for p in model.parameters() if p.is_floating_point()).element_size()
    return sum(m.out_features * m.in_features * itemsize for m in model.modules()
               if isinstance(m, CompressedLinear))
