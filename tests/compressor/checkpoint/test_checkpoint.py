"""compressor.checkpoint.headers: torch-free checks of a checkpoint directory (weights shards, causal-LM
architecture, tokenizer files) and the layer inventory from config.json + safetensors headers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compressor.checkpoint.headers import (
    ModelLoadError,
    check_model_dir,
    header_inventory,
    read_header,
)
from compressor.checkpoint.loading import inventory, load_model, load_tokenizer
from tests.helpers.models import save_model, tiny_lm
from tests.helpers.paths import DEMO_MODEL, REPO


def _gpt2(path: Path) -> Path:
    return save_model(tiny_lm("gpt2", None, vocab=100, hidden=32), path)


def _llama(path: Path) -> Path:
    return save_model(tiny_lm("llama", None, vocab=200, hidden=48, intermediate=100), path)


def _qwen2_tied(path: Path) -> Path:
    return save_model(tiny_lm("qwen2", None, vocab=300, hidden=64, intermediate=136, blocks=3,
                              tie=True), path)


def _odd_width(path: Path) -> Path:
    """Widths that are no multiple of anything (group sizes, heads of 2 × 7), bf16 config."""
    model = tiny_lm("qwen2", None, vocab=131, hidden=42, intermediate=97, heads=3, kv_heads=1,
                    dtype="bfloat16")
    return save_model(model.to(torch.bfloat16), path)


def _bert(path: Path) -> Path:
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    return save_model(BertForMaskedLM(cfg), path)


def _key(inv) -> tuple:
    return (sorted(inv.linears, key=lambda li: li.name), sorted(inv.kept, key=lambda k: k.name),
            inv.num_blocks, inv.kept_bytes, inv.linear_params)


@pytest.mark.parametrize("build", [None, _gpt2, _llama, _qwen2_tied, _odd_width],
                         ids=["demo", "gpt2-conv1d", "llama", "qwen2-tied", "odd-width"])
def test_header_inventory_equals_skeleton_inventory(tmp_path, build):
    path = DEMO_MODEL if build is None else build(tmp_path / "m")
    from_headers, from_skeleton = header_inventory(path), inventory(path)
    assert _key(from_headers) == _key(from_skeleton)
    assert len(from_headers.linears) > 0


def test_header_inventory_details(tmp_path):
    gpt2 = {li.name: li for li in header_inventory(_gpt2(tmp_path / "g")).linears}
    c_attn = gpt2["transformer.h.0.attn.c_attn"]   # stored [in, out] = [32, 96]
    assert (c_attn.kind, c_attn.out_features, c_attn.in_features, c_attn.has_bias) == (
        "conv1d", 96, 32, True)
    assert "transformer.wte" in gpt2 and gpt2["transformer.wte"].kind == "tied"
    assert gpt2["transformer.wte"].block is None
    qwen = header_inventory(_qwen2_tied(tmp_path / "q"))
    kept = {k.name for k in qwen.kept}
    # the tied embedding is one planned item (named by the embedding), the head no other one
    assert "model.embed_tokens.weight" not in kept and "lm_head.weight" not in kept
    assert qwen.num_blocks == 3 and len(qwen.linears) == 21 + 1
    emb = qwen.linears[0]
    assert (emb.name, emb.kind, emb.block, emb.out_features, emb.in_features, emb.has_bias,
            emb.is_vocab) == ("model.embed_tokens", "tied", None, 300, 64, False, True)
    assert not any(li.is_vocab for li in qwen.linears[1:])
    assert "lm_head" not in {li.name for li in qwen.linears}
    odd = header_inventory(_odd_width(tmp_path / "o"))
    assert {k.dtype for k in odd.kept} == {"bfloat16"}
    assert odd.kept_bytes == 2 * sum(k.nbytes // 2 for k in odd.kept)
    # untied: the embedding first, the head last, each its own planned item
    assert [(li.name, li.kind, li.out_features, li.in_features)
            for li in (odd.linears[0], odd.linears[-1])] == [
        ("model.embed_tokens", "embedding", 131, 42), ("lm_head", "head", 131, 42)]
    assert sum(li.is_vocab for li in odd.linears) == 2
    assert not {"lm_head.weight", "model.embed_tokens.weight"} & {k.name for k in odd.kept}


def test_demo_inventory_numbers():
    """The demo (tied 4096 × 192 embedding): 84 block linears plus the tied embedding, planned;
    what is kept is the norms and q/k/v biases alone (34,560 bytes, float32)."""
    inv = header_inventory(DEMO_MODEL)
    assert inv.num_blocks == 12 and len(inv.linears) == 84 + 1
    emb = inv.linears[0]
    assert (emb.name, emb.kind, emb.block, emb.out_features, emb.in_features) == (
        "model.embed_tokens", "tied", None, 4096, 192)
    assert [li.name for li in inv.linears if li.is_vocab] == ["model.embed_tokens"]
    assert inv.linear_params == 4096 * 192 + sum(li.numel for li in inv.linears[1:])
    assert inv.kept_bytes == 34_560 == inventory(DEMO_MODEL).kept_bytes
    assert not any("embed" in k.name or "lm_head" in k.name for k in inv.kept)


def test_checkpoint_module_imports_neither_torch_nor_transformers():
    code = ("import sys\nimport compressor.checkpoint.headers as c\n"
            f"c.header_inventory(c.Path({str(DEMO_MODEL)!r}))\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]


# -- broken weights ------------------------------------------------------------------------------
def _copy_demo(tmp_path: Path) -> Path:
    d = tmp_path / "demo"
    shutil.copytree(DEMO_MODEL, d)
    return d


def _lfs_pointer(f: Path) -> None:
    f.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64
                 + "\nsize 25000000\n")


def _truncate(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])


def _bad_offsets(f: Path) -> None:
    """A header that promises a tensor past the end of the file (same header length)."""
    data = bytearray(f.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    b, e = header[name]["data_offsets"]
    header[name]["data_offsets"] = [b + 10 ** 9, e + 10 ** 9]
    raw = json.dumps(header).encode()
    f.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(data[8 + n:]))


def _trailing(f: Path) -> None:
    with f.open("ab") as fh:
        fh.write(b"\0" * 64)


def _garbage_header(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[:8] + b"\xff" * 16 + data[24:])


@pytest.mark.parametrize("damage,fragment", [
    (_lfs_pointer, "git lfs pull"),
    (_truncate, "truncated"),
    (_bad_offsets, "offsets"),
    (_garbage_header, "corrupt"),
    (_trailing, "trailing"),
], ids=["lfs-pointer", "truncated", "offsets-outside", "garbage-header", "trailing-bytes"])
def test_broken_weights_refused_up_front_in_one_line(tmp_path, damage, fragment):
    d = _copy_demo(tmp_path)
    damage(d / "model.safetensors")
    for call in (lambda: check_model_dir(d, "demo"), lambda: inventory(d),
                 lambda: load_model(d), lambda: load_tokenizer(d)):
        with pytest.raises(ModelLoadError) as info:
            call()
        msg = str(info.value)
        assert fragment in msg and "model.safetensors" in msg and "\n" not in msg, msg


def test_lfs_pointer_message_names_lfs(tmp_path):
    f = tmp_path / "model.safetensors"
    _lfs_pointer(f)
    with pytest.raises(ModelLoadError, match="Git LFS pointer"):
        read_header(f, "m")


def test_missing_shard_of_an_index_refused(tmp_path):
    d = _copy_demo(tmp_path)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors"):
        check_model_dir(d, "demo")


# -- architecture ----------------------------------------------------------------------------------
def test_bert_refused_by_config_and_every_loader(tmp_path):
    d = _bert(tmp_path / "bert")
    for call in (lambda: check_model_dir(d, "bert"), lambda: header_inventory(d),
                 lambda: inventory(d), lambda: load_model(d)):
        with pytest.raises(ModelLoadError) as info:
            call()
        msg = str(info.value)
        assert "BertForMaskedLM" in msg and "decoder-only causal LMs" in msg, msg


def test_causal_name_without_decoder_blocks_refused(tmp_path):
    d = _bert(tmp_path / "bert")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"architectures": ["BertLMHeadModel"]}))
    with pytest.raises(ModelLoadError, match="no decoder blocks"):
        check_model_dir(d, "bert")


# -- tokenizer files -------------------------------------------------------------------------------
def test_no_tokenizer_files_says_what_was_looked_for(tmp_path):
    d = tmp_path / "bare"
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(DEMO_MODEL / f, d / f)
    with pytest.raises(ModelLoadError) as info:
        load_tokenizer(d)
    msg = str(info.value)
    assert "NoneType" not in msg
    assert "tokenizer.json" in msg and "tokenizer.model" in msg and "none found" in msg, msg
