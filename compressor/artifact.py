"""Compressed-model artifact: packed tensors in safetensors + `bitplan_manifest.json`.

Layout of an artifact directory:
    compressed.safetensors   per linear "<name>.q.packed", ".q.scale", ".q.zero", ".l.*", ".r.*"
                             — exactly the bytes `solver.bytes.option_bytes` counts (tested)
    kept.safetensors         every other parameter / persistent buffer at its stored dtype
                             (embeddings, norms, head, biases); tied tensors stored once
    config.json              the model's config plus `quantization_config` (quant_method
                             "bitplan": per-linear records, format version; compressor/hf.py)
    model.safetensors.index.json   maps the kept keys to kept.safetensors, so transformers'
                             from_pretrained loads them; the packed tensors load through the
                             registered quantizer (`import compressor.hf`)
    tokenizer files
    bitplan_manifest.json    per-linear option/config/errors, the plan, library versions,
                             sha256 of the source weights and of every file written here
Writes go to a temporary sibling directory that is renamed into place, so a reader never sees
a half-written artifact; `load_compressed` verifies every file's sha256, then loads through
`AutoModelForCausalLM.from_pretrained` like any user would.
The whole directory downloads as one deterministic tar (compressor/archive.py, torch-free so
the API can stream it); an artifact's recorded digest is that archive's sha256.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from compressor import hf
from compressor.archive import MANIFEST
from compressor.decompose import Decomposed
from compressor.loading import MODEL_CONSTRUCTION_LOCK
from compressor.modules import Runtime, set_runtime
from solver.bytes import option_bytes

log = logging.getLogger(__name__)

COMPRESSED = "compressed.safetensors"
KEPT = "kept.safetensors"
INDEX = "model.safetensors.index.json"
FORMAT_VERSION = hf.FORMAT_VERSION
# transformers refuses safetensors whose metadata "format" is not pt/tf/flax/mlx
_ST_METADATA = {"format": "pt"}


class ArtifactError(ValueError):
    """A missing, tampered or inconsistent artifact; the message says what."""


@dataclass
class Manifest:
    source_ref: str | None
    source_sha256: str | None          # over the source's *.safetensors files, in name order
    linears: dict[str, dict]           # name → Decomposed.record() + kind, has_bias
    plan: dict | None
    versions: dict[str, str]
    files: dict[str, str]              # file name → sha256 (every file but the manifest)
    compressed_bytes: int              # tensor bytes in compressed.safetensors
    accounted_bytes: int               # Σ option_bytes over the linears (== compressed_bytes)
    kept_bytes: int
    dtype: str                         # dtype the model skeleton is built in
    tied: dict[str, str] = field(default_factory=dict)   # alias → stored name
    created: str = ""
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @property
    def total_bytes(self) -> int:
        return self.compressed_bytes + self.kept_bytes


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def source_sha256(source_ref: str | Path | None) -> str | None:
    """sha256 over the source model's safetensors files (a local directory, or a hub id found
    in the local cache); None when the weights are not at hand."""
    if source_ref is None:
        return None
    path = Path(source_ref).expanduser()
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(str(source_ref), local_files_only=True,
                                          allow_patterns=["*.safetensors"]))
        except Exception as exc:   # any failure means "not at hand"
            log.warning("no local weights for %s to hash: %s", source_ref, exc)
            return None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("bitplan", "torch", "transformers", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _kept_state(model: nn.Module, names: set[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Everything in the state dict but the compressed linears' weights / packed buffers;
    tensors sharing storage are stored once (returns the tensors and alias → stored name)."""
    kept: dict[str, Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in model.state_dict(keep_vars=False).items():
        owner, _, leaf = key.rpartition(".")
        if (owner in names and leaf != "bias") or owner.rpartition(".")[0] in names:
            continue   # a linear's weight, or a CompressedLinear's packed q/l/r buffers
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if ident in seen and t.numel():
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        kept[key] = t.detach().cpu().contiguous()
    return kept, tied


def save_artifact(
    model: nn.Module,
    tokenizer,
    decomposed: Mapping[str, Decomposed],
    out_dir: str | Path,
    plan: dict | None = None,
    source_ref: str | Path | None = None,
) -> Manifest:
    """Write the artifact of `model` whose linears `decomposed` names are compressed (the model
    may hold them as CompressedLinear already, or still as the original linears)."""
    kept, tied = _kept_state(model, set(decomposed))
    return write_artifact(model, getattr(model, "config", None), tokenizer, decomposed,
                          kept, tied, out_dir, plan=plan, source_ref=source_ref)


def write_artifact(
    skeleton: nn.Module,
    config,
    tokenizer,
    decomposed: Mapping[str, Decomposed],
    kept: Mapping[str, Tensor],
    tied: Mapping[str, str],
    out_dir: str | Path,
    plan: dict | None = None,
    source_ref: str | Path | None = None,
) -> Manifest:
    """Write an artifact from its parts: `skeleton` only names the modules (it may live on the
    meta device), `kept` maps every kept tensor's name to its stored value (tied aliases in
    `tied`). The in-memory save_artifact and the streamed compression both end here."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    modules = dict(skeleton.named_modules())
    compressed: dict[str, Tensor] = {}
    linears: dict[str, dict] = {}
    accounted = 0
    for name, dec in decomposed.items():
        mod = modules.get(name)
        if mod is None:
            raise ArtifactError(f"model has no module {name}")
        kind = "conv1d" if type(mod).__name__ == "Conv1D" else "linear"
        linears[name] = dec.record() | {"kind": kind, "has_bias": mod.bias is not None}
        compressed |= {f"{name}.{k}": v.detach().cpu().contiguous()
                       for k, v in dec.tensors().items()}
        accounted += option_bytes(*dec.shape, dec.option)
    kept = dict(kept)
    float_dtypes = [t.dtype for t in kept.values() if t.is_floating_point()]
    dtype = str(float_dtypes[0] if float_dtypes else torch.float32).removeprefix("torch.")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(compressed, tmp / COMPRESSED, metadata=_ST_METADATA)
        save_file(kept, tmp / KEPT, metadata=_ST_METADATA)
        if config is not None:
            _save_config(config, tmp, linears, tied, dtype)
            (tmp / INDEX).write_text(json.dumps(
                {"metadata": {"total_size": sum(t.nbytes for t in kept.values())},
                 "weight_map": dict.fromkeys(sorted(kept), KEPT)}, indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        manifest = Manifest(
            source_ref=None if source_ref is None else str(source_ref),
            source_sha256=source_sha256(source_ref), linears=linears, plan=plan,
            versions=_versions(),
            files={p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()},
            compressed_bytes=sum(t.nbytes for t in compressed.values()),
            accounted_bytes=accounted, kept_bytes=sum(t.nbytes for t in kept.values()),
            dtype=dtype, tied=dict(tied),
            created=datetime.now(UTC).isoformat(timespec="seconds"))
        if manifest.compressed_bytes != manifest.accounted_bytes:
            raise ArtifactError(f"compressed tensors hold {manifest.compressed_bytes} bytes, "
                                f"the options account for {manifest.accounted_bytes}")
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=1))
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("artifact %s: %d linears, %d compressed + %d kept bytes", out_dir, len(linears),
             manifest.compressed_bytes, manifest.kept_bytes)
    return manifest


def _save_config(config, out: Path, linears: dict, tied: dict, dtype: str) -> None:
    """config.json with the bitplan quantization config (on a copy: the caller's model keeps
    its own config)."""
    config = copy.deepcopy(config)
    config.quantization_config = hf.BitplanConfig(
        linears=linears, dtype=dtype, packed_file=COMPRESSED, tied=tied).to_dict()
    config.save_pretrained(out)


def read_manifest(path: str | Path) -> Manifest:
    f = Path(path) / MANIFEST
    if not f.is_file():
        raise ArtifactError(f"{path} has no {MANIFEST}: not a bitplan artifact")
    return Manifest.from_dict(json.loads(f.read_text()))


def verify_artifact(path: str | Path) -> Manifest:
    """Check every file's sha256 against the manifest; raises ArtifactError on any mismatch."""
    path = Path(path)
    manifest = read_manifest(path)
    for fname, digest in manifest.files.items():
        f = path / fname
        if not f.is_file():
            raise ArtifactError(f"artifact file {fname} is missing")
        if sha256_file(f) != digest:
            raise ArtifactError(f"artifact file {fname} does not match its sha256 "
                                "(modified or corrupt)")
    return manifest


def load_compressed(path: str | Path, device: str | torch.device = "cpu",
                    verify: bool = True, runtime: Runtime = Runtime.PACKED):
    """(model, tokenizer) from an artifact through `AutoModelForCausalLM.from_pretrained` (the
    registered bitplan quantizer; no remote code): packed linears by default, `Runtime.DENSE`
    to cache each dense Ŵ for fast evaluation."""
    path = Path(path)
    manifest = verify_artifact(path) if verify else read_manifest(path)
    if manifest.format_version < 2:
        raise ArtifactError(f"{path} is a format-{manifest.format_version} artifact (no "
                            "quantization config in config.json); compress it again")
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if getattr(config, "auto_map", None):
        raise ArtifactError(f"{path}: config needs remote code; refused")
    with MODEL_CONSTRUCTION_LOCK:
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=getattr(torch, manifest.dtype), trust_remote_code=False,
            use_safetensors=True)
    set_runtime(model, runtime)
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() \
        else None
    return model.to(device).eval(), tokenizer
