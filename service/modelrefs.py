"""Model references: a bare name or a local path, always resolved inside the configured model
roots (no `..`, no symlink escapes), plus a cheap fingerprint of the weight files.

The checks here are the cheap ones (config.json present, safetensors only, no remote code unless
allowed); the layer inventory comes from compressor.loading on first sight of a model. Kept free of
torch so the API starts fast.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

MAX_REF_LEN = 500


class ModelRefError(ValueError):
    """A model reference the service refuses; the message says why (a 422 for the API)."""


class ModelNotFound(ModelRefError):
    """No model by that reference under the model roots (a 404 for the API)."""


@dataclass(frozen=True)
class ResolvedModel:
    ref: str
    path: Path
    fingerprint: str


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def resolve_model(ref: str, roots: list[Path], trust_remote_code: bool = False) -> ResolvedModel:
    if not isinstance(ref, str) or not ref.strip():
        raise ModelRefError("model must be a non-empty string")
    ref = ref.strip()
    if len(ref) > MAX_REF_LEN or "\x00" in ref or any(ord(c) < 32 for c in ref):
        raise ModelRefError("model reference is too long or contains control characters")
    if ".." in Path(ref).parts or "\\" in ref:
        raise ModelRefError(f"model reference {ref!r} may not contain '..' or backslashes")
    real_roots = [Path(r).expanduser().resolve() for r in roots]
    candidates: list[Path] = []
    given = Path(ref).expanduser()
    if given.is_absolute():
        candidates.append(given)
    else:
        candidates += [root / given for root in real_roots]
        candidates.append(Path.cwd() / given)   # e.g. models/bitplan-demo from the repo root
        if len(given.parts) > 1:
            candidates += [root / Path(*given.parts[1:]) for root in real_roots
                           if root.name == given.parts[0]]
    for cand in candidates:
        if not cand.exists():
            continue
        real = cand.resolve()
        if not any(_inside(real, root) for root in real_roots):
            if given.is_absolute() or cand.is_symlink() or real != cand.absolute():
                raise ModelRefError(f"model path {ref!r} is outside the configured model roots")
            continue
        if not real.is_dir():
            raise ModelRefError(f"model path {ref!r} is not a directory")
        check_model_dir(real, ref, trust_remote_code)
        return ResolvedModel(ref=ref, path=real, fingerprint=fingerprint(real))
    raise ModelNotFound(f"model {ref!r} not found under the model roots "
                        f"({', '.join(str(r) for r in real_roots)})")


def check_model_dir(path: Path, ref: str, trust_remote_code: bool) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelRefError(f"model {ref!r} has no config.json: not a Hugging Face model")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelRefError(f"model {ref!r} has an unreadable config.json: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ModelRefError(f"model {ref!r} has a config.json that is not an object")
    if cfg.get("auto_map") and not trust_remote_code:
        raise ModelRefError(f"model {ref!r} needs remote code (auto_map in config.json); "
                             "refused because trust_remote_code is off")
    if not (cfg.get("model_type") or cfg.get("architectures")):
        raise ModelRefError(f"model {ref!r} has a config.json without model_type or "
                             "architectures: not a Hugging Face model config")
    weights = list(path.glob("*.safetensors"))
    if not weights:
        if any(path.glob(p) for p in ("*.bin", "*.pt", "*.pth", "*.ckpt")):
            raise ModelRefError(f"model {ref!r} has only pickle checkpoints; bitplan loads "
                                 "safetensors weights only")
        raise ModelRefError(f"model {ref!r} has no .safetensors weights")
    for f in weights:
        safetensors_names(f, ref)
    return cfg


def safetensors_names(f: Path, ref: str) -> set[str]:
    """Tensor names from a safetensors header, refusing a file whose header is not valid (a
    truncated or corrupt download) — without reading the tensors."""
    size = f.stat().st_size
    with f.open("rb") as fh:
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, 100_000_000):
            raise ModelRefError(f"model {ref!r}: {f.name} is not a valid safetensors file")
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            header = None
    if not isinstance(header, dict) or not all(
            isinstance(v, dict) and "data_offsets" in v for k, v in header.items()
            if k != "__metadata__"):
        raise ModelRefError(f"model {ref!r}: {f.name} has a corrupt safetensors header")
    return {k for k in header if k != "__metadata__"}


def weight_names(path: Path, ref: str) -> set[str]:
    names: set[str] = set()
    for f in sorted(path.glob("*.safetensors")):
        names |= safetensors_names(f, ref)
    return names


def fingerprint(path: Path) -> str:
    """Cheap identity of a model directory: config, and each safetensors file's name, size and
    header (tensor names, dtypes, shapes, offsets). The full weights hash is the profile's."""
    h = hashlib.sha256()
    h.update((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0".encode())
        with f.open("rb") as fh:
            head = fh.read(8)
            if len(head) == 8:
                (n,) = struct.unpack("<Q", head)
                if n <= 100_000_000:
                    h.update(fh.read(n))
    return h.hexdigest()
