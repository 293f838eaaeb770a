"""Execute a compressed-tensors plan: every planned linear rounded by GPTQ into the scheme the
plan gives it (compressor.quant.ct_int), with its LoRA factors when it has a rank, written as a
model directory vLLM and transformers load (compressor.artifact.ct_export), then measured
against the original on the test split from the very tensors written (read back and decoded:
what is measured is what an engine computes, ŵ = q·s in fp16 plus B·A).

Streamed like the other targets (execute.planned_weights): one block resident, its Hessians
from the original model's calibration stream; the writer spools each module's tensors as they
come. Written to `<out>/` (config.json, model.safetensors, tokenizer; `<out>/adapter` for L·R).
"""

from __future__ import annotations

import json
import logging
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

import solver
from compressor.artifact.ct_export import ADAPTER_DIR, MODEL_FILE, CTModelWriter
from compressor.checkpoint.headers import read_header
from compressor.checkpoint.loading import load_tokenizer
from compressor.checkpoint.memory import StageClock
from compressor.checkpoint.stream import StreamedModel
from compressor.pipeline.evaluate import eval_sequences, stream_evaluate
from compressor.pipeline.execute import ExecuteConfig, Executed, planned_weights
from compressor.pipeline.planning import predicted_kl
from compressor.pipeline.profile import ProfileConfig, calibration
from compressor.pipeline.profile_store import Profile
from compressor.quant.ct_int import dequantize_ct, encode_ct, unpack_int32
from solver.ct_schemes import CT_TARGET, DENSE_BITS

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]


class CTWeights(Mapping[str, torch.Tensor]):
    """The planned linears of a written compressed-tensors directory, each decoded from its
    stored tensors (ŵ = q·s in fp16, plus lora_B·lora_A from the adapter when it has one and
    `lora`): the lazy mapping stream_evaluate takes, holding nothing between lookups."""

    def __init__(self, model_dir: Path, names: list[str], device: torch.device | str = "cpu",
                 *, lora: bool = True) -> None:
        from safetensors import safe_open

        self.dir = Path(model_dir)
        self._names = list(names)
        self._file = safe_open(str(self.dir / MODEL_FILE), "pt")
        qc = json.loads((self.dir / "config.json").read_text())["quantization_config"]
        self._bits = {n: g["weights"]["num_bits"] for g in qc["config_groups"].values()
                      for n in g["targets"]}
        adapter = self.dir / ADAPTER_DIR / "adapter_model.safetensors"
        self._lora = safe_open(str(adapter), "pt") if lora and adapter.is_file() else None
        self._lora_keys = set(self._lora.keys()) if self._lora else set()
        self.device = torch.device(device)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._bits:   # a dense (ignored) module
            return self._file.get_tensor(name + ".weight").float().to(self.device)
        bits = self._bits[name]
        rows, cols = self._file.get_tensor(name + ".weight_shape").tolist()
        codes = unpack_int32(self._file.get_tensor(name + ".weight_packed"), bits, cols)
        w = dequantize_ct(codes, self._file.get_tensor(name + ".weight_scale"), bits).float()
        key = f"base_model.model.{name}.lora_A.weight"
        if key in self._lora_keys:
            b = self._lora.get_tensor(key.replace("lora_A", "lora_B")).float()
            w += b @ self._lora.get_tensor(key).float()
        return w.to(self.device)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def check_ct_plan(profile: Profile, plan: solver.Plan) -> None:
    cfg = ProfileConfig.from_dict(profile.config)
    if cfg.target != CT_TARGET:
        raise ValueError(f"profile {profile.key[:12]} is a {cfg.target} profile, not a "
                         f"{CT_TARGET} one")
    bad = [n for n, o in plan.assignments.items() if not o.ct]
    if bad:
        raise ValueError(f"the plan gives {bad[0]} a {plan.assignments[bad[0]].label} option, "
                         f"not a compressed-tensors scheme ({len(bad)} such)")


def write_ct(sm: StreamedModel, tok, calib: torch.Tensor, plan: solver.Plan, out_dir: Path,
             report: Progress) -> CTModelWriter:
    """Round and write every planned linear, then the tensors kept as they are (fp16)."""
    writer = CTModelWriter(out_dir, sm.path, json.loads((sm.path / "config.json").read_text()))
    total, done = max(len(plan.assignments), 1), 0
    try:
        for name, W, H, _kind in planned_weights(sm, calib, list(plan.assignments)):
            t0 = time.perf_counter()
            opt = plan.assignments[name]
            if opt.bits == DENSE_BITS:
                writer.put_dense(name + ".weight", W, module=True)
            else:
                writer.put(name, encode_ct(W, H, opt.bits, opt.group_size, opt.rank))
            log.info("%s %s: %.2fs", name, opt.label, time.perf_counter() - t0)
            del W, H
            done += 1
            report("linears", done / total)
        for key in kept_keys(sm, set(plan.assignments)):
            writer.put_dense(key, sm.ckpt.get(sm.ckpt_name(key)))
        writer.finish(tok)
    except BaseException:
        writer.abort()
        raise
    return writer


def kept_keys(sm: StreamedModel, planned: set[str]) -> list[str]:
    """State-dict keys written as they are: all but the planned weights and a tied head."""
    seen: set[int] = set()
    out = []
    for key, t in sm.model.state_dict(keep_vars=True).items():
        owner, _, leaf = key.rpartition(".")
        if id(t) in seen or (owner in planned and leaf == "weight"):
            continue
        seen.add(id(t))
        out.append(key)
    return out


def execute_ct(model_ref: str, profile: Profile, plan: solver.Plan, out_dir: Path,
               config: ExecuteConfig | None = None,
               progress: Progress | None = None) -> Executed:
    """Write `plan` as the compressed-tensors directory `out_dir` and measure it."""
    config = config or ExecuteConfig()
    report = progress or (lambda stage, frac: None)
    check_ct_plan(profile, plan)
    cfg = ProfileConfig.from_dict(profile.config)
    clock = StageClock()
    out_dir = Path(out_dir)
    report("load", 0.0)
    with clock.stage("load"):
        sm = StreamedModel(model_ref, config.trust_remote_code, device=config.device)
        tok = load_tokenizer(model_ref, config.trust_remote_code)
        seqs = eval_sequences(tok, config.eval_seq_len, config.eval_seqs)
    with clock.stage("compress"):
        write_ct(sm, tok, calibration(tok, cfg), plan, out_dir, report)
    tensor_bytes = written_bytes(out_dir)
    report("evaluate", 1.0)
    with clock.stage("evaluate"):
        res = stream_evaluate(sm, seqs, CTWeights(out_dir, list(plan.assignments), sm.device))
    metrics = {"ppl": res.ppl, "kl": res.kl, "top1": res.top1, "eval_tokens": res.tokens,
               "predicted_kl": predicted_kl(profile, plan.assignments),
               "planned_bytes": plan.total_bytes, "artifact_tensor_bytes": tensor_bytes,
               **clock.report(config.device)}
    return Executed(out_dir, None, 0, metrics, tensor_bytes)


def written_bytes(model_dir: Path) -> int:
    """Σ of the tensor bytes the directory stores, the model's and the adapter's: each file
    less its 8-byte length and JSON header (read_header checks the data has no holes)."""
    total = 0
    for f in (Path(model_dir) / MODEL_FILE,
              Path(model_dir) / ADAPTER_DIR / "adapter_model.safetensors"):
        if f.is_file():
            read_header(f)
            with f.open("rb") as fh:
                total += f.stat().st_size - 8 - struct.unpack("<Q", fh.read(8))[0]
    return total
