"""A GGUF file → a Hugging Face model directory (safetensors weights, config, tokenizer).

GGUF is llama.cpp's single-file format (the spec: ggml's docs/gguf.md; written and read by the
`gguf` package, gguf-py, from the llama.cpp repository): key/value metadata (architecture,
shapes, the tokenizer's tokens/merges/special ids) and tensors, each F32/F16/BF16 or in one of
ggml's block-quantized types (Q4_1, Q8_0, K-quants …). We read it the way transformers does
(`from_pretrained(dir, gguf_file=name)`: integrations/ggml.py maps the metadata to a config and
a fast tokenizer, modeling_gguf_pytorch_utils.py dequantizes every tensor to float32), cast to
the chosen dtype and `save_pretrained(safe_serialization=True)`. So any GGUF transformers can
read imports, and nothing else does: before handing it over, the header is checked here
(present, GGUF magic, whole, an architecture transformers maps), so bad input fails in one line
naming the file.

Two things transformers gets wrong for GGUF tokenizers are set right from the file's own
metadata: its Llama converter names the BOS token as EOS too, and it ignores
`tokenizer.ggml.add_bos_token` (SmolLM2's GGUF says False; transformers would prepend
<|im_start|> to every text). A third: for a byte-level BPE (`tokenizer.ggml.model = "gpt2"`) it
writes a SentencePiece-style tokenizer.json (byte fallback, a Sequence decoder) without the
pre-tokenizer `tokenizer.ggml.pre` names; `_byte_level_bpe` writes it as the model's own is
(llama.cpp's converter reads the former back as a "llama" vocabulary that llama.cpp cannot
run, and SmolLM2's digits are split one by one).

The output is written into a temporary sibling directory and renamed to DIR at the end; an
existing non-empty DIR is refused unless `force`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from compressor.checkpoint.headers import ModelLoadError

GGUF_MAGIC = b"GGUF"
FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
DTYPES = ("auto", "bf16", "float16", "float32")
_DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "float16": "float16",
                "fp16": "float16", "float32": "float32", "fp32": "float32"}


@dataclass(frozen=True)
class GGUFSummary:
    """What the header says, read without dequantizing anything."""
    path: Path
    architecture: str
    tensor_types: dict[str, int]      # ggml type name → number of tensors
    type_params: dict[str, int]       # ggml type name → number of parameters
    file_bytes: int
    has_output: bool                  # an `output.weight` (an untied head) is stored

    @property
    def quantized(self) -> bool:
        return any(t not in FLOAT_TYPES for t in self.tensor_types)

    @property
    def float_dtype(self) -> str | None:
        """The float type of an unquantized file: the one holding most parameters (llama.cpp
        keeps norms in F32 even in an F16 file); None when any tensor is quantized."""
        if self.quantized:
            return None
        return FLOAT_TYPES[max(self.type_params, key=self.type_params.__getitem__)]


@dataclass
class ImportResult:
    out: Path
    dtype: str
    architecture: str
    source_types: dict[str, int]
    tied: bool
    weight_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"out": str(self.out), "dtype": self.dtype, "architecture": self.architecture,
                "source_types": self.source_types, "tied": self.tied,
                "weight_bytes": self.weight_bytes,
                "seconds": {k: round(v, 2) for k, v in self.seconds.items()}}


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def inspect_gguf(path: str | os.PathLike) -> GGUFSummary:
    """Check `path` is a whole GGUF file whose architecture transformers can read; summarize
    its tensors. Raises ModelLoadError naming the file and the reason."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a file")
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot be read: {exc.strerror or exc}") from exc
    if head != GGUF_MAGIC:
        what = "empty" if size == 0 else f"it starts with {head!r}, not {GGUF_MAGIC!r}"
        raise ModelLoadError(f"{path}: not a GGUF file ({what})")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:   # gguf-py reports a short file as whatever numpy trips over
        raise ModelLoadError(f"{path}: truncated or corrupt GGUF file ({size} bytes; the gguf "
                             f"reader says: {type(exc).__name__}: {exc})") from exc
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise ModelLoadError(f"{path}: truncated GGUF file ({size} bytes, its tensors need "
                             f"{end})")
    field_ = reader.fields.get("general.architecture")
    if field_ is None:
        raise ModelLoadError(f"{path}: GGUF file without general.architecture")
    arch = str(field_.contents())
    known = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})  # not models
    if arch not in known:
        raise ModelLoadError(f"{path}: architecture {arch!r} is not one transformers can read "
                             f"from GGUF (it reads: {', '.join(known)})")
    types: Counter[str] = Counter()
    params: Counter[str] = Counter()
    for t in reader.tensors:
        types[t.tensor_type.name] += 1
        params[t.tensor_type.name] += int(t.n_elements)
    return GGUFSummary(path, arch, dict(types.most_common()), dict(params), size,
                       any(t.name == "output.weight" for t in reader.tensors))


def choose_dtype(summary: GGUFSummary, requested: str = "auto") -> str:
    """The torch dtype name to write: `auto` is the file's own float type when its tensors are
    F16/BF16/F32, else bfloat16 (a quantized file's values need no more)."""
    if requested == "auto":
        return summary.float_dtype or "bfloat16"
    try:
        return _DTYPE_NAMES[requested]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {requested!r}: one of {', '.join(DTYPES)}") from None


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' warnings while it reads a GGUF are noise here (a legacy-tokenizer notice);
    what matters (missing tensors) is checked below."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _read_failed(path: Path, what: str, exc: Exception) -> ModelLoadError:
    return ModelLoadError(f"{path}: transformers cannot read its {what}: "
                          f"{type(exc).__name__}: {exc}")


def _gguf_tokenizer_flags(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id",
                "add_bos_token", "add_eos_token"):
        f = reader.fields.get(f"tokenizer.ggml.{key}")
        if f is not None:
            out[key] = f.contents()
    return out


# tokenizer.ggml.pre -> the Hugging Face pre-tokenizers before the byte-level split (llama.cpp's
# llama-vocab.cpp regexes per pre-type: "smollm" splits every digit first, \p{N})
_PRE_SPLITS = {"smollm": [{"type": "Digits", "individual_digits": True}], "gpt2": [],
               "default": []}


def _byte_level_bpe(tokenizer_json: Path, path: Path) -> None:
    """Rewrite a byte-level BPE's tokenizer.json as such (module docstring); other tokenizers
    and pre-types without a known split are left as transformers wrote them."""
    import gguf

    fields = gguf.GGUFReader(str(path)).fields
    model = fields.get("tokenizer.ggml.model")
    pre = fields.get("tokenizer.ggml.pre")
    pre = pre.contents() if pre is not None else "default"
    if model is None or model.contents() != "gpt2" or pre not in _PRE_SPLITS:
        return
    # with sentencepiece installed, the slow tokenizer's save copies its vocab file — here the
    # GGUF itself — to tokenizer.model; a byte-level BPE has no SentencePiece model
    (tokenizer_json.parent / "tokenizer.model").unlink(missing_ok=True)
    tok = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    tok["normalizer"] = None
    tok["model"]["byte_fallback"] = False     # every byte is a token of a byte-level BPE
    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": True}
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [*_PRE_SPLITS[pre], level]}
    tok["decoder"] = {**level, "use_regex": True}
    tokenizer_json.write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")


def _fix_special_tokens(tokenizer, flags: dict) -> None:
    """Special tokens and add-BOS/EOS as the GGUF states them (see the module docstring)."""
    names = {"bos_token_id": "bos_token", "eos_token_id": "eos_token",
             "unknown_token_id": "unk_token", "padding_token_id": "pad_token"}
    n = len(tokenizer)
    for key, attr in names.items():
        if key in flags and 0 <= int(flags[key]) < n:
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(int(flags[key])))
    for key in ("add_bos_token", "add_eos_token"):
        if key in flags and hasattr(tokenizer, key):
            setattr(tokenizer, key, bool(flags[key]))


def load_gguf(path: str | os.PathLike, dtype: str = "bfloat16", *,
              summary: GGUFSummary | None = None, progress: Callable[[str], None] = _stderr):
    """(model, tokenizer) from a GGUF through transformers, the model cast to `dtype`, the
    tokenizer's special tokens as the file states them, a tied head still tied."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    summary = summary or inspect_gguf(path)
    where, name = str(path.parent.resolve()), path.name
    types = ", ".join(f"{k} {v}" for k, v in summary.tensor_types.items())
    progress(f"reading {path}: {summary.architecture}, {sum(summary.tensor_types.values())} "
             f"tensors ({types}), {summary.file_bytes / 2**20:.1f} MiB; config and tokenizer")
    with _quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(where, gguf_file=name, local_files_only=True)
        except Exception as exc:
            raise _read_failed(path, "config", exc) from exc
        try:
            tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name, local_files_only=True)
        except Exception as exc:
            raise _read_failed(path, "tokenizer", exc) from exc
        _fix_special_tokens(tokenizer, _gguf_tokenizer_flags(path))
        how = ("dequantizing to float32 (transformers), then casting"
               if summary.quantized else "loading")
        progress(f"converting {path.name}: {how} to {dtype}")
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                where, gguf_file=name, config=config, dtype=getattr(torch, dtype),
                local_files_only=True, output_loading_info=True)
        except Exception as exc:
            raise _read_failed(path, "weights", exc) from exc
    tied_names = {"lm_head.weight"} if not summary.has_output else set()
    missing = sorted(set(info.get("missing_keys", ())) - tied_names)
    if missing:
        raise ModelLoadError(f"{path}: {len(missing)} of the model's tensors are not in the "
                             f"file (first: {missing[0]})")
    model = model.to(getattr(torch, dtype)).eval()
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if not summary.has_output and head is not None:
        if not model.config.tie_word_embeddings or head.weight is not embed.weight:
            raise ModelLoadError(f"{path}: the file has no output.weight but transformers "
                                 "did not tie the head to the embedding")
    return model, tokenizer


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not force and not (out.is_dir() and not any(out.iterdir())):
        raise ModelLoadError(f"{out} exists and is not empty: pass --force to replace it")


def _readable(directory: Path) -> None:
    """Files at the umask's mode: safetensors writes its file 0600, and a model root is often
    read by a service running as another user."""
    mask = os.umask(0)
    os.umask(mask)
    for f in directory.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~mask)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`; an existing `out` (allowed by the caller) is moved
    aside first and deleted only once the new one is in place."""
    old = None
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        out.rmdir()
    elif out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def import_gguf(path: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "auto",
                force: bool = False,
                progress: Callable[[str], None] = _stderr) -> ImportResult:
    """Import the GGUF at `path` into the model directory `out` (see the module docstring);
    one progress line per stage (reading, converting, writing)."""
    path, out = Path(path), Path(out)
    t0 = time.perf_counter()
    summary = inspect_gguf(path)
    target = choose_dtype(summary, dtype)
    _check_out(out, force)
    model, tokenizer = load_gguf(path, target, summary=summary, progress=progress)
    t_read = time.perf_counter()

    progress(f"writing {out}: safetensors ({target}), config, tokenizer")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{secrets.token_hex(4)}")
    try:
        tmp.mkdir()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _byte_level_bpe(tmp / "tokenizer.json", path)
        _readable(tmp)
        weight_bytes = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        _move_into_place(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise ModelLoadError(f"{out}: cannot write it: {exc}") from exc
        raise
    t_end = time.perf_counter()
    return ImportResult(out, target, summary.architecture, summary.tensor_types,
                        bool(model.config.tie_word_embeddings) and not summary.has_output,
                        weight_bytes, {"read_convert": t_read - t0, "write": t_end - t_read,
                                       "total": t_end - t0})
