"""A linear planned at 16 bits is kept dense: its stored Q is exactly the fp16 weight (no
rotation, no scales), its bytes are solver.bytes.fp16_bytes, and it survives save/load."""

from __future__ import annotations

import torch
from safetensors import safe_open

from compressor.artifact.in_memory import save_artifact
from compressor.artifact.native import COMPRESSED, load_compressed
from compressor.checkpoint.loading import discover
from compressor.pipeline.compress import compress_model
from compressor.quant.decomposed import DecompositionConfig
from compressor.quant.hessian import linear_weight
from solver.bytes import Option, fp16_bytes
from tests.helpers.models import tiny_qwen2, tokens

DENSE = "model.layers.0.mlp.down_proj"


def test_fp16_assignment_keeps_the_linear_dense(tmp_path) -> None:
    torch.set_num_threads(1)
    model = tiny_qwen2()
    inv = discover(model)
    original = linear_weight(model.get_submodule(DENSE)).detach().clone()
    assignments = {li.name: Option(4, 0 if li.is_vocab else 8, 4, 32) for li in inv.linears}
    assignments[DENSE] = Option(16, 0)
    seqs = tokens(4, 16)
    decs = compress_model(model, assignments, seqs, DecompositionConfig(lr_iters=1))
    dec = decs[DENSE]
    m, n = original.shape
    assert dec.nbytes == fp16_bytes(m, n) and dec.rank == 0
    assert set(dec.tensors()) == {"q.packed"}                 # plain fp16: no scales, no factors
    assert torch.equal(dec.w_hat(), original.half().float())  # exactly the fp16 weight
    assert dec.rel_fro_err < 1e-3
    save_artifact(model, None, decs, tmp_path / "art", plan={"default": {"bits": 4}},
                  source_ref=None)
    with safe_open(tmp_path / "art" / COMPRESSED, "pt") as fh:
        assert fh.get_tensor(f"{DENSE}.q.packed").nbytes == fp16_bytes(m, n)
    loaded, _ = load_compressed(tmp_path / "art")
    again = loaded.get_submodule(DENSE).weight_hat()
    assert torch.equal(again, original.half().float())
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=seqs).logits, model(input_ids=seqs).logits,
                              atol=1e-5)
