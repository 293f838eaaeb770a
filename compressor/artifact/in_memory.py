"""An artifact from a model held in memory (tests, small models): the kept tensors read from its
state dict, the compressed ones from `decomposed`, written through native.ArtifactWriter like
the streamed compression (compressor.pipeline.execute)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from compressor.artifact.native import ArtifactWriter, Manifest
from compressor.quant.decomposed import Decomposed


def _kept_state(model: nn.Module, names: set[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Everything in the state dict but the compressed linears' weights / packed buffers;
    tensors sharing storage are stored once (returns the tensors and alias → stored name)."""
    kept: dict[str, Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    state = model.state_dict(keep_vars=False)

    def ident(t: Tensor) -> tuple:
        return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype

    def compressed(key: str) -> bool:   # a linear's weight, or a compressed module's buffers
        owner, _, leaf = key.rpartition(".")
        return (owner in names and leaf != "bias") or owner.rpartition(".")[0] in names

    # and any alias of one: the head of a compressed tied embedding
    dropped = {ident(t) for key, t in state.items() if t.numel() and compressed(key)}
    for key, t in state.items():
        if compressed(key) or (t.numel() and ident(t) in dropped):
            continue
        if ident(t) in seen and t.numel():
            tied[key] = seen[ident(t)]
            continue
        seen[ident(t)] = key
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
    """Write an artifact from parts held in memory: `skeleton` only names the modules (it may
    live on the meta device), `kept` maps every kept tensor's name to its stored value (tied
    aliases in `tied`). Goes through ArtifactWriter, like the streamed compression."""
    with ArtifactWriter(out_dir, skeleton) as writer:
        for name, dec in decomposed.items():
            writer.add_linear(name, dec)
        for name, t in kept.items():
            writer.add_kept(name, t)
        for alias, stored in tied.items():
            writer.tie(alias, stored)
        return writer.finish(config, tokenizer, plan=plan, source_ref=source_ref)
