"""Positioned reads of safetensors shards: a tensor (or some of its rows) by name, read when
asked for, with no memory map whose pages would stay resident. The streamed model
(compressor.checkpoint.stream) and the artifact writer read the checkpoint through it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from compressor.checkpoint.headers import _ST_TO_TORCH, ModelLoadError, read_header, weight_files


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int           # absolute byte offset of the tensor in the file


class Checkpoint:
    """The tensors of a model directory's safetensors shards (or of the given `files`), by
    name, read on demand."""

    def __init__(self, path: Path, files: list[Path] | None = None) -> None:
        self.path = Path(path)
        self._index: dict[str, _Entry] = {}
        for f in files if files is not None else weight_files(self.path, str(path)):
            # read_header validates every offset against the file size
            for name, info in read_header(f, str(path)).items():
                self._index[name] = _Entry(f, getattr(torch, _ST_TO_TORCH[info.dtype]),
                                           info.shape, info.start)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def names(self) -> list[str]:
        return list(self._index)

    def entry(self, name: str) -> _Entry:
        return self._index[name]

    @property
    def nbytes(self) -> int:
        return sum(math.prod(e.shape) * e.dtype.itemsize for e in self._index.values())

    def get(self, name: str, rows: tuple[int, int] | None = None) -> Tensor:
        """The tensor `name` at its stored dtype (rows [a, b) of its first dimension only)."""
        e = self._index[name]
        shape, start = e.shape, e.start
        if rows is not None:
            a, b = rows
            row_bytes = math.prod(shape[1:]) * e.dtype.itemsize
            shape, start = (b - a, *shape[1:]), start + a * row_bytes
        nbytes = math.prod(shape) * e.dtype.itemsize
        if nbytes == 0:
            return torch.empty(shape, dtype=e.dtype)
        buf = bytearray(nbytes)
        with e.file.open("rb") as fh:
            fh.seek(start)
            if fh.readinto(buf) != nbytes:
                raise ModelLoadError(f"{e.file}: short read of tensor {name}")
        return torch.frombuffer(buf, dtype=e.dtype).reshape(shape)
