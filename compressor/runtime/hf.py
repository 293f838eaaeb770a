"""bitplan as a transformers quantization method: importing this module registers it, so
`AutoModelForCausalLM.from_pretrained(artifact_dir)` returns the packed model (no remote code,
no pickles).

Registration goes through transformers' public API (`register_quantization_config`,
`register_quantizer`, transformers/quantizers/auto.py). The artifact's config.json carries
`quantization_config = {"quant_method": "bitplan", "format_version", "dtype", "packed_file",
"linears": {name: record}, "tied"}` where each record is `Decomposed.record()` (shape, rank,
option = bits/rank/factor_bits/group_size/symmetric, decomposition config incl. the Hadamard
seed) plus kind and has_bias — exactly the manifest's per-linear entries. Loading:
1. before weights: each listed linear is swapped for a `CompressedLinear` skeleton on meta;
2. transformers loads the kept tensors through `model.safetensors.index.json`, which maps
   only the kept keys (embeddings, norms, head, biases) to kept.safetensors;
3. after weights: the packed tensors are read from `packed_file` at their stored dtypes.
   (They bypass transformers' loader on purpose: it casts every floating tensor to the
   model dtype, and the fp16 scales must stay fp16 — a bf16 cast would lose 3 mantissa bits
   and change the bytes.)
Only `import compressor.runtime.hf` registers the method; `compressor` itself stays light because the
API process imports torch-free parts of it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils import cached_file
from transformers.utils.quantization_config import QuantizationConfigMixin

from compressor.runtime.modules import (
    CompressedEmbedding,
    CompressedLinear,
    PackedTensor,
    set_module,
)

log = logging.getLogger(__name__)

QUANT_METHOD = "bitplan"
FORMAT_VERSION = 2    # 2: config.json carries the quantization config; safetensors "pt"


class BitplanConfig(QuantizationConfigMixin):
    """The quantization config an artifact's config.json carries (see the module docstring)."""

    def __init__(self, linears: dict[str, dict], dtype: str = "float32",
                 packed_file: str = "compressed.safetensors", tied: dict | None = None,
                 format_version: int = FORMAT_VERSION, **kwargs) -> None:
        self.quant_method = QUANT_METHOD
        self.format_version = int(format_version)
        self.dtype = dtype
        self.packed_file = packed_file
        self.linears = dict(linears)
        self.tied = dict(tied or {})
        if self.format_version > FORMAT_VERSION:
            raise ValueError(f"bitplan artifact format {self.format_version} is newer than "
                             f"this code ({FORMAT_VERSION}); upgrade bitplan")


class BitplanQuantizer(HfQuantizer):
    """Loads a pre-quantized bitplan artifact; never quantizes on the fly (that is a plan's
    job: profile → solve → compress)."""

    requires_calibration = True
    requires_parameters_quantization = False

    def __init__(self, quantization_config: BitplanConfig, **kwargs) -> None:
        super().__init__(quantization_config, **kwargs)
        self._packed_path: str | None = None

    def validate_environment(self, *args, **kwargs) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and len(set(device_map.values())) > 1:
            raise ValueError("bitplan artifacts load onto one device; pass a single device")

    def _convert_model_for_quantization(self, model) -> None:
        # The base patches only modules listed for other methods (Llama4 experts) and imports
        # accelerate to do it; bitplan patches nothing there, and needs no accelerate.
        return None

    def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        # no dtype asked for: the one the artifact's kept tensors are stored in
        return dtype if dtype is not None else getattr(torch, self.quantization_config.dtype)

    def _process_model_before_weight_loading(self, model, **kwargs) -> None:
        cfg: BitplanConfig = self.quantization_config
        config = kwargs.get("config") or model.config
        ref = str(getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", ""))
        local = Path(ref) / cfg.packed_file
        self._packed_path = str(local) if local.is_file() else cached_file(ref, cfg.packed_file)
        for name, record in cfg.linears.items():
            old = model.get_submodule(name)
            if record.get("kind") in ("embedding", "tied"):
                # a lookup; a tied one's head reads the same packed tensor (modules.py)
                emb = CompressedEmbedding(record=record, device="meta", dtype=old.weight.dtype)
                if record["kind"] == "tied":
                    set_module(model, record["head"], emb.tie_head(
                        CompressedLinear(record=record, device="meta")))
                set_module(model, name, emb)
                continue
            new = CompressedLinear(record=record, device="meta")
            new.bias = old.bias if record.get("has_bias") else None
            set_module(model, name, new)

    @staticmethod
    def _packed_keys(model, aliases: bool = False) -> set[str]:
        """The packed buffers' keys (`aliases`: also under a tied head's path)."""
        return {f"{name}.{key}" for name, mod in model.named_modules(remove_duplicate=not aliases)
                if isinstance(mod, PackedTensor) for key, _ in mod.named_buffers()}

    def update_missing_keys(self, model, missing_keys: list[str], prefix: str) -> list[str]:
        # the packed buffers come from packed_file after loading; tied aliases are re-tied
        skip = self._packed_keys(model, aliases=True) | set(self.quantization_config.tied)
        return [k for k in missing_keys if k not in skip]

    def _process_model_after_weight_loading(self, model, **kwargs) -> None:
        cfg: BitplanConfig = self.quantization_config
        device = next(model.parameters()).device
        modules = dict(model.named_modules())
        with safe_open(self._packed_path, framework="pt", device=str(device)) as fh:
            names = set(fh.keys())
            for key in sorted(self._packed_keys(model)):
                if key not in names:
                    raise ValueError(f"{self._packed_path} lacks {key}")
                owner, _, leaf = key.rpartition(".")
                holder = modules[owner]
                t = fh.get_tensor(key)
                want = getattr(holder, leaf)
                if t.dtype == torch.float16:   # scales/zeros: held as their int16 bit patterns
                    t = t.view(torch.int16)
                if t.shape != want.shape or t.dtype != want.dtype:
                    raise ValueError(f"{key}: stored {tuple(t.shape)} {t.dtype}, the record "
                                     f"says {tuple(want.shape)} {want.dtype}")
                holder.register_buffer(leaf, t)
        for alias, stored in cfg.tied.items():
            owner, _, leaf = alias.rpartition(".")
            setattr(model.get_submodule(owner), leaf, model.get_parameter(stored))
        log.info("bitplan: %d packed linears from %s", len(cfg.linears),
                 os.path.basename(self._packed_path))

    def is_serializable(self, safe_serialization=None) -> bool:
        return False   # an artifact is written by compressor.artifact.native.ArtifactWriter

    @property
    def is_trainable(self) -> bool:
        return False


def _register() -> None:
    # idempotent: the registry raises on a second registration (e.g. a module reload)
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(BitplanConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(BitplanQuantizer)


_register()
