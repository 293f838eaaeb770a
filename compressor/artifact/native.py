"""Compressed-model artifact: packed tensors in safetensors + `bitplan_manifest.json`.

Layout of an artifact directory:
    compressed.safetensors   per linear "<name>.q.packed", ".q.scale", ".q.zero", ".l.*", ".r.*"
                             — exactly the bytes `solver.bytes.option_bytes` counts (tested)
    kept.safetensors         every other parameter / persistent buffer at its stored dtype
                             (embeddings, norms, head, biases); tied tensors stored once
    config.json              the model's config plus `quantization_config` (quant_method
                             "bitplan": per-linear records, format version; compressor/runtime/hf.py)
    model.safetensors.index.json   maps the kept keys to kept.safetensors, so transformers'
                             from_pretrained loads them; the packed tensors load through the
                             registered quantizer (`import compressor.runtime.hf`)
    tokenizer files
    bitplan_manifest.json    per-linear option/config/errors, the plan, library versions,
                             sha256 of the source weights and of every file written here
Writes go piece by piece (`ArtifactWriter`: every tensor is on disk once added, so writing holds
one tensor at a time, never the artifact) to a temporary sibling directory that is renamed
into place, so a reader never sees a half-written artifact; `load_compressed` verifies every file's sha256, then loads through
`AutoModelForCausalLM.from_pretrained` like any user would.
The whole directory downloads as one deterministic tar (compressor/artifact/archive.py, torch-free so
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
from safetensors import safe_open
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from compressor.artifact.archive import MANIFEST
from compressor.artifact.safetensors_writer import SafetensorsWriter
from compressor.checkpoint.loading import MODEL_CONSTRUCTION_LOCK, vocab_modules
from compressor.checkpoint.tensor_reader import Checkpoint
from compressor.quant.decomposed import Decomposed
from compressor.runtime import hf
from compressor.runtime.modules import Runtime, set_runtime
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


class ArtifactWriter:
    """An artifact written piece by piece: each linear's packed tensors and each kept tensor go
    to disk when added (compressor.artifact.safetensors_writer spools them), so the writer holds no tensor
    between calls: peak memory is the largest single tensor, not the artifact. `finish` writes
    config, index, tokenizer and manifest, then renames the temporary sibling directory into
    place; leaving a `with` block by an exception (or `abort`) removes it."""

    def __init__(self, out_dir: str | Path, skeleton: nn.Module) -> None:
        self.out_dir = Path(out_dir)
        self._modules = dict(skeleton.named_modules())
        self._vocab = {li.name: li.kind for li in vocab_modules(skeleton)}
        head = skeleton.get_output_embeddings()
        self._head = next((n for n, m in self._modules.items() if m is head), None)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out_dir.parent / f".{self.out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        self._packed = SafetensorsWriter(self.tmp / COMPRESSED, _ST_METADATA)
        self._kept = SafetensorsWriter(self.tmp / KEPT, _ST_METADATA)
        self.linears: dict[str, dict] = {}
        self.tied: dict[str, str] = {}
        self.accounted = 0
        self._dtype: torch.dtype | None = None   # of the first floating kept tensor

    def add_linear(self, name: str, dec: Decomposed) -> None:
        mod = self._modules.get(name)
        if mod is None:
            raise ArtifactError(f"model has no module {name}")
        kind = self._vocab.get(name) or ("conv1d" if type(mod).__name__ == "Conv1D"
                                         else "linear")
        for key, t in dec.tensors().items():
            self._packed.add(f"{name}.{key}", t)
        extra = {"head": self._head} if kind == "tied" else {}   # the module that reads it too
        self.linears[name] = dec.record() | {
            "kind": kind, "has_bias": getattr(mod, "bias", None) is not None} | extra
        self.accounted += option_bytes(*dec.shape, dec.option)

    def _kept_dtype(self, dtype: torch.dtype) -> None:
        if self._dtype is None and dtype.is_floating_point:
            self._dtype = dtype

    def add_kept(self, name: str, t: Tensor) -> None:
        self._kept_dtype(t.dtype)
        self._kept.add(name, t)

    def add_kept_from_file(self, name: str, dtype: torch.dtype, shape: tuple[int, ...],
                           src: Path, start: int) -> None:
        """A kept tensor copied raw from a checkpoint shard (at its stored dtype), in chunks."""
        self._kept_dtype(dtype)
        self._kept.add_file_range(name, dtype, shape, src, start)

    def tie(self, alias: str, stored: str) -> None:
        self.tied[alias] = stored

    def finish(self, config, tokenizer, plan: dict | None = None,
               source_ref: str | Path | None = None,
               order: list[str] | None = None) -> Manifest:
        """Complete the artifact; `order` lists the linears in the order the records are
        written (default: as added)."""
        tmp = self.tmp
        linears = self.linears if order is None else {n: self.linears[n] for n in order}
        if order is not None and len(linears) != len(self.linears):
            raise ArtifactError("order does not name every linear written")
        dtype = str(self._dtype or torch.float32).removeprefix("torch.")
        self._packed.finish()
        self._kept.finish()
        kept_names = self._kept.names()
        if config is not None:
            _save_config(config, tmp, linears, self.tied, dtype)
            (tmp / INDEX).write_text(json.dumps(
                {"metadata": {"total_size": self._kept.nbytes},
                 "weight_map": dict.fromkeys(sorted(kept_names), KEPT)}, indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        manifest = Manifest(
            source_ref=None if source_ref is None else str(source_ref),
            source_sha256=source_sha256(source_ref), linears=linears, plan=plan,
            versions=_versions(),
            files={p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()},
            compressed_bytes=self._packed.nbytes, accounted_bytes=self.accounted,
            kept_bytes=self._kept.nbytes, dtype=dtype, tied=dict(self.tied),
            created=datetime.now(UTC).isoformat(timespec="seconds"))
        if manifest.compressed_bytes != manifest.accounted_bytes:
            raise ArtifactError(f"compressed tensors hold {manifest.compressed_bytes} bytes, "
                                f"the options account for {manifest.accounted_bytes}")
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=1))
        old = None
        if self.out_dir.exists():
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            self.out_dir.rename(old)
        tmp.rename(self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        log.info("artifact %s: %d linears, %d compressed + %d kept bytes", self.out_dir,
                 len(linears), manifest.compressed_bytes, manifest.kept_bytes)
        return manifest

    def abort(self) -> None:
        self._packed.abort()
        self._kept.abort()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def _save_config(config, out: Path, linears: dict, tied: dict, dtype: str) -> None:
    """config.json with the bitplan quantization config (on a copy: the caller's model keeps
    its own config)."""
    config = copy.deepcopy(config)
    if any(rec.get("kind") == "tied" for rec in linears.values()):
        config.tie_word_embeddings = False   # the loader shares the packed tensor itself (hf.py)
    config.quantization_config = hf.BitplanConfig(
        linears=linears, dtype=dtype, packed_file=COMPRESSED, tied=tied).to_dict()
    config.save_pretrained(out)


def tensors_sha256(path: str | Path) -> str:
    """Digest of one safetensors file's tensors — names (sorted), dtypes, shapes and bytes —
    not of its header metadata or layout: what must not change when the format's metadata or
    the writer does."""
    h = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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


class ArtifactLinears(Mapping[str, Decomposed]):
    """An artifact's packed linears by name, each read from compressed.safetensors only when
    asked for (positioned reads, tensor_reader.Checkpoint; no mmap whose pages would stay resident):
    the lazy `decomposed` mapping stream_evaluate takes, holding nothing between lookups."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        self.path = Path(path)
        self.device = torch.device(device)
        self._records = read_manifest(self.path).linears
        self._ckpt = Checkpoint(self.path, [self.path / COMPRESSED])
        self._keys: dict[str, list[str]] = {}
        for key in self._ckpt.names():   # "<linear>.<part>.<tensor>", e.g. "….q_proj.q.packed"
            self._keys.setdefault(key.rsplit(".", 2)[0], []).append(key)

    def __getitem__(self, name: str) -> Decomposed:
        rec = self._records[name]
        tensors = {k[len(name) + 1:]: self._ckpt.get(k) for k in self._keys.get(name, [])}
        return Decomposed.from_tensors(tensors, rec).to(self.device)

    def __iter__(self):
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)


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
