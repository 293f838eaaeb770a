"""Execute a plan: the one entry point that compresses a model as a plan assigns it, writes the
artifact and measures it against the original (perplexity, KL, top-1, real bytes beside the
planned ones and the profile's predicted KL).

`execute_plan(model_ref, profile, plan, out_dir, config, store)` is what the service's compress
job, `bitplan compress` and `bitplan demo` call. Resumability is the store's: every finished
linear is handed to `store.put` before the next one starts, and a rerun decomposes only the
linears `store.done()` does not return. Hessians of the remaining linears always come from the
*original* model (CALDERA's setting: every layer is fitted to the uncompressed activations), so
a resumed run writes the same bytes as one that was never interrupted.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from safetensors.torch import load_file, save_file

import solver
from compressor.artifact import Manifest, load_compressed, save_artifact
from compressor.compress import compress_model
from compressor.decompose import Decomposed
from compressor.evaluate import eval_sequences, evaluate, reference_logprobs
from compressor.hessian import collect_hessians
from compressor.loading import load_model, load_tokenizer
from compressor.modules import replace_linear
from compressor.planning import predicted_kl
from compressor.profile import ProfileConfig, calibration
from compressor.profile_store import Profile

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]


class CompressStore(Protocol):
    """Where finished linears wait until the artifact is written (the resume point)."""

    def done(self) -> dict[str, Decomposed]: ...
    def put(self, name: str, dec: Decomposed) -> None: ...
    def clear(self) -> None: ...


class MemoryCompressStore:
    """No resume: finished linears live only in this process."""

    def __init__(self) -> None:
        self._done: dict[str, Decomposed] = {}

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

    def done(self) -> dict[str, Decomposed]:
        out: dict[str, Decomposed] = {}
        for meta in sorted(self._linears.glob("*.json")) if self._linears.is_dir() else []:
            rec = json.loads(meta.read_text())
            tensors = load_file(str(meta)[: -len(".json")] + ".safetensors")
            out[rec["name"]] = Decomposed.from_tensors(tensors, rec["record"])
        return out

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
    artifact: Path
    manifest: Manifest
    resumed: int            # linears taken from the store instead of decomposed
    metrics: dict           # ppl, kl, top1, eval_tokens, predicted_kl, planned/artifact bytes


def execute_plan(model_ref: str, profile: Profile, plan: solver.Plan, out_dir: Path,
                 config: ExecuteConfig | None = None, store: CompressStore | None = None,
                 progress: Progress | None = None) -> Executed:
    """Compress `model_ref` by `plan` into the artifact directory `out_dir` (written atomically
    by save_artifact), then measure it against the original on the test split."""
    config = config or ExecuteConfig()
    store = store if store is not None else MemoryCompressStore()
    report = progress or (lambda stage, frac: None)
    cfg = ProfileConfig.from_dict(profile.config)

    report("load", 0.0)
    model = load_model(model_ref, config.trust_remote_code, device=config.device)
    tok = load_tokenizer(model_ref, config.trust_remote_code)
    seqs = eval_sequences(tok, config.eval_seq_len, config.eval_seqs)
    ref = reference_logprobs(model, seqs)
    done = store.done()
    todo = [n for n in plan.assignments if n not in done]
    hessians = collect_hessians(model, calibration(tok, cfg), todo) if todo else {}
    for name, dec in done.items():
        replace_linear(model, name, dec)
    if done:
        log.info("resumes: %d linears already done", len(done))
    total = max(len(plan.assignments), 1)

    def on_linear(name: str, dec: Decomposed) -> None:
        store.put(name, dec)
        done[name] = dec
        report("linears", len(done) / total)

    compress_model(model, plan.assignments, calibration(tok, cfg), config=cfg.decomposition,
                   hessians=hessians, on_linear=on_linear, skip=set(done))
    report("save", 1.0)
    out_dir = Path(out_dir)   # an existing artifact there is replaced atomically
    manifest = save_artifact(model, tok, done, out_dir, plan=plan.to_dict(), source_ref=model_ref)
    report("evaluate", 1.0)
    compressed, _ = load_compressed(out_dir, device=config.device)
    res = evaluate(compressed, seqs, reference=ref)
    metrics = {"ppl": res.ppl, "kl": res.kl, "top1": res.top1, "eval_tokens": res.tokens,
               "predicted_kl": predicted_kl(profile, plan.assignments),
               "planned_bytes": plan.total_bytes, "artifact_tensor_bytes": manifest.total_bytes}
    return Executed(out_dir, manifest, len(plan.assignments) - len(todo), metrics)
