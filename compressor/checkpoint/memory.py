"""Memory and time in the open: this process's resident and peak memory (Linux /proc), the GPU's
peak allocation, seconds per stage, and the bytes a loaded model's packed linears hold."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from contextlib import contextmanager

import torch
from torch import nn

from compressor.runtime.modules import CompressedEmbedding, CompressedLinear


def rss_bytes() -> int:
    """Resident set size of this process now."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vmhwm() -> int:
    """VmHWM: the peak resident set size since the process started or its last reset."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


_peak_before_reset = 0   # the largest VmHWM seen before a reset_peak_rss()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process image (VmHWM, across reset_peak_rss windows).
    Not ru_maxrss: Linux carries that across fork + exec, so a child started by a big parent
    would report the parent's."""
    return max(_peak_before_reset, _vmhwm())


def reset_peak_rss() -> bool:
    """Start a new VmHWM window (Linux ≥ 4.0: write 5 to /proc/self/clear_refs), so the next
    `_vmhwm()` is the peak since now; peak_rss_bytes() still reports the process-wide peak.
    False where the kernel does not allow it (the window then spans the whole process)."""
    global _peak_before_reset
    _peak_before_reset = max(_peak_before_reset, _vmhwm())
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def release_free_heap() -> bool:
    """Give the heap's free pages back to the OS (glibc `malloc_trim(0)`; False elsewhere).

    Streaming frees a block's tensors (weights, Hessians, sampling temporaries) while small
    long-lived ones (probe streams, packed codes) sit above them in the heap: glibc raises its
    mmap threshold to 32 MiB once a large mapping is freed, so most tensors live in the heap,
    which it only trims from the top. Without this, the freed space of every block stays
    resident and RSS climbs block after block; malloc_trim also releases whole free pages in
    the middle of the heap (glibc ≥ 2.8)."""
    fn = getattr(_LIBC, "malloc_trim", None)
    if fn is None:
        return False
    fn(0)
    return True


M_MMAP_THRESHOLD = -3        # mallopt parameter (glibc malloc.h)
MMAP_THRESHOLD = 1 << 20     # allocations from this size get their own mapping


def map_large_allocations(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve every allocation of `threshold` bytes or more from its own mmap (glibc
    `mallopt(M_MMAP_THRESHOLD)`; False elsewhere), so a freed tensor's memory goes back to the
    OS at once instead of staying in the heap under smaller long-lived ones. A fixed threshold
    also stops glibc raising it to 32 MiB after the first large free (its default)."""
    fn = getattr(_LIBC, "mallopt", None)
    return bool(fn is not None and fn(M_MMAP_THRESHOLD, threshold))


def available_bytes(device: str | torch.device = "cpu") -> int | None:
    """Memory a new allocation can still get: the GPU's free memory on CUDA, else the host's
    MemAvailable (Linux /proc/meminfo); None where neither can be read."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0]) if torch.cuda.is_available() else None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_gpu_bytes(device: str | torch.device) -> int | None:
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    return int(torch.cuda.max_memory_allocated(dev))


class StageClock:
    """Seconds and peak resident memory spent per named stage (a stage entered twice adds up its
    seconds and keeps its larger peak). Each stage entry starts a new VmHWM window
    (reset_peak_rss), and stages still open outside it take its peak too, so nesting is fine."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_rss: dict[str, int] = {}
        self._open: list[str] = []

    def _note_peak(self, names: list[str]) -> None:
        hwm = _vmhwm()
        for n in names:
            self.peak_rss[n] = max(self.peak_rss.get(n, 0), hwm)

    @contextmanager
    def stage(self, name: str):
        self._note_peak(self._open)
        reset_peak_rss()
        self._open.append(name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self._note_peak(self._open)
            self._open.pop()

    def report(self, device: str | torch.device = "cpu") -> dict:
        return {"stage_s": {k: round(v, 3) for k, v in self.seconds.items()},
                "stage_peak_rss_bytes": dict(self.peak_rss),
                "peak_rss_bytes": peak_rss_bytes(), "peak_gpu_bytes": peak_gpu_bytes(device)}


def packed_linear_bytes(model: nn.Module) -> int:
    """Bytes of every buffer the model's compressed modules hold (packed q/l/r tensors, the
    packed embedding; a tensor shared by a tied head counted once): the plan's option_bytes
    when nothing else is resident."""
    seen: set[int] = set()
    total = 0
    for m in model.modules():
        if isinstance(m, CompressedLinear | CompressedEmbedding):
            for b in m.buffers():
                if id(b) not in seen:
                    seen.add(id(b))
                    total += b.nbytes
    return total


def dense_linear_bytes(model: nn.Module) -> int:
    """Bytes a dense-Ŵ cache of every compressed module takes in the model's float dtype."""
    itemsize = next(p for p in model.parameters() if p.is_floating_point()).element_size()
    return sum(m.out_features * m.in_features * itemsize for m in model.modules()
               if isinstance(m, CompressedLinear)) + sum(
        m.num_embeddings * m.embedding_dim * itemsize for m in model.modules()
        if isinstance(m, CompressedEmbedding))
