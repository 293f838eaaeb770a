"""Execute a plan: the one entry point that compresses a model as a plan assigns it, writes the
artifact and measures it against the original (perplexity, KL, top-1, real bytes beside the
planned ones and the profile's predicted KL).

`execute_plan(model_ref, profile, plan, out_dir, config, store)` is what the service's compress
job, `bitplan compress` and `bitplan demo` call. Resumability is the store's: every finished
linear is handed to `store.put` (and written to the artifact) before the next one starts, and
a rerun decomposes only the linears `store.names()` does not list. Hessians of the remaining linears always come from the
*original* model (CALDERA's setting: every layer is fitted to the uncompressed activations), so
a resumed run writes the same bytes as one that was never interrupted.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file

import solver
from compressor.artifact.native import ArtifactLinears, ArtifactWriter, Manifest
from compressor.checkpoint.headers import block_index
from compressor.checkpoint.loading import load_tokenizer, vocab_modules
from compressor.checkpoint.memory import StageClock
from compressor.checkpoint.stream import BATCH, StreamedModel, write_kept
from compressor.pipeline.evaluate import eval_sequences, stream_evaluate
from compressor.pipeline.planning import predicted_kl
from compressor.pipeline.profile import ProfileConfig, calibration
from compressor.pipeline.profile_store import Profile
from compressor.pipeline.vocab import check_vocab_option, vocab_config, vocab_hessian
from compressor.quant.decompose import decompose
from compressor.quant.decomposed import Decomposed
from compressor.quant.hessian import HessianHooks, linear_weight

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]


class CompressStore(Protocol):
    """Where finished linears are kept for a rerun to resume from; read back one at a time."""

    def names(self) -> set[str]: ...
    def get(self, name: str) -> Decomposed: ...
    def put(self, name: str, dec: Decomposed) -> None: ...
    def clear(self) -> None: ...


class MemoryCompressStore:
    """Finished linears live only in this process (execute_plan without a store keeps none:
    each is in the artifact once decomposed)."""

    def __init__(self) -> None:
        self._done: dict[str, Decomposed] = {}

    def names(self) -> set[str]:
        return set(self._done)

    def get(self, name: str) -> Decomposed:
        return self._done[name]

    def done(self) -> dict[str, Decomposed]:
        return dict(self._done)

    def put(self, name: str, dec: Decomposed) -> None:
        self._done[name] = dec

    def clear(self) -> None:
        self._done.clear()


class DirCompressStore:
    """Finished linears as <dir>/linears/<name>.safetensors + .json, each written atomically
    (a worker killed mid-write leaves no torn record to resume from)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._linears = self.root / "linears"

    def _base(self, name: str) -> str:
        # names contain dots, so suffixes are appended, never substituted (with_suffix)
        return str(self._linears / name.replace("/", "_"))

    def names(self) -> set[str]:
        metas = sorted(self._linears.glob("*.json")) if self._linears.is_dir() else []
        return {json.loads(m.read_text())["name"] for m in metas}

    def get(self, name: str) -> Decomposed:
        base = self._base(name)
        rec = json.loads(Path(base + ".json").read_text())
        return Decomposed.from_tensors(load_file(base + ".safetensors"), rec["record"])

    def done(self) -> dict[str, Decomposed]:
        return {n: self.get(n) for n in sorted(self.names())}

    def put(self, name: str, dec: Decomposed) -> None:
        self._linears.mkdir(parents=True, exist_ok=True)
        base = self._base(name)
        save_file(dec.tensors(), base + ".safetensors.tmp")
        Path(base + ".safetensors.tmp").replace(base + ".safetensors")
        Path(base + ".json.tmp").write_text(json.dumps({"name": name, "record": dec.record()}))
        Path(base + ".json.tmp").replace(base + ".json")

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass(frozen=True)
class ExecuteConfig:
    """Where the math runs and what the artifact is measured on (the test split)."""

    device: str = "cpu"
    trust_remote_code: bool = False
    eval_seq_len: int = 256
    eval_seqs: int = 96


@dataclass(frozen=True)
class Executed:
    artifact: Path          # the artifact directory (native) or the .gguf file (gguf)
    manifest: Manifest | None   # native only
    resumed: int            # linears taken from the store instead of decomposed
    metrics: dict           # ppl, kl, top1, eval_tokens, predicted_kl, planned/artifact bytes
    tensor_bytes: int = 0   # every tensor as written (= the plan's total bytes)


def execute_plan(model_ref: str, profile: Profile, plan: solver.Plan, out_dir: Path,
                 config: ExecuteConfig | None = None, store: CompressStore | None = None,
                 progress: Progress | None = None) -> Executed:
    """Compress `model_ref` by `plan` into the artifact directory `out_dir` (written atomically
    by an ArtifactWriter), then measure it against the original on the test split.

    Streamed (compressor.checkpoint.stream): block j is read once for compression — the calibration
    activations of the *original* model flow through it, its Hessians are collected, its
    assigned linears decomposed and written to the artifact at once — then once more for the
    evaluation sweep, which reads each block's packed linears back from the artifact. Kept
    tensors are copied from the checkpoint at their stored dtype, in chunks. No step holds more
    than one block's linears (`store` may keep them all: a MemoryCompressStore does)."""
    config = config or ExecuteConfig()
    report = progress or (lambda stage, frac: None)
    cfg = ProfileConfig.from_dict(profile.config)
    clock = StageClock()

    report("load", 0.0)
    with clock.stage("load"):
        sm = StreamedModel(model_ref, config.trust_remote_code, device=config.device)
        tok = load_tokenizer(model_ref, config.trust_remote_code)
        seqs = eval_sequences(tok, config.eval_seq_len, config.eval_seqs)
    modules = dict(sm.model.named_modules())
    vocab = {li.name: li for li in vocab_modules(sm.model)}
    unknown = [n for n in plan.assignments
               if n not in modules or (block_index(n) is None and n not in vocab)]
    if unknown:
        raise KeyError(f"assignments name modules the model does not have: {unknown[:5]}")
    stored = store.names() & set(plan.assignments) if store is not None else set()
    todo = [n for n in plan.assignments if n not in stored]
    if stored:
        log.info("resumes: %d linears already done", len(stored))
    total = max(len(plan.assignments), 1)
    with ArtifactWriter(Path(out_dir), sm.model) as writer:
        for name in plan.assignments:   # one at a time from the store
            if name in stored:
                writer.add_linear(name, store.get(name))
        if todo:
            with clock.stage("compress"):
                _compress(sm, calibration(tok, cfg), plan, todo, cfg, store, writer,
                          lambda: report("linears", len(writer.linears) / total))
        report("save", 1.0)
        with clock.stage("save"):
            write_kept(sm, set(plan.assignments), writer)
            manifest = writer.finish(sm.model.config, tok, plan=plan.to_dict(),
                                     source_ref=model_ref, order=list(plan.assignments))
    report("evaluate", 1.0)
    with clock.stage("evaluate"):
        res = stream_evaluate(sm, seqs, ArtifactLinears(Path(out_dir), sm.device))
    metrics = {"ppl": res.ppl, "kl": res.kl, "top1": res.top1, "eval_tokens": res.tokens,
               "predicted_kl": predicted_kl(profile, plan.assignments),
               "planned_bytes": plan.total_bytes, "artifact_tensor_bytes": manifest.total_bytes,
               **clock.report(config.device)}
    return Executed(Path(out_dir), manifest, len(stored), metrics, manifest.total_bytes)


@torch.no_grad()
def planned_weights(sm: StreamedModel, calib: torch.Tensor, todo: list[str],
                    head_kinds: tuple[str, ...] = ("head",)
                    ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, str | None]]:
    """(name, W, H, vocabulary kind or None) of every linear in `todo`, block by block: the
    calibration stream is the original model's, each block's Hessians exist while it is
    resident, the embedding and head come last (vocab.py; `head_kinds` get the head's H).
    What every target's compression loop walks."""
    vocab = {li.name: li for li in vocab_modules(sm.model)}
    X = torch.cat([sm.inputs(calib[i:i + BATCH])[0] for i in range(0, len(calib), BATCH)])
    # an untied head's Hessian needs the final hidden states: then every block runs
    head = any(vocab[n].kind in head_kinds for n in todo if n in vocab)
    last = sm.num_blocks - 1 if head else max(
        (block_index(n) for n in todo if n not in vocab), default=-1)
    for j in range(last + 1):
        mine = [n for n in todo if block_index(n) == j]
        prefix = sm.block_name(j) + "."
        with sm.block(j) as blk:
            hooks = HessianHooks(blk, mine, prefix=prefix) if mine else None
            X = sm.run(blk, X)
            hessians = hooks.result(calib.numel()) if hooks else {}
            for name in mine:
                W = linear_weight(blk.get_submodule(name[len(prefix):])).detach().float()
                yield name, W, hessians.pop(name), None
                del W
    for name in (n for n in todo if n in vocab):   # the embedding and head (vocab.py)
        li = vocab[name]
        yield name, sm.vocab_weight(name), vocab_hessian(sm, li, X, head_kinds), li.kind


@torch.no_grad()
def _compress(sm: StreamedModel, calib: torch.Tensor, plan: solver.Plan, todo: list[str],
              cfg: ProfileConfig, store: CompressStore | None, writer: ArtifactWriter,
              on_linear: Callable[[], None]) -> None:
    """Decompose `todo` block by block (the calibration stream is the original model's); each
    linear goes to the store and the artifact as it is done, and is not kept."""
    vocab = {li.name: li for li in vocab_modules(sm.model)}
    for name in todo:
        if name in vocab:
            check_vocab_option(name, vocab[name].kind, plan.assignments[name])
    for name, W, H, kind in planned_weights(sm, calib, todo):
        t0 = time.perf_counter()
        config = cfg.decomposition if kind is None else vocab_config(cfg.decomposition, kind)
        dec = decompose(W, H, plan.assignments[name], config)
        del W, H
        _done(name, dec, plan, store, writer, t0)
        del dec
        on_linear()


def _done(name: str, dec: Decomposed, plan: solver.Plan, store: CompressStore | None,
          writer: ArtifactWriter, t0: float) -> None:
    """A finished linear to the store and the artifact."""
    if store is not None:
        store.put(name, dec)
    writer.add_linear(name, dec)
    log.info("%s %s: rel_h_err %.4f, %d bytes, %.2fs", name, plan.assignments[name],
             dec.rel_h_err, dec.nbytes, time.perf_counter() - t0)
