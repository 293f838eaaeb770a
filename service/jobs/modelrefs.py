"""Model references: a bare name or a local path, always resolved inside the configured model
roots (no `..`, no symlink escapes), plus a cheap fingerprint of the weight files.

The checks (config.json, safetensors only and whole, no remote code unless allowed, a causal LM)
and the layer inventory come from compressor.checkpoint.headers, which reads config.json and safetensors
headers only. Kept free of torch and transformers so the API accepts plans without them.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

from compressor.artifact import gguf_convert
from compressor.checkpoint import headers as checkpoint
from service.errors import Invalid, Unavailable

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
    """compressor.checkpoint.headers's up-front checks (config, remote code, every weights shard's
    header, causal-LM architecture) as the service's own error."""
    try:
        return checkpoint.check_model_dir(path, ref, trust_remote_code)
    except checkpoint.ModelLoadError as exc:
        raise ModelRefError(str(exc)) from None


def check_gguf_convertible(path: Path) -> str:
    """A gguf request's model must be one llama.cpp's converter knows (it writes the GGUF's
    metadata, tokenizer and kept tensors): its architecture, else a 422 naming it; a 503 when
    this server has no llama.cpp source tree (`make llama-cpp`). Reads config.json and the
    converter's sources only (no torch)."""
    try:
        return gguf_convert.check_convertible(path)
    except gguf_convert.LlamaCppNotFound as exc:
        raise Unavailable(f"target gguf is not available on this server: {exc}",
                          code="gguf_unavailable") from None
    except ValueError as exc:
        raise Invalid(f"target gguf: {exc}", code="unsupported_architecture") from None


def model_inventory(path: Path, ref: str, trust_remote_code: bool) -> checkpoint.Inventory:
    """The layer inventory from config.json and safetensors headers (no torch, no weights)."""
    try:
        return checkpoint.header_inventory(path, ref, trust_remote_code)
    except checkpoint.ModelLoadError as exc:
        raise ModelRefError(str(exc)) from None


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
