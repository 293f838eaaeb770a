"""Execute a GGUF plan: every planned tensor encoded by our own block encoders in the type the
plan gives it, written into a GGUF whose metadata, tokenizer and kept tensors are those of
llama.cpp's own converter's output (compressor.artifact.gguf_export), then measured against the
original on the test split from the very bytes written (decoded back, so what is measured is
what llama.cpp runs).

Streamed like the native target (execute.planned_weights): one block resident, its Hessians
from the original model's calibration stream; the writer holds at most one block's encoded
tensors before they reach the file. Written to `<out>/model.gguf` (atomically), beside the
converter's reference `<out>/reference.gguf` (bf16: the KLD baseline llama.cpp compares to)
and the plan alone as llama-quantize's `<out>/tensor-types.txt`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

import solver
from compressor.artifact.gguf_convert import check_convertible, convert_reference
from compressor.artifact.gguf_export import GGUFPlanWriter, tensor_plan, tensor_type_file
from compressor.checkpoint.loading import load_tokenizer
from compressor.checkpoint.memory import StageClock
from compressor.checkpoint.stream import StreamedModel
from compressor.pipeline.evaluate import eval_sequences, stream_evaluate
from compressor.pipeline.execute import ExecuteConfig, Executed, planned_weights
from compressor.pipeline.gguf_target import encode_for_plan
from compressor.pipeline.planning import predicted_kl
from compressor.pipeline.profile import ProfileConfig, calibration
from compressor.pipeline.profile_store import Profile
from compressor.pipeline.vocab import head_reads
from compressor.quant.gguf_blocks import decode_gguf

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]
MODEL_FILE, REFERENCE_FILE, TYPES_FILE = "model.gguf", "reference.gguf", "tensor-types.txt"


def gguf_tensor_data_bytes(path: Path) -> int:
    """Σ of a GGUF's tensor data bytes (what a plan's total counts; the file adds its header,
    metadata and alignment padding)."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)


class GGUFWeights(Mapping[str, torch.Tensor]):
    """The planned tensors of a written GGUF by our (Hugging Face) names, each decoded from its
    bytes (our decoder, equal to gguf-py's) and put back in the checkpoint's row order when
    asked for: the lazy mapping stream_evaluate takes, holding nothing between lookups."""

    def __init__(self, path: Path, names: Mapping[str, tuple[str, np.ndarray | None]],
                 device: torch.device | str = "cpu") -> None:
        import gguf

        self._reader = gguf.GGUFReader(str(path))
        self._tensors = {t.name: t for t in self._reader.tensors}
        self._names = dict(names)
        self.device = torch.device(device)

    def __getitem__(self, name: str) -> torch.Tensor:
        gguf_name, perm = self._names[name]
        t = self._tensors[gguf_name]
        rows, cols = int(t.shape[1]), int(t.shape[0])    # ggml's ne = [cols, rows]
        data = np.array(t.data).view(np.uint8).reshape(rows, -1)   # a copy: the map is read-only
        w = decode_gguf(data, t.tensor_type.name, cols)
        if perm is not None:     # file row i holds checkpoint row perm[i]
            w = w[torch.from_numpy(np.argsort(perm))]
        return w.to(self.device)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def execute_gguf(model_ref: str, profile: Profile, plan: solver.Plan, out_dir: Path,
                 config: ExecuteConfig | None = None, progress: Progress | None = None,
                 reference: Path | None = None) -> Executed:
    """Write `plan` as `<out_dir>/model.gguf` and measure it (module docstring). `reference`:
    the converter's GGUF of `model_ref` when the caller already made one (else it is made in
    `out_dir`)."""
    config = config or ExecuteConfig()
    report = progress or (lambda stage, frac: None)
    cfg = ProfileConfig.from_dict(profile.config)
    if cfg.target != "gguf":
        raise ValueError(f"profile {profile.key[:12]} is a {cfg.target} profile, not a gguf one")
    bad = [n for n, o in plan.assignments.items() if not o.gguf_type]
    if bad:
        raise ValueError(f"the plan gives {bad[0]} a {plan.assignments[bad[0]].label} option, "
                         f"not a GGUF type ({len(bad)} such)")
    check_convertible(model_ref)        # before any work
    clock = StageClock()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report("load", 0.0)
    with clock.stage("convert"):
        ref = reference or convert_reference(model_ref, out_dir / REFERENCE_FILE)
    with clock.stage("load"):
        sm = StreamedModel(model_ref, config.trust_remote_code, device=config.device)
        tok = load_tokenizer(model_ref, config.trust_remote_code)
        seqs = eval_sequences(tok, config.eval_seq_len, config.eval_seqs)
        names = tensor_plan(model_ref, ref, list(plan.assignments))
    missing = [n for n in plan.assignments if n not in names]
    if missing:
        raise KeyError(f"the GGUF has no tensor for {missing[:3]} (converter names: "
                       f"{len(names)} mapped)")
    types = {names[n][0]: o.gguf_type for n, o in plan.assignments.items()}
    (out_dir / TYPES_FILE).write_text(tensor_type_file(types))
    out = out_dir / MODEL_FILE
    total, done = max(len(plan.assignments), 1), 0
    perms = {g: p for g, p in names.values()}
    kinds = head_reads(cfg)     # the head, and a tied tensor read as one (vocab.py)
    with clock.stage("compress"), GGUFPlanWriter(ref, out, types, perms=perms) as writer:
        for name, W, H, kind in planned_weights(sm, calibration(tok, cfg),
                                                list(plan.assignments), kinds):
            t0 = time.perf_counter()
            opt = plan.assignments[name]
            enc = encode_for_plan(W, opt.gguf_type, H, lookup=kind not in (None, *kinds))
            writer.put(names[name][0], enc.data)     # rows in checkpoint order: π is the writer's
            log.info("%s %s: %d bytes, %.2fs", name, opt.gguf_type, enc.data.nbytes,
                     time.perf_counter() - t0)
            del W, H, enc
            done += 1
            report("linears", done / total)
    tensor_bytes = gguf_tensor_data_bytes(out)
    report("evaluate", 1.0)
    with clock.stage("evaluate"):
        res = stream_evaluate(sm, seqs, GGUFWeights(out, {n: names[n] for n in plan.assignments},
                                                    sm.device))
    metrics = {"ppl": res.ppl, "kl": res.kl, "top1": res.top1, "eval_tokens": res.tokens,
               "predicted_kl": predicted_kl(profile, plan.assignments),
               "planned_bytes": plan.total_bytes, "artifact_tensor_bytes": tensor_bytes,
               "file_bytes": out.stat().st_size, **clock.report(config.device)}
    return Executed(out, None, 0, metrics, tensor_bytes)
