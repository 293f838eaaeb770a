"""Process memory and the bytes a loaded model's packed linears hold (Linux /proc figures)."""

from __future__ import annotations

import os

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
