"""The artifact download format: a deterministic tar of the directory whose planned length and
digest are known before streaming, that never follows links and that tar tools unpack."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from compressor.artifact.archive import ArchiveError, archive_sha256, file_sha256, plan_archive


def _artifact(root: Path, name: str = "art") -> Path:
    d = root / name
    (d / "sub").mkdir(parents=True)
    (d / "b.safetensors").write_bytes(os.urandom(70_001))
    (d / "a.json").write_text('{"x": 1}')
    (d / "sub" / "c.txt").write_text("tokenizer")
    return d


def test_archive_is_exact_deterministic_and_unpacks(tmp_path):
    d = _artifact(tmp_path)
    arch = plan_archive(d)
    data = b"".join(arch.chunks())
    assert len(data) == arch.size and len(data) % tarfile.RECORDSIZE == 0
    assert arch.sha256() == hashlib.sha256(data).hexdigest() == archive_sha256(d)[0]
    # mtimes, atimes and permission bits on disk do not change the bytes
    for p in d.rglob("*"):
        os.utime(p, (12345, 67890))
    (d / "a.json").chmod(0o600)
    assert b"".join(plan_archive(d).chunks()) == data
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["art", "art/a.json", "art/b.safetensors", "art/sub",
                                             "art/sub/c.txt"]
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and not m.uname for m in members)
        tar.extractall(tmp_path / "out", filter="data")
    for f in ("a.json", "b.safetensors", "sub/c.txt"):
        assert (tmp_path / "out" / "art" / f).read_bytes() == (d / f).read_bytes()
    # a different file content is a different digest
    (d / "a.json").write_text('{"x": 2}')
    assert archive_sha256(d)[0] != hashlib.sha256(data).hexdigest()


def test_archive_never_follows_links(tmp_path):
    d = _artifact(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the artifact")
    (d / "leak.txt").symlink_to(secret)
    (d / "leakdir").symlink_to(tmp_path, target_is_directory=True)
    arch = plan_archive(d)
    names = [e.name for e in arch.entries]
    assert "art/leak.txt" not in names and not any(n.startswith("art/leakdir") for n in names)
    assert b"not part of the artifact" not in b"".join(arch.chunks())
    with pytest.raises(ArchiveError):      # a link is not a directory to archive either
        plan_archive(d / "leakdir")
    with pytest.raises(ArchiveError):      # nor a file to hash
        file_sha256(d / "leak.txt")


def test_archive_refuses_a_file_changed_after_planning(tmp_path):
    d = _artifact(tmp_path)
    arch = plan_archive(d)
    (d / "b.safetensors").write_bytes(b"short")
    with pytest.raises(ArchiveError):
        b"".join(arch.chunks())
    arch = plan_archive(d)
    (d / "b.safetensors").unlink()
    (d / "b.safetensors").symlink_to(d / "a.json")    # swapped for a link after listing
    with pytest.raises(ArchiveError):
        b"".join(arch.chunks())
