"""Layer discovery on Qwen2, Llama and GPT-2 (Conv1D) configs; remote code and pickle refusal."""

import json
import threading

import pytest
import torch
from transformers import LlamaForCausalLM, Qwen2ForCausalLM

from compressor.checkpoint.loading import (
    MODEL_CONSTRUCTION_LOCK,
    ModelLoadError,
    discover,
    inventory,
    load_model,
)
from tests.helpers.models import save_model, tiny_config, tiny_lm, write_tiny_model, written_config


def _qwen2():
    return tiny_lm("qwen2", None, vocab=300, hidden=64, intermediate=136, blocks=3, tie=True)


def test_discover_qwen2_gqa_and_tied_head():
    inv = discover(_qwen2())
    names = [li.name for li in inv.linears]
    # the block linears plus the tied embedding (first; one item for the embedding and head)
    assert len(names) == 3 * 7 + 1
    emb = inv.linears[0]
    assert (emb.name, emb.out_features, emb.in_features, emb.block, emb.kind, emb.has_bias) == (
        "model.embed_tokens", 300, 64, None, "tied", False)
    assert "lm_head" not in names and [li.is_vocab for li in inv.linears].count(True) == 1
    assert names[1:8] == [f"model.layers.0.{s}" for s in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    k = next(li for li in inv.linears if li.name == "model.layers.2.self_attn.k_proj")
    assert (k.out_features, k.in_features, k.block, k.kind, k.has_bias) == (32, 64, 2, "linear", True)
    down = next(li for li in inv.linears if li.name.endswith("1.mlp.down_proj"))
    assert (down.out_features, down.in_features) == (64, 136)
    kept = {p.name: p for p in inv.kept}
    # the tied embedding / head tensor is planned (once), not kept; q/k/v biases, norms are
    assert "model.embed_tokens.weight" not in kept and "lm_head.weight" not in kept
    assert inv.linear_params == 300 * 64 + sum(li.numel for li in inv.linears[1:])
    assert "model.layers.0.self_attn.q_proj.bias" in kept
    assert "model.norm.weight" in kept
    assert inv.num_blocks == 3


def test_discover_llama():
    cfg = tiny_config("llama", vocab=200, hidden=48, intermediate=100, kv_heads=4)
    inv = discover(LlamaForCausalLM(cfg))
    # 2 blocks × 7 linears, plus the untied embedding (first) and head (last)
    assert len(inv.linears) == 14 + 2
    assert all(not li.has_bias for li in inv.linears)
    ends = [(li.name, li.kind, li.block, li.out_features, li.in_features)
            for li in (inv.linears[0], inv.linears[-1])]
    assert ends == [("model.embed_tokens", "embedding", None, 200, 48),
                    ("lm_head", "head", None, 200, 48)]
    assert not any(li.is_vocab for li in inv.linears[1:-1])
    kept = {p.name for p in inv.kept}
    assert "model.norm.weight" in kept
    assert not {"lm_head.weight", "model.embed_tokens.weight"} & kept
    total = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    assert inv.linear_params + sum(p.nbytes for p in inv.kept) // 4 == total


def test_discover_gpt2_conv1d():
    inv = discover(tiny_lm("gpt2", None, vocab=100, hidden=32))
    by_name = {li.name: li for li in inv.linears}
    # the block Conv1Ds plus the tied token embedding (wte; the position embedding stays kept)
    assert set(by_name) == {f"transformer.h.{i}.{s}" for i in range(2)
                            for s in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
                            } | {"transformer.wte"}
    wte = by_name["transformer.wte"]
    assert (wte.kind, wte.block, wte.out_features, wte.in_features) == ("tied", None, 100, 32)
    assert inv.linears[0] is wte
    kept = {p.name for p in inv.kept}
    assert "transformer.wpe.weight" in kept and "transformer.wte.weight" not in kept
    assert "lm_head.weight" not in kept
    c_attn = by_name["transformer.h.0.attn.c_attn"]
    assert (c_attn.kind, c_attn.out_features, c_attn.in_features) == ("conv1d", 96, 32)
    assert by_name["transformer.h.1.mlp.c_fc"].out_features == 128


def test_inventory_matches_loaded_model_without_weights(tmp_path):
    path = save_model(_qwen2(), tmp_path / "m")
    inv = inventory(path)
    loaded = discover(load_model(path))
    assert [li.name for li in inv.linears] == [li.name for li in loaded.linears]
    assert inv.kept_bytes == loaded.kept_bytes


def test_remote_code_refused_by_default(tmp_path):
    path = save_model(_qwen2(), tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="remote code"):
        load_model(path)
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        inventory(path)


def test_pickle_only_checkpoint_refused(tmp_path):
    path = save_model(_qwen2(), tmp_path / "m")
    (path / "model.safetensors").unlink()
    torch.save({}, path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(path)


def test_unknown_model_id_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model("no-such-org/no-such-model-xyz")


def test_model_construction_is_serialised_with_loads(tmp_path):
    """transformers patches nn.Module.register_parameter process-wide while from_pretrained
    builds a model, so a model constructed in another thread at that moment gets parameters on
    the meta device (measured here: 64 of 200 constructions without the lock). load_model holds
    MODEL_CONSTRUCTION_LOCK; constructions that take it too are never hit."""
    path = write_tiny_model(tmp_path / "m", layers=1)
    cfg = written_config(blocks=1)
    stop = threading.Event()
    loads: list[int] = []

    def loader() -> None:
        while not stop.is_set():
            load_model(path)
            loads.append(1)

    t = threading.Thread(target=loader)
    t.start()
    try:
        meta = 0
        for _ in range(150):
            with MODEL_CONSTRUCTION_LOCK:
                model = Qwen2ForCausalLM(cfg)
            meta += any(p.device.type == "meta" for p in model.parameters())
    finally:
        stop.set()
        t.join()
    assert len(loads) > 0 and meta == 0
