"""The packed runtime: unpacking primitives, packed vs dense-Ŵ logits on tiny models of three
families (odd widths and ranks, 16-bit linears, groups that do not divide the width), resident
bytes == planned bytes, and from_pretrained in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from compressor.artifact.in_memory import save_artifact
from compressor.artifact.native import load_compressed, read_manifest
from compressor.checkpoint.loading import discover
from compressor.pipeline.compress import compress_model
from compressor.quant.decomposed import Decomposed, DecompositionConfig, Rounding
from compressor.quant.grids import QuantizedTensor, pack
from compressor.runtime.modules import CompressedEmbedding, CompressedLinear, Runtime
from compressor.runtime.packed import PackedSpec, dequantize_rows, torch_packed_matmul, unpack_run
from service.settings import REPO_ROOT
from solver.bytes import Option, option_bytes
from tests.helpers.models import tiny_lm, tokens

torch.set_num_threads(1)
RTN = DecompositionConfig(q_rounding=Rounding.RTN, factor_rounding=Rounding.RTN, lr_iters=1)
OPTIONS = [Option(3, 5, 4, 16), Option(2, 13, 3, 7, True), Option(16, 0), Option(4, 8, 16, 32),
           Option(5, 3, 6, 24), Option(16, 4, 2, 9), Option(7, 0, 4, 128),
           Option(6, 2, 8, 10, True), Option(8, 1, 5, 11)]
# odd intermediate widths, head dims that are not powers of two (block Hadamards of 4, 8, 1)
SIZES = {"qwen2": dict(hidden=48, intermediate=90, heads=4, kv_heads=2),
         "llama": dict(hidden=56, intermediate=77, heads=4, kv_heads=2),
         "gpt2": dict(hidden=44, heads=4)}


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_unpack_run_matches_the_packer(bits) -> None:
    g = torch.Generator().manual_seed(bits)
    for count in (1, 7, 8, 9, 63, 1000):
        codes = torch.randint(0, 1 << bits, (count,), generator=g, dtype=torch.uint8)
        assert unpack_run(pack(codes, bits), bits, count).tolist() == codes.tolist()


@pytest.mark.parametrize("bits", [2, 3, 5, 8, 16])
@pytest.mark.parametrize("shape,gs,sym", [((37, 29), 8, False), ((70, 130), 128, True),
                                          ((13, 50), 16, False), ((1, 7), 3, True)])
def test_tiled_matmul_equals_dequantized(bits, shape, gs, sym) -> None:
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    qt = QuantizedTensor.quantize(W, bits, gs, sym)
    spec = PackedSpec(*shape, bits, gs, sym)
    dense = qt.dequantize()
    assert torch.equal(dequantize_rows(qt.packed, qt.meta.scale, qt.meta.zero, spec, 0,
                                       shape[0]), dense)
    x = torch.randn(5, shape[1])
    for tile in (8, 64, 1 << 18):   # one row tile of 8 rows … the whole tensor at once
        y = torch_packed_matmul(x, qt.packed, qt.meta.scale, qt.meta.zero, spec, tile)
        assert torch.allclose(y, x @ dense.T, rtol=1e-5, atol=1e-5)


def _artifact(family: str, tmp_path, tie: bool = False):
    model = tiny_lm(family, seed=3, tie=tie, **SIZES[family]) if family != "gpt2" else \
        tiny_lm(family, seed=3, **SIZES[family])
    inv = discover(model)
    # the embedding (and an untied head) are planned too: Q alone for a lookup
    assign = {li.name: replace(OPTIONS[i % len(OPTIONS)], rank=0) if li.is_vocab
              else OPTIONS[i % len(OPTIONS)] for i, li in enumerate(inv.linears)}
    seqs = tokens(4, 16)
    decs = compress_model(model, assign, seqs, RTN)
    out = tmp_path / family
    manifest = save_artifact(model, None, decs, out)
    return model, assign, manifest, out


def _resident(model) -> dict[str, int]:
    """Packed bytes per compressed module; a tied head reads the embedding's: counted once."""
    out, seen = {}, set()
    for n, m in model.named_modules():
        if isinstance(m, CompressedLinear | CompressedEmbedding) and id(m.q) not in seen:
            seen.add(id(m.q))
            out[n] = m.nbytes
    return out


@pytest.mark.parametrize("family", ["qwen2", "llama", "gpt2"])
def test_packed_logits_match_dense_and_bytes_match_plan(family, tmp_path, monkeypatch) -> None:
    _, assign, manifest, out = _artifact(family, tmp_path)
    packed, _ = load_compressed(out)
    dense, _ = load_compressed(out, runtime=Runtime.DENSE)
    resident = _resident(packed)
    assert set(resident) == set(assign)
    for name, nbytes in resident.items():
        shape = manifest.linears[name]["shape"]
        assert nbytes == option_bytes(*shape, assign[name]), name
    assert sum(resident.values()) == manifest.compressed_bytes
    seqs = tokens(3, 20, seed=5)
    with torch.no_grad():
        ref = dense(input_ids=seqs).logits
        # the packed path must never build a dense Ŵ
        monkeypatch.setattr(Decomposed, "w_hat", lambda *a, **k: pytest.fail("dense Ŵ built"))
        got = packed(input_ids=seqs).logits
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-5, rel
    assert all(m._w is None for m in packed.modules() if isinstance(m, CompressedLinear))
    gen = packed.generate(seqs[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 9)


def test_bf16_model_keeps_fp16_scales(tmp_path) -> None:
    """A bf16 load must not cast the stored fp16 scales (transformers would, via its loader)."""
    _, _, manifest, out = _artifact("qwen2", tmp_path, tie=True)
    from transformers import AutoModelForCausalLM

    import compressor.runtime.hf  # noqa: F401  (registers the quantization method)

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert model.model.norm.weight.dtype == torch.bfloat16
    # the compressed tied embedding looks up in the model's dtype; its head reads the same bytes
    assert model.model.embed_tokens(torch.tensor([[1, 2]])).dtype == torch.bfloat16
    assert model.lm_head.q is model.model.embed_tokens.q
    assert sum(_resident(model).values()) == manifest.compressed_bytes
    ref, _ = load_compressed(out)
    name = list(manifest.linears)[1]   # a block's linear (the first is the embedding)
    a, b = model.get_submodule(name), ref.get_submodule(name)
    for part in ("q", "l", "r"):
        for key, buf in getattr(a, part).named_buffers():
            assert torch.equal(buf, getattr(getattr(b, part), key)), (part, key)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=tokens(1, 8)).logits).all()


FRESH = """
import json, sys, torch
import compressor.runtime.hf
from transformers import AutoModelForCausalLM
from compressor.runtime.modules import CompressedLinear
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = torch.tensor([[1, 5, 9, 2]])
with torch.no_grad():
    logits = model(input_ids=ids).logits
gen = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
mods = [m for m in model.modules() if isinstance(m, CompressedLinear)]
print(json.dumps({"packed": len(mods), "runtime": sorted({m.runtime.value for m in mods}),
                  "bytes": sum(m.nbytes for m in mods), "logits": logits[0, -1].tolist(),
                  "generated": gen.shape[1], "quantized": bool(model.is_quantized),
                  "meta": sum(t.is_meta for t in model.state_dict().values())}))
"""


def test_from_pretrained_in_a_fresh_interpreter(tmp_path) -> None:
    _, assign, manifest, out = _artifact("llama", tmp_path, tie=True)
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "bitplan" and qc["format_version"] == 2
    name = next(iter(assign))
    assert qc["linears"][name]["option"] == assign[name].to_dict()
    assert read_manifest(out).format_version == 2
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", FRESH, str(out)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["packed"] == len(assign) and got["runtime"] == ["packed"]
    assert got["bytes"] == manifest.compressed_bytes and got["meta"] == 0
    assert got["generated"] == 10 and got["quantized"]
    here, _ = load_compressed(out)
    with torch.no_grad():
        want = here(input_ids=torch.tensor([[1, 5, 9, 2]])).logits[0, -1]
    assert torch.allclose(torch.tensor(got["logits"]), want, atol=1e-5)
