"""Streamed safetensors writing: tensors are appended to a spool file as they are produced and
the file is assembled once at the end, so a writer never holds more than the one tensor it is
given (plus a fixed copy buffer), whatever the file's size.

The format (https://github.com/huggingface/safetensors, "Format"): an 8-byte little-endian
header length N, N bytes of JSON — `{"__metadata__": {...}, name: {"dtype", "shape",
"data_offsets": [begin, end]}, ...}` — padded with spaces to a multiple of 8, then every
tensor's bytes back to back, offsets relative to the end of the header, no holes.

`finish` lays the file out as the reference writer (safetensors.torch.save_file, i.e. the Rust
`serialize`) does: data ordered by dtype in descending order of its `Dtype` enum (element size
never increases, so every tensor is aligned to its element size), then by name; header entries
in data order after `__metadata__`; compact JSON. The result is byte for byte the file
save_file writes for the same tensors (tested), so artifact digests do not depend on which
writer made them.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

# torch dtype → safetensors dtype name, listed in the order of safetensors' Dtype enum (the
# data order is this, reversed; checked against save_file in tests)
ST_DTYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16",
    torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32",
    torch.float32: "F32", torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64"}
_RANK = {name: k for k, name in enumerate(ST_DTYPES.values())}
COPY_CHUNK = 16 << 20     # bytes moved per read/write when copying tensor data


@dataclass(frozen=True)
class _Spooled:
    name: str
    dtype: str            # safetensors dtype name
    shape: tuple[int, ...]
    offset: int           # where the bytes start in the spool file
    nbytes: int


def _copy(src, dst, start: int, nbytes: int, buf: bytearray) -> None:
    """nbytes from `src` at `start` appended to `dst`, through `buf`."""
    src.seek(start)
    view = memoryview(buf)
    left = nbytes
    while left:
        got = src.readinto(view[:min(left, len(buf))])
        if not got:
            raise OSError(f"{getattr(src, 'name', src)}: short read ({left} bytes missing)")
        dst.write(view[:got])
        left -= got


class SafetensorsWriter:
    """Append tensors with `add` (or raw bytes of another file with `add_file_range`), then
    `finish()` writes `path`; `abort()` (or leaving a `with` block by an exception) removes
    everything written. Tensor names must be unique."""

    def __init__(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.metadata = dict(metadata) if metadata is not None else None
        self._spool_path = self.path.with_name(self.path.name + ".spool")
        self._spool = open(self._spool_path, "w+b")   # closed by finish / abort
        self._entries: dict[str, _Spooled] = {}
        self._end = 0

    @property
    def nbytes(self) -> int:
        """Tensor bytes appended so far."""
        return self._end

    def names(self) -> list[str]:
        return list(self._entries)

    def _claim(self, name: str, dtype: str, shape: tuple[int, ...], nbytes: int) -> None:
        if name in self._entries:
            raise ValueError(f"{self.path.name}: tensor {name!r} written twice")
        self._entries[name] = _Spooled(name, dtype, tuple(int(d) for d in shape), self._end,
                                       nbytes)
        self._end += nbytes

    def add(self, name: str, t: Tensor) -> None:
        """Append `t`'s bytes (moved to the CPU, made contiguous: a copy only if it was not)."""
        if t.dtype not in ST_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} has no safetensors name")
        t = t.detach().to("cpu").contiguous()
        if t.numel():
            self._spool.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._claim(name, ST_DTYPES[t.dtype], tuple(t.shape), t.numel() * t.element_size())

    def add_file_range(self, name: str, dtype: torch.dtype, shape: tuple[int, ...],
                       src: str | Path, start: int) -> None:
        """Append a tensor stored raw in `src` at byte `start` (e.g. a checkpoint shard's
        tensor), copied in COPY_CHUNK pieces: never resident as a whole."""
        nbytes = math.prod(shape) * dtype.itemsize
        with open(src, "rb") as fh:
            _copy(fh, self._spool, start, nbytes, bytearray(min(COPY_CHUNK, max(nbytes, 1))))
        self._claim(name, ST_DTYPES[dtype], shape, nbytes)

    def header(self) -> tuple[bytes, list[_Spooled]]:
        """The padded header and the tensors in file order."""
        order = sorted(self._entries.values(), key=lambda e: (-_RANK[e.dtype], e.name))
        head: dict = {} if self.metadata is None else {"__metadata__": self.metadata}
        pos = 0
        for e in order:
            head[e.name] = {"dtype": e.dtype, "shape": list(e.shape),
                            "data_offsets": [pos, pos + e.nbytes]}
            pos += e.nbytes
        raw = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
        return raw + b" " * (-len(raw) % 8), order

    def finish(self) -> Path:
        """Write `path` (header, then the spooled tensors in file order); remove the spool."""
        raw, order = self.header()
        buf = bytearray(min(COPY_CHUNK, max(self._end, 1)))
        try:
            self._spool.flush()
            with open(self.path, "wb") as out:
                out.write(struct.pack("<Q", len(raw)))
                out.write(raw)
                for e in order:
                    _copy(self._spool, out, e.offset, e.nbytes, buf)
        except BaseException:
            self.abort()
            raise
        self._close_spool()
        return self.path

    def _close_spool(self) -> None:
        if not self._spool.closed:
            self._spool.close()
        self._spool_path.unlink(missing_ok=True)

    def abort(self) -> None:
        self._close_spool()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._spool.closed:
            self.finish()
