"""What a Hugging Face checkpoint directory holds, read from config.json and safetensors headers
alone: validation (config, remote code, weights shards, architecture) and the layer inventory.

Imports neither torch nor transformers, so the API process can accept and validate plans
without them; compressor.checkpoint.loading (the CLI and the workers) runs the same checks before loading.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

_BLOCK_RE = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")
# The decoder block lists we support (`.layer.N.` is BERT-style encoders: not one of them).
_DECODER_BLOCK_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.\d+\.")
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
SUPPORTED = ("bitplan supports decoder-only causal LMs (config.json `architectures` naming a "
             "…ForCausalLM or …LMHeadModel class, decoder blocks named *.layers.N.*, *.h.N.* "
             "or *.blocks.N.*)")
# GPT-2 style models store their Conv1D weights as [in, out]; everyone else's as [out, in].
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt"})
HEAD_NAMES = ("lm_head",)
# The vocabulary tensors the plan covers besides the blocks' linears: the token embedding (a
# lookup of rows), the LM head (a linear), or one tensor that is both (tied embeddings).
VOCAB_KINDS = ("embedding", "head", "tied")
LFS_MAGIC = b"version https://git-lfs.github.com/spec/"
MAX_HEADER = 100_000_000
# Bytes per element of the safetensors dtypes, and of the dtype names configs use.
ST_DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                 "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
DTYPE_SIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
              "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "float8_e4m3fn": 1,
              "float8_e5m2": 1}
_ST_TO_TORCH = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


class ModelLoadError(ValueError):
    """A model reference that cannot be loaded; the message says why, for the user."""


@dataclass(frozen=True)
class LinearInfo:
    name: str            # module path, e.g. model.layers.3.mlp.down_proj
    out_features: int
    in_features: int
    block: int | None    # decoder block index, None outside the blocks
    kind: str            # "linear", "conv1d" (GPT-2 stores Conv1D weights transposed) or
                         # one of VOCAB_KINDS ([vocab, hidden]: embedding, head, tied)
    has_bias: bool

    @property
    def is_vocab(self) -> bool:
        return self.kind in VOCAB_KINDS

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


@dataclass(frozen=True)
class KeptParam:
    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int


@dataclass
class Inventory:
    linears: list[LinearInfo]
    kept: list[KeptParam]
    num_blocks: int
    config: dict = field(default_factory=dict)

    @property
    def kept_bytes(self) -> int:
        return sum(k.nbytes for k in self.kept)

    @property
    def linear_params(self) -> int:
        return sum(li.numel for li in self.linears)

    def to_dict(self) -> dict:
        return {"linears": [asdict(li) for li in self.linears],
                "kept": [asdict(k) | {"shape": list(k.shape)} for k in self.kept],
                "num_blocks": self.num_blocks}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str                 # safetensors dtype, e.g. "F32"
    shape: tuple[int, ...]
    start: int = field(default=0, compare=False)   # absolute byte offset of its data in the file


def block_index(name: str) -> int | None:
    m = _BLOCK_RE.search("." + name + ".")
    return int(m.group(1)) if m else None


def config_dtype(config: object) -> str | None:
    """The stored dtype a config names: `dtype` (transformers ≥ 4.56) or `torch_dtype` (older
    files), from a config.json dict or a PretrainedConfig, without the deprecated attribute."""
    if isinstance(config, dict):
        value = config.get("dtype") or config.get("torch_dtype")
    else:
        attrs = vars(config) if hasattr(config, "__dict__") else {}
        value = attrs.get("dtype") or attrs.get("torch_dtype")
    if value is None:
        return None
    return str(value).removeprefix("torch.")


# -- weights -----------------------------------------------------------------------------------
def read_header(f: Path, ref: str = "") -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes of one safetensors file, after checking (without reading
    the tensors) that the file is whole: the header parses, every tensor's bytes lie inside the
    file, match its dtype × shape, and the file ends where the last tensor does."""
    who = f"model {ref!r}: {f.name}" if ref else str(f)
    try:
        size = f.stat().st_size
        with f.open("rb") as fh:
            head = fh.read(max(8, len(LFS_MAGIC)))
            if head.startswith(LFS_MAGIC):
                raise ModelLoadError(f"{who} is a Git LFS pointer, not the weights (run "
                                     "`git lfs pull` in the model's repository)")
            if len(head) < 8:
                raise ModelLoadError(f"{who} is not a safetensors file ({size} bytes: empty or "
                                     "truncated download)")
            (n,) = struct.unpack("<Q", head[:8])
            if n > min(size - 8, MAX_HEADER):
                raise ModelLoadError(f"{who} is truncated or not a safetensors file (header "
                                     f"length {n} > file size {size})")
            fh.seek(8)
            raw = fh.read(n)
    except OSError as exc:
        raise ModelLoadError(f"{who} cannot be read: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw)
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{who} has a corrupt safetensors header (not a JSON object): "
                             "corrupt or incomplete download")
    tensors: dict[str, TensorInfo] = {}
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(x) for x in meta["data_offsets"])
            shape = tuple(int(d) for d in meta["shape"])
            dtype = str(meta["dtype"])
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(f"{who} has a corrupt safetensors header (bad entry for "
                                 f"{name!r})") from None
        numel = 1
        for d in shape:
            numel *= d
        want = numel * ST_DTYPE_SIZE[dtype] if dtype in ST_DTYPE_SIZE else stop - begin
        if not 0 <= begin <= stop or stop - begin != want or min(shape, default=0) < 0:
            raise ModelLoadError(f"{who} has a corrupt safetensors header (tensor {name!r}: "
                                 f"offsets {begin}..{stop} do not fit {dtype} {list(shape)})")
        if 8 + n + stop > size:
            raise ModelLoadError(f"{who} is truncated or corrupt: tensor {name!r} (offsets "
                                 f"{begin}..{stop}) lies past the end of the file ({size} "
                                 "bytes; incomplete download?)")
        end = max(end, stop)
        tensors[name] = TensorInfo(dtype, shape, 8 + n + begin)
    if size != 8 + n + end:   # past the end was refused above: these are trailing bytes
        raise ModelLoadError(f"{who} is corrupt: {size} bytes, but its tensors end at byte "
                             f"{8 + n + end} (trailing data)")
    return tensors


def weight_files(path: Path, ref: str) -> list[Path]:
    """The safetensors shards of a model directory (all of the index's, when there is one)."""
    files = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ModelLoadError(f"model {ref!r}: {index.name} is not a valid shard "
                                 "index") from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise ModelLoadError(f"model {ref!r}: weight shard {missing[0]} listed in "
                                 f"{index.name} is missing ({len(missing)} missing)")
    if not files:
        if any(any(path.glob(p)) for p in ("*.bin", "*.pt", "*.pth", "*.ckpt")):
            raise ModelLoadError(f"model {ref!r} has only pickle checkpoints (.bin/.pt); "
                                 "bitplan loads safetensors weights only")
        raise ModelLoadError(f"model {ref!r} has no .safetensors weights")
    return files


def read_weights(path: Path, ref: str) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for f in weight_files(path, ref):
        tensors |= read_header(f, ref)
    return tensors


# -- config ------------------------------------------------------------------------------------
def read_config(path: Path, ref: str, trust_remote_code: bool = False) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"model {ref!r} has no config.json: not a Hugging Face model "
                             "directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model {ref!r} has an unreadable config.json: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"model {ref!r} has a config.json that is not an object")
    if cfg.get("auto_map") and not trust_remote_code:
        raise ModelLoadError(
            f"model {ref!r} needs remote code (auto_map in config.json); refused because "
            "trust_remote_code is off (set BITPLAN_TRUST_REMOTE_CODE=1 to allow it)")
    if not (cfg.get("model_type") or cfg.get("architectures")):
        raise ModelLoadError(f"model {ref!r} has a config.json without model_type or "
                             "architectures: not a Hugging Face model config")
    return cfg


def check_causal_lm(cfg: dict, ref: str, tensor_names: set[str] | None = None) -> None:
    """Refuse anything but a decoder-only causal LM, from the config (and, given them, the
    weights' tensor names) alone."""
    archs = cfg.get("architectures") or []
    kind = f"model_type {cfg.get('model_type')!r}" if cfg.get("model_type") else "no model_type"
    if not isinstance(archs, list) or not archs:
        raise ModelLoadError(f"model {ref!r} ({kind}) names no architectures in config.json; "
                             + SUPPORTED)
    if not any(isinstance(a, str) and a.endswith(_CAUSAL_SUFFIXES) for a in archs):
        raise ModelLoadError(f"model {ref!r} is a {', '.join(map(str, archs))} ({kind}), not a "
                             "causal LM; " + SUPPORTED)
    if tensor_names is not None and not any(_DECODER_BLOCK_RE.search(n) for n in tensor_names):
        raise ModelLoadError(f"model {ref!r} ({', '.join(archs)}): no decoder blocks found in "
                             "its weights; " + SUPPORTED)


def check_model_dir(path: Path, ref: str, trust_remote_code: bool = False) -> dict:
    """Every up-front check of a local model directory; returns its config.json."""
    cfg = read_config(path, ref, trust_remote_code)
    tensors = read_weights(path, ref)
    check_causal_lm(cfg, ref, set(tensors))
    return cfg


def check_tokenizer_files(path: Path, ref: str) -> None:
    if any((path / f).is_file() for f in TOKENIZER_FILES):
        return
    found = " (only tokenizer_config.json)" if (path / "tokenizer_config.json").is_file() else ""
    raise ModelLoadError(f"model {ref!r} has no tokenizer files{found}: looked for "
                         "tokenizer.json, tokenizer_config.json, vocab.json + merges.txt, "
                         "vocab.txt, tokenizer.model, spiece.model, sentencepiece.bpe.model; "
                         "none found")


# -- inventory ---------------------------------------------------------------------------------
def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _is_buffer(name: str, info: TensorInfo) -> bool:
    """Buffers older checkpoints saved beside the parameters (GPT-2's causal mask, rotary
    inverse frequencies): not parameters, so not part of the inventory."""
    return (name.endswith(("attn.masked_bias", "rotary_emb.inv_freq"))
            or (name.endswith("attn.bias") and len(info.shape) == 4))


def tied_embeddings(cfg: dict) -> bool:
    # Absent from config.json means PretrainedConfig's default, which is True.
    return bool(cfg.get("tie_word_embeddings", True))


def _model_order(li: LinearInfo) -> tuple:
    """The embedding first, then the blocks' linears by block and name, then the head."""
    rank = {"embedding": 0, "tied": 0, "head": 2}.get(li.kind, 1)
    return rank, li.block or 0, _natural(li.name)


def vocab_items(cfg: dict, tensors: dict[str, TensorInfo], tied: bool) -> list[LinearInfo]:
    """The token embedding ([vocab, hidden]: the 2-D weight outside the blocks with `vocab_size`
    rows, not the head) and the head, or one "tied" item when they share a tensor."""
    vocab = cfg.get("vocab_size")
    embed = head = None
    for name, t in tensors.items():
        module, _, leaf = name.rpartition(".")
        if leaf != "weight" or len(t.shape) != 2 or block_index(module) is not None:
            continue
        if module.split(".")[-1] in HEAD_NAMES:
            head = (module, t)
        elif t.shape[0] == vocab and (embed is None or "emb" in module or "wte" in module):
            embed = (module, t)
    out = []
    if embed is not None:
        (name, t) = embed
        out.append(LinearInfo(name, t.shape[0], t.shape[1], None,
                              "tied" if tied else "embedding", False))
    if head is not None and not (tied and embed is not None):
        (name, t) = head
        out.append(LinearInfo(name, t.shape[0], t.shape[1], None, "head",
                              f"{name}.bias" in tensors))
    return out


def header_inventory(path: Path, ref: str = "", trust_remote_code: bool = False) -> Inventory:
    """The layer inventory of a local model from config.json and safetensors headers, equal to
    the meta-skeleton one (compressor.checkpoint.loading.inventory) up to order: linears are the 2-D
    `X.weight` tensors inside a decoder block (not the head), plus the vocabulary tensors
    (`vocab_items`); everything else is kept at the config's dtype (default float32) as the
    skeleton counts it."""
    ref = ref or str(path)
    cfg = read_config(path, ref, trust_remote_code)
    tensors = {n: t for n, t in read_weights(path, ref).items() if not _is_buffer(n, t)}
    check_causal_lm(cfg, ref, set(tensors))
    conv1d = cfg.get("model_type") in CONV1D_MODEL_TYPES
    linears: list[LinearInfo] = []
    compressed: set[str] = set()
    for name, t in tensors.items():
        module, _, leaf = name.rpartition(".")
        blk = block_index(module)
        if leaf != "weight" or len(t.shape) != 2 or blk is None:
            continue
        if module.split(".")[-1] in HEAD_NAMES:
            continue
        out_f, in_f = (t.shape[1], t.shape[0]) if conv1d else t.shape
        linears.append(LinearInfo(module, out_f, in_f, blk, "conv1d" if conv1d else "linear",
                                  f"{module}.bias" in tensors))
        compressed.add(name)
    tied = tied_embeddings(cfg)
    for li in vocab_items(cfg, tensors, tied):
        compressed.add(f"{li.name}.weight")
        linears.append(li)
    dtype = config_dtype(cfg) or "float32"
    kept = []
    for name, t in tensors.items():
        if name in compressed or (tied and name.split(".")[-2:-1] == ["lm_head"]):
            continue
        numel = 1
        for d in t.shape:
            numel *= d
        size = DTYPE_SIZE.get(dtype)
        kept.append(KeptParam(name, t.shape, dtype if size else _ST_TO_TORCH.get(t.dtype, dtype),
                              numel * (size or ST_DTYPE_SIZE.get(t.dtype, 4))))
    linears.sort(key=_model_order)
    kept.sort(key=lambda k: _natural(k.name))
    blocks = {li.block for li in linears if li.block is not None}
    inv = Inventory(linears, kept, (max(blocks) + 1) if blocks else 0, config=cfg)
    layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    if isinstance(layers, int) and layers != inv.num_blocks:
        raise ModelLoadError(f"model {ref!r}: its weights do not match its config (config.json "
                             f"has {layers} layers, the weights {inv.num_blocks} blocks)")
    return inv
