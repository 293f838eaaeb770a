"""A compressed-tensors model directory (the vLLM target), written streamed, and the LoRA
adapter directory of a plan's L·R.

The directory is what llm-compressor writes and what vLLM, transformers' compressed-tensors
integration and the compressed-tensors library load as they are (format from the library's
config classes — compressed_tensors.config / quantization.quant_config — not from its code):
- config.json: the source model's config in fp16 plus `quantization_config` =
  {"quant_method": "compressed-tensors", "format": "pack-quantized",
   "quantization_status": "compressed", "config_groups": {"group_k": {"targets": [module
   names], "weights": {num_bits, type "int", symmetric, strategy "group", group_size, …},
   "input_activations": null, …}}, "ignore": [dense modules, "lm_head"]} — one group per
  scheme the plan uses, its targets exact module names (vLLM matches names or "re:" regexes);
- model.safetensors: per quantized module `weight_packed` (I32 [rows, ceil(cols·b/32)]),
  `weight_scale` (F16 [rows, cols/group]) and `weight_shape` (I64 [2]); everything else (the
  embedding, norms, biases, dense modules, an untied head) in fp16 under its own name;
- the source's tokenizer and generation config.
The adapter (PEFT's LoRA layout: adapter_config.json with per-module `rank_pattern` and
`alpha_pattern` = rank, so every module's scaling α/r is 1, and the global `r` = `lora_alpha`
= the largest rank, so an engine reading only the global pair scales by 1 too;
adapter_model.safetensors with base_model.model.<module>.lora_A.weight [r, cols] and
.lora_B.weight [rows, r] in fp16) goes to `<dir>/adapter` when any module has a rank.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from compressor.artifact.safetensors_writer import SafetensorsWriter
from compressor.quant.ct_int import CTEncoded

MODEL_FILE, ADAPTER_DIR = "model.safetensors", "adapter"
FORMAT = "pack-quantized"
COPIED = ("generation_config.json",)


def weights_args(bits: int, group: int) -> dict:
    """A config group's `weights` (compressed-tensors QuantizationArgs)."""
    return {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group",
            "group_size": group, "dynamic": False, "actorder": None, "observer": "minmax",
            "block_structure": None, "observer_kwargs": {}}


def quantization_config(schemes: dict[str, tuple[int, int]], dense: list[str]) -> dict:
    """`quantization_config` for modules → (bits, group), the `dense` ones ignored."""
    by_scheme: dict[tuple[int, int], list[str]] = {}
    for name, s in schemes.items():
        by_scheme.setdefault(s, []).append(name)
    groups = {f"group_{k}": {"targets": sorted(names), "weights": weights_args(*s),
                             "input_activations": None, "output_activations": None,
                             "format": FORMAT}
              for k, (s, names) in enumerate(sorted(by_scheme.items()))}
    return {"quant_method": "compressed-tensors", "format": FORMAT,
            "quantization_status": "compressed", "config_groups": groups,
            "ignore": sorted(dense) + ["lm_head"], "kv_cache_scheme": None,
            "sparsity_config": {}, "transform_config": {}}


def fused_schemes(config: dict, groups: list[list[str]]) -> bool:
    """Whether every member of each of `groups` (modules vLLM fuses) has one scheme — one
    config group, or all ignored — in a written config.json's quantization_config."""
    qc = config["quantization_config"]
    where = {n: g for g, body in qc["config_groups"].items() for n in body["targets"]}
    where |= {n: "ignore" for n in qc["ignore"]}
    return all(len({where.get(n) for n in g}) == 1 and where.get(g[0]) for g in groups)


class CTModelWriter:
    """Writes one compressed-tensors model directory: `put` each planned module as it is
    encoded (its tensors spooled, never held), `put_dense` what stays in fp16, then `finish`.
    """

    def __init__(self, out_dir: Path, source_dir: Path, source_config: dict) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.source_dir = Path(source_dir)
        self.source_config = dict(source_config)
        self._writer = SafetensorsWriter(self.out / MODEL_FILE, metadata={"format": "pt"})
        self.schemes: dict[str, tuple[int, int]] = {}
        self.dense: list[str] = []
        self.ranks: dict[str, int] = {}
        self._lora: dict[str, torch.Tensor] = {}

    def put(self, name: str, enc: CTEncoded) -> None:
        self._writer.add(name + ".weight_packed", enc.packed())
        self._writer.add(name + ".weight_scale", enc.scale.contiguous())
        self._writer.add(name + ".weight_shape", torch.tensor(enc.shape, dtype=torch.int64))
        self.schemes[name] = (enc.bits, enc.group)
        if enc.rank:   # adapters are small (fp16 r·(rows + cols)): kept until finish
            self.ranks[name] = enc.rank
            self._lora[f"base_model.model.{name}.lora_A.weight"] = enc.lora_a.contiguous()
            self._lora[f"base_model.model.{name}.lora_B.weight"] = enc.lora_b.contiguous()

    def put_dense(self, name: str, t: torch.Tensor, *, module: bool = False) -> None:
        """A tensor kept as it is, in fp16 (`module`: a planned linear's weight, ignored)."""
        if t.is_floating_point():
            t = t.to(torch.float16)
        self._writer.add(name, t.contiguous())
        if module:
            self.dense.append(name.removesuffix(".weight"))

    def config(self) -> dict:
        cfg = self.source_config | {"torch_dtype": "float16", "dtype": "float16"}
        cfg["quantization_config"] = quantization_config(self.schemes, self.dense)
        return cfg

    def finish(self, tokenizer) -> Path:
        self._writer.finish()
        (self.out / "config.json").write_text(json.dumps(self.config(), indent=2))
        tokenizer.save_pretrained(self.out)
        for f in COPIED:
            if (self.source_dir / f).is_file():
                shutil.copyfile(self.source_dir / f, self.out / f)
        if self.ranks:
            write_adapter(self.out / ADAPTER_DIR, self.ranks, self._lora, self.out)
        return self.out

    def abort(self) -> None:
        self._writer.abort()


def serve_command(model_dir: Path) -> str:
    """The `vllm serve` line for a written directory: the base, and its adapter (requests then
    name the model "bitplan-lr" to get Q + L·R) when it has one. vLLM picks the kernels per
    scheme itself (Marlin for 4/8 bits, its mixed-precision W2–W7 A16 kernels otherwise)."""
    model_dir = Path(model_dir).resolve()
    line = f"vllm serve {model_dir} --dtype float16"
    cfg = model_dir / ADAPTER_DIR / "adapter_config.json"
    if cfg.is_file():
        rank = json.loads(cfg.read_text())["r"]
        line += (f" --enable-lora --max-lora-rank {rank} "
                 f"--lora-modules bitplan-lr={model_dir / ADAPTER_DIR}")
    return line


def write_adapter(out: Path, ranks: dict[str, int], tensors: dict[str, torch.Tensor],
                  base: Path) -> Path:
    """A PEFT LoRA adapter directory (module docstring) for `ranks` (module → rank)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    top = max(ranks.values())
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
           "r": top, "lora_alpha": top, "lora_dropout": 0.0, "bias": "none",
           "target_modules": sorted(ranks), "rank_pattern": dict(ranks),
           "alpha_pattern": dict(ranks), "fan_in_fan_out": False, "use_rslora": False,
           "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
           "inference_mode": True}
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out
