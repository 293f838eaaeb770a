"""A compressed-tensors export as the libraries load it, beside bitplan's own dequantized model:
what `bitplan bench compressed-tensors` and the target's tests compare.

- `library_model`: the directory loaded by transformers' compressed-tensors integration (which
  hands the weights to the compressed-tensors library to decompress), optionally with the
  adapter applied by PEFT — nothing of bitplan's in the path;
- `our_model`: the source model with each planned linear replaced by bitplan's own decode of the
  written tensors (compressor.pipeline.ct_execute.CTWeights: ŵ = q·s in fp16, + B·A);
- `compare`: KL(reference ‖ model) per token, top-1 agreement and the largest logit difference
  relative to the largest logit, over the same token sequences, full forward passes (the
  models these run on fit in memory; the export's own streamed measurement is execute_ct's).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compressor.artifact.ct_export import ADAPTER_DIR


def planned_modules(model_dir: Path) -> list[str]:
    qc = json.loads((Path(model_dir) / "config.json").read_text())["quantization_config"]
    return sorted({n for g in qc["config_groups"].values() for n in g["targets"]})


def library_model(model_dir: Path, *, adapter: bool = False, dtype: torch.dtype = torch.float16,
                  run_compressed: bool | None = None, compute_float32: bool = True):
    """The export loaded by transformers + compressed-tensors (+ PEFT with `adapter`).

    Loaded in fp16, its dtype, so the library decompresses each weight to ŵ = q·s in fp16 as
    vLLM's kernels do (a float32 load would compute q·s exactly instead: another model, by up
    to 2^-11 a weight). `compute_float32`: those decompressed weights are then moved into a
    plain float32 copy of the architecture, so the forward pass is not fp16 CPU arithmetic
    (a quantized model refuses `.float()`); PEFT wraps that copy (it needs nn.Linear weights,
    which a still-packed module lacks)."""
    from transformers import AutoConfig, AutoModelForCausalLM, CompressedTensorsConfig

    if compute_float32 or adapter:
        run_compressed = False if run_compressed is None else run_compressed
    kw = {} if run_compressed is None else {
        "quantization_config": CompressedTensorsConfig(run_compressed=run_compressed)}
    model = AutoModelForCausalLM.from_pretrained(Path(model_dir), dtype=dtype, **kw)
    if compute_float32:
        config = AutoConfig.from_pretrained(Path(model_dir))
        del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        want = plain.state_dict()
        got = {k: v.float() for k, v in model.state_dict().items() if k in want}
        missing = set(want) - set(got)   # quantization parameters (weight_scale …) are left out
        if missing:
            raise ValueError(f"the library's model lacks {sorted(missing)[:3]}")
        plain.load_state_dict(got)
        plain.tie_weights()
        model = plain
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, Path(model_dir) / ADAPTER_DIR)
    return model.eval()


@torch.no_grad()
def our_model(source: Path, model_dir: Path, *, adapter: bool = True):
    """The source's architecture (float32) holding bitplan's own decode of the written files:
    every planned linear from its stored codes and scales (+ B·A), every other tensor as the
    export stores it (fp16)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from compressor.artifact.ct_export import MODEL_FILE
    from compressor.pipeline.ct_execute import CTWeights

    model = AutoModelForCausalLM.from_pretrained(Path(source), dtype=torch.float32).eval()
    names = planned_modules(model_dir)
    weights = CTWeights(Path(model_dir), names, lora=adapter)
    for n in names:
        model.get_submodule(n).weight.copy_(weights[n])
    params = dict(model.named_parameters())
    with safe_open(str(Path(model_dir) / MODEL_FILE), "pt") as f:
        for key in f.keys():
            if key in params:
                params[key].copy_(f.get_tensor(key).float())
    return model


@torch.no_grad()
def compare(reference, model, seqs: torch.Tensor, batch: int = 4) -> dict:
    """KL(reference ‖ model) per token, top-1 agreement, and max |Δlogit| / max |logit|."""
    kl, agree, tokens = 0.0, 0, 0
    diff, scale = 0.0, 0.0
    for i in range(0, len(seqs), batch):
        x = seqs[i:i + batch]
        a = reference(x).logits.float()
        b = model(x).logits.float()
        la, lb = a.log_softmax(-1), b.log_softmax(-1)
        kl += float((la.exp() * (la - lb)).sum())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        tokens += x.numel()
        diff = max(diff, float((a - b).abs().max()))
        scale = max(scale, float(a.abs().max()))
    return {"kl": kl / tokens, "top1": agree / tokens, "max_logit_rel_diff": diff / scale,
            "tokens": tokens}
