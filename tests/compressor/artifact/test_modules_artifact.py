"""CompressedLinear, compress_model and the artifact round trip (tiny random models)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from torch import nn

from compressor.artifact.in_memory import save_artifact
from compressor.artifact.native import (
    COMPRESSED,
    KEPT,
    MANIFEST,
    ArtifactError,
    load_compressed,
)
from compressor.checkpoint.loading import discover
from compressor.pipeline.compress import compress_model
from compressor.quant.decompose import decompose
from compressor.quant.decomposed import DecompositionConfig
from compressor.quant.hessian import collect_hessians, linear_weight
from compressor.runtime.modules import CompressedLinear, Runtime, replace_linear
from solver.bytes import Option, option_bytes
from tests.helpers.models import tiny_gpt2, tiny_qwen2, tokens

torch.set_num_threads(1)
FAST = DecompositionConfig(outer_iters=1, lr_iters=1)


def _mixed_options(inv) -> dict[str, Option]:
    opts = [Option(4, 8, 4, 32), Option(3, 0), Option(2, 13, 8, 128, True), Option(8, 5, 16, 16)]
    return {li.name: replace(opts[i % len(opts)], rank=0) if li.is_vocab else opts[i % len(opts)]
            for i, li in enumerate(inv.linears)}


@pytest.fixture(scope="module", params=["qwen2", "gpt2"])
def compressed(request, tmp_path_factory):
    model = tiny_qwen2() if request.param == "qwen2" else tiny_gpt2()
    inv = discover(model)
    seqs = tokens(6, 24)
    with torch.no_grad():
        ref_logits = model(input_ids=seqs).logits
    assignments = _mixed_options(inv)
    skip = {inv.linears[0].name}
    seen: list[str] = []
    decs = compress_model(model, assignments, seqs, FAST, skip=skip,
                          on_linear=lambda name, d: seen.append(name))
    out = tmp_path_factory.mktemp(request.param) / "artifact"
    manifest = save_artifact(model, None, decs, out, plan={"default": {"bits": 4}},
                             source_ref=None)
    return dict(model=model, inv=inv, seqs=seqs, ref=ref_logits, decs=decs, seen=seen,
                skip=skip, out=out, manifest=manifest, assignments=assignments)


def test_compress_model_replaces_and_reports(compressed) -> None:
    c = compressed
    mods = dict(c["model"].named_modules())
    todo = [li.name for li in c["inv"].linears if li.name not in c["skip"]]
    assert c["seen"] == todo and sorted(c["decs"]) == sorted(todo)
    for name in todo:
        assert isinstance(mods[name], CompressedLinear)
    for name in c["skip"]:
        assert not isinstance(mods[name], CompressedLinear)
    with torch.no_grad():
        logits = c["model"](input_ids=c["seqs"]).logits
    drift = (logits - c["ref"]).abs().max().item()
    assert 0 < drift < 0.5 * c["ref"].abs().max().item()


def test_compressed_linear_computes_q_plus_lr() -> None:
    lin = nn.Linear(40, 24)
    x = torch.randn(5, 7, 40)
    H = torch.eye(40)
    d = decompose(lin.weight.detach(), H, Option(3, 6, 4, 16), FAST)
    holder = nn.Sequential(lin)
    new = replace_linear(holder, "0", d)
    assert holder[0] is new and new.bias is lin.bias
    expect = x @ d.w_hat().T + lin.bias
    assert torch.allclose(new(x), expect, atol=1e-5)
    assert new.nbytes == option_bytes(24, 40, Option(3, 6, 4, 16))
    assert new._w is None                                       # packed: no dense Ŵ held
    assert torch.allclose(new.double()(x.double()), expect.double(), atol=1e-5)
    dense = CompressedLinear(d, lin.bias.detach().clone(), runtime=Runtime.DENSE)
    assert torch.allclose(dense(x), expect, atol=1e-5) and dense._w is not None
    assert torch.allclose(dense.double()(x.double()), expect.double(), atol=1e-5)  # cache follows
    assert dense.bfloat16().nbytes == new.nbytes                # dtype casts keep the format
    assert torch.equal(dense.weight_hat(), d.w_hat())
    with pytest.raises(ValueError):
        replace_linear(nn.Sequential(nn.Linear(41, 24)), "0", d)
    with pytest.raises(TypeError):
        replace_linear(nn.Sequential(nn.ReLU()), "0", d)


def test_conv1d_weight_orientation() -> None:
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(24, 40)   # nf=out 24, nx=in 40; weight [40, 24]
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    x = torch.randn(3, 40)
    d = decompose(linear_weight(conv).detach(), torch.eye(40), Option(8, 0, 4, 8), FAST)
    holder = nn.Sequential(conv)
    ref = conv(x)
    new = replace_linear(holder, "0", d)
    assert torch.allclose(new(x), ref, atol=0.05 * ref.abs().max().item())


def test_artifact_bytes_are_exact(compressed) -> None:
    c = compressed
    m = c["manifest"]
    accounted = sum(option_bytes(*d.shape, c["assignments"][n]) for n, d in c["decs"].items())
    with safe_open(c["out"] / COMPRESSED, "pt") as fh:
        on_disk = sum(fh.get_tensor(k).nbytes for k in fh.keys())
    assert on_disk == accounted == m.compressed_bytes == m.accounted_bytes
    inv = c["inv"]
    kept_expected = sum(k.nbytes for k in inv.kept)
    with safe_open(c["out"] / KEPT, "pt") as fh:
        kept_disk = sum(fh.get_tensor(k).nbytes for k in fh.keys())
    skipped = sum(li.numel * 4 for li in inv.linears if li.name in c["skip"])  # fp32, uncompressed
    assert kept_disk == m.kept_bytes == kept_expected + skipped


def test_save_load_same_outputs(compressed) -> None:
    c = compressed
    model, tok = load_compressed(c["out"])
    assert tok is None
    with torch.no_grad():
        a = c["model"](input_ids=c["seqs"]).logits
        b = model(input_ids=c["seqs"]).logits
    assert torch.allclose(a, b, atol=1e-5)
    gen = model.generate(c["seqs"][:1, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 9)


def test_manifest_contents(compressed) -> None:
    c = compressed
    data = json.loads((c["out"] / MANIFEST).read_text())
    assert data["plan"] == {"default": {"bits": 4}}
    assert {"torch", "transformers", "safetensors"} <= set(data["versions"])
    assert set(data["files"]) >= {COMPRESSED, KEPT, "config.json"}
    name = next(iter(c["decs"]))
    rec = data["linears"][name]
    assert rec["option"] == c["assignments"][name].to_dict()
    assert rec["config"]["outer_iters"] == 1 and rec["kind"] in ("linear", "conv1d")
    if "gpt2" in str(c["out"]):
        assert data["tied"] == {"lm_head.weight": "transformer.wte.weight"}


def test_tampered_artifact_is_refused(compressed, tmp_path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(c_out := compressed["out"], copy)
    assert not any(p.name.startswith(".") for p in c_out.parent.iterdir())  # no temp dirs left
    raw = bytearray((copy / KEPT).read_bytes())
    raw[-1] ^= 0xFF
    (copy / KEPT).write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="sha256"):
        load_compressed(copy)
    (copy / COMPRESSED).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_compressed(copy)
    with pytest.raises(ArtifactError):
        load_compressed(tmp_path)


def test_overwrite_is_atomic_and_idempotent(tmp_path) -> None:
    model = tiny_qwen2(seed=1, tie=True)
    seqs = tokens(4, 16)
    H = collect_hessians(model, seqs)
    inv = discover(model)
    assign = {li.name: Option(4, 0 if li.is_vocab else 4, 4, 64) for li in inv.linears}
    decs = compress_model(model, assign, seqs, FAST, hessians=H)
    out = tmp_path / "a"
    first = save_artifact(model, None, decs, out)
    second = save_artifact(model, None, decs, out)
    assert first.files == second.files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    loaded, _ = load_compressed(out)
    # the tied embedding is compressed once; the head reads the same packed tensor
    assert loaded.lm_head.q is loaded.model.embed_tokens.q
    assert first.linears["model.embed_tokens"]["kind"] == "tied"
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=seqs).logits, model(input_ids=seqs).logits,
                              atol=1e-5)
