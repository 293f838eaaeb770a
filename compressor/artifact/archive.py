"""An artifact directory as one download: a deterministic, uncompressed tar stream and its sha256.

Deterministic so that a digest recorded once stays true: entries in sorted path order, every
header with mtime 0, uid/gid 0, no owner names, mode 0644 (files) / 0755 (directories), PAX
format. The archive's single top-level directory is the artifact directory's own name.
Symlinks and other non-regular files are never followed nor archived (a file is opened with
O_NOFOLLOW, so a link swapped in after listing is refused too).

Standard library only: the API process streams downloads from here without importing torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "bitplan_manifest.json"
_BLOCK = tarfile.BLOCKSIZE          # 512: headers and data are padded to this
_RECORD = tarfile.RECORDSIZE        # 10240: the archive's total length is padded to this
_CHUNK = 1 << 20


class ArchiveError(OSError):
    """The directory changed under the archive (a file resized, replaced by a link, vanished)."""


@dataclass(frozen=True)
class Entry:
    name: str            # path inside the archive (posix, under the top-level directory)
    rel: str             # path relative to the artifact directory ("" for the directory itself)
    path: Path | None    # the file on disk; None for a directory entry
    size: int


def _header(name: str, size: int, is_dir: bool) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.size = 0 if is_dir else size
    info.mode = 0o755 if is_dir else 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _pad(n: int, unit: int = _BLOCK) -> int:
    return -n % unit


@dataclass(frozen=True)
class Archive:
    """A planned archive of one directory: its entries and exact length, known before any
    byte is read (so a response can send Content-Length up front)."""

    root: Path
    entries: tuple[Entry, ...]
    size: int

    def files(self) -> list[Entry]:
        return [e for e in self.entries if e.path is not None]

    def chunks(self, chunk: int = _CHUNK) -> Iterator[bytes]:
        """The archive's bytes; exactly `size` of them, or ArchiveError if a file changed."""
        written = 0
        for e in self.entries:
            head = _header(e.name, e.size, e.path is None)
            written += len(head)
            yield head
            if e.path is None:
                continue
            for block in _read_exact(e.path, e.size, chunk):
                written += len(block)
                yield block
            pad = _pad(e.size)
            written += pad
            yield b"\0" * pad
        tail = 2 * _BLOCK
        tail += _pad(written + tail, _RECORD)
        yield b"\0" * tail

    def sha256(self) -> str:
        h = hashlib.sha256()
        for block in self.chunks():
            h.update(block)
        return h.hexdigest()


def _read_exact(path: Path, size: int, chunk: int) -> Iterator[bytes]:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise ArchiveError(f"{path.name}: cannot be read for the archive ({exc.strerror})") \
            from exc
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            raise ArchiveError(f"{path.name} changed while the archive was being written")
        left = size
        while left:
            block = fh.read(min(chunk, left))
            if not block:
                raise ArchiveError(f"{path.name} shrank while the archive was being written")
            left -= len(block)
            yield block


def _walk(directory: Path, rel: str) -> Iterator[tuple[str, Path, os.stat_result]]:
    with os.scandir(directory) as it:
        items = sorted(it, key=lambda d: d.name)
    for d in items:
        st = d.stat(follow_symlinks=False)
        sub = f"{rel}/{d.name}" if rel else d.name
        if stat.S_ISDIR(st.st_mode):
            yield sub, Path(d.path), st
            yield from _walk(Path(d.path), sub)
        elif stat.S_ISREG(st.st_mode):
            yield sub, Path(d.path), st
        # symlinks, sockets, fifos: never part of an artifact download


def plan_archive(directory: str | Path) -> Archive:
    """Plan the tar of `directory` (which must be a real directory, not a link to one)."""
    root = Path(directory)
    if root.is_symlink() or not root.is_dir():
        raise ArchiveError(f"{root} is not a directory")
    top = root.name
    entries = [Entry(top, "", None, 0)]
    for rel, path, st in _walk(root, ""):
        name = f"{top}/{rel}"
        if stat.S_ISDIR(st.st_mode):
            entries.append(Entry(name, rel, None, 0))
        else:
            entries.append(Entry(name, rel, path, st.st_size))
    entries.sort(key=lambda e: e.name.encode("utf-8", "surrogateescape"))
    size = 0
    for e in entries:
        size += len(_header(e.name, e.size, e.path is None)) + e.size + _pad(e.size)
    size += 2 * _BLOCK
    size += _pad(size, _RECORD)
    return Archive(root, tuple(entries), size)


def archive_sha256(directory: str | Path) -> tuple[str, int]:
    """(sha256, length) of the archive `plan_archive(directory).chunks()` streams."""
    arch = plan_archive(directory)
    return arch.sha256(), arch.size


def recorded_file_digests(directory: str | Path) -> dict[str, str]:
    """file name → sha256 as the artifact's manifest recorded them when it was written
    ({} when there is no readable manifest)."""
    try:
        files = json.loads((Path(directory) / MANIFEST).read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {str(k): str(v) for k, v in files.items()} if isinstance(files, dict) else {}


def file_sha256(path: str | Path, chunk: int = _CHUNK) -> str:
    h = hashlib.sha256()
    for block in _read_exact(Path(path), os.lstat(path).st_size, chunk):
        h.update(block)
    return h.hexdigest()
