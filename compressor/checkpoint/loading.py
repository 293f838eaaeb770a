"""Load Hugging Face causal LMs and discover their compressible linears.

Safetensors only, `trust_remote_code` only when the caller (an operator setting) allows it.
Every entry point first runs compressor.checkpoint.headers's torch-free checks (config, remote code,
every weights shard's header, causal-LM architecture), so a bad checkpoint fails in one line.
Discovery runs on a meta-device skeleton built from the config, so listing the layers of a
large model never loads its weights.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch
from torch import nn

from compressor.checkpoint.headers import (  # also re-exported: the inventory types live there
    Inventory,
    KeptParam,
    LinearInfo,
    ModelLoadError,
    block_index,
    check_causal_lm,
    check_model_dir,
    check_tokenizer_files,
    config_dtype,
)
from compressor.runtime.modules import CompressedEmbedding, CompressedLinear


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def discover(model: nn.Module, head_names: tuple[str, ...] = ("lm_head",)) -> Inventory:
    """Every nn.Linear / Conv1D inside the decoder blocks is compressible, and so are the token
    embedding and the head (`vocab_modules`); all other parameters (norms, position
    embeddings, biases of compressed linears) are kept at their stored dtype."""
    linears: list[LinearInfo] = []
    compressed_weights: set[str] = set()
    for name, mod in model.named_modules():
        blk = block_index(name)
        if blk is None or name.split(".")[-1] in head_names:
            continue
        if isinstance(mod, nn.Linear):
            out_f, in_f = mod.out_features, mod.in_features
            kind = "linear"
        elif _is_conv1d(mod):
            in_f, out_f = mod.weight.shape  # Conv1D weight is [in, out]
            kind = "conv1d"
        else:
            continue
        linears.append(LinearInfo(name, out_f, in_f, blk, kind, mod.bias is not None))
        compressed_weights.add(f"{name}.weight")
    vocab = vocab_modules(model)
    vocab_weights = {id(model.get_submodule(li.name).weight) for li in vocab
                     if hasattr(model.get_submodule(li.name), "weight")}
    linears = [li for li in vocab if li.kind != "head"] + linears + [
        li for li in vocab if li.kind == "head"]
    kept = []
    seen: set[int] = set()
    for pname, p in model.named_parameters(remove_duplicate=False):
        if pname in compressed_weights or id(p) in seen or id(p) in vocab_weights:
            continue
        seen.add(id(p))  # a tensor shared by two modules is stored once
        kept.append(KeptParam(pname, tuple(p.shape), str(p.dtype).removeprefix("torch."),
                              p.numel() * p.element_size()))
    blocks = {li.block for li in linears if li.block is not None}
    return Inventory(linears, kept, (max(blocks) + 1) if blocks else 0)


def vocab_modules(model: nn.Module) -> list[LinearInfo]:
    """The input embedding ("embedding") and the output head ("head") as plannable items, or
    one "tied" item named by the embedding when both use one tensor (a compressed model's
    too: its CompressedEmbedding and head share one packed tensor)."""
    names = {id(m): n for n, m in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()

    def stored(m: nn.Module | None):
        if m is None:
            return None
        w = getattr(m, "weight", None)
        return w if w is not None else getattr(m, "q", None)

    def shape(m: nn.Module) -> tuple[int, int]:
        if isinstance(m, CompressedEmbedding):
            return m.num_embeddings, m.embedding_dim
        if isinstance(m, CompressedLinear):
            return m.out_features, m.in_features
        return tuple(m.weight.shape)

    out = []
    tied = head is not None and stored(head) is stored(emb)
    if emb is not None and len(shape(emb)) == 2:
        out.append(LinearInfo(names[id(emb)], *shape(emb), None,
                              "tied" if tied else "embedding", False))
    if head is not None and not tied and isinstance(head, nn.Linear | CompressedLinear):
        out.append(LinearInfo(names[id(head)], *shape(head), None, "head",
                              head.bias is not None))
    return out


def resolve(ref: str | os.PathLike, trust_remote_code: bool = False) -> Path | str:
    """A local directory is checked here; anything else is passed to the hub client as an id."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is not a directory")
        check_model_dir(path, str(ref), trust_remote_code)
        return path.resolve()
    return str(ref)


def load_config(ref: str | os.PathLike, trust_remote_code: bool = False):
    from transformers import AutoConfig

    target = resolve(ref, trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(target, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelLoadError(f"model {ref!r} needs remote code; refused because "
                                 "trust_remote_code is off") from exc
        raise ModelLoadError(f"cannot load config of {ref!r}: {exc}") from exc
    except OSError as exc:
        raise ModelLoadError(f"model {ref!r} not found locally or on the hub "
                             f"(offline={os.environ.get('HF_HUB_OFFLINE', '0')}): {exc}") from exc
    if getattr(config, "auto_map", None) and not trust_remote_code:
        raise ModelLoadError(f"model {ref!r} needs remote code; refused because "
                             "trust_remote_code is off")
    # local directories were checked with their weights in resolve(); hub ids by config here
    check_causal_lm({"architectures": config.architectures, "model_type": config.model_type},
                    str(ref))
    return config


def inventory(ref: str | os.PathLike, trust_remote_code: bool = False) -> Inventory:
    """Layer inventory from the config alone: a meta-device skeleton, no weights read."""
    from transformers import AutoModelForCausalLM

    config = load_config(ref, trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    inv = discover(skeleton)
    dtype = getattr(torch, config_dtype(config) or "float32")
    size = torch.tensor([], dtype=dtype).element_size()
    inv.kept = [KeptParam(k.name, k.shape, str(dtype).removeprefix("torch."),
                          int(torch.Size(k.shape).numel()) * size) for k in inv.kept]
    inv.config = config.to_dict()
    return inv


# transformers patches torch.nn.Module.register_parameter (and init flags) process-wide while it
# builds a model (init_empty_weights / no_init_weights), so a model built in another thread at
# the same moment can come out with parameters on the meta device. Every model construction of
# ours (service worker threads, the in-process queue) takes this lock.
MODEL_CONSTRUCTION_LOCK = threading.RLock()


def load_model(ref: str | os.PathLike, trust_remote_code: bool = False,
               device: str = "cpu", dtype: torch.dtype | None = torch.float32):
    """Load a causal LM (safetensors weights only) in eval mode; returns the model."""
    from transformers import AutoModelForCausalLM

    load_config(ref, trust_remote_code)  # validates remote-code and existence first
    target = resolve(ref, trust_remote_code)
    try:
        with MODEL_CONSTRUCTION_LOCK:
            model = AutoModelForCausalLM.from_pretrained(
                target, trust_remote_code=trust_remote_code, use_safetensors=True,
                dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load weights of {ref!r}: {exc}") from exc
    return model.to(device).eval()


def load_tokenizer(ref: str | os.PathLike, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    target = resolve(ref, trust_remote_code)
    if isinstance(target, Path):   # without any, AutoTokenizer fails with a NoneType TypeError
        check_tokenizer_files(target, str(ref))
    try:
        return AutoTokenizer.from_pretrained(target, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ModelLoadError(f"cannot load tokenizer of {ref!r}: {exc}") from exc
