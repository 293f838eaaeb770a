"""A bitplan GGUF: llama.cpp's converter makes the reference from a tiny Llama (random weights, a
SentencePiece tokenizer trained here: the converter's SPM path needs no pre-tokenizer hash),
GGUFPlanWriter writes it again with the planned tensors in F16 / Q8_0 bytes we encode (gguf-py's
Q8_0 quantizer standing in for bitplan's encoders), and the result is checked against the
reference with GGUFReader — and, where llama.cpp's tools are built, run by llama-perplexity
and compared byte for byte with what llama-quantize makes from the same plan."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from compressor.artifact import gguf_convert as gc
from compressor.artifact.gguf_export import (
    GGUFPlanWriter,
    row_permutation,
    tensor_plan,
    tensor_type_file,
)
from compressor.checkpoint.tensor_reader import Checkpoint
from tests.helpers.llama_cpp import llama_cpp_bin as helper_bin
from tests.helpers.llama_cpp import llama_cpp_source as helper_source

REPO = Path(__file__).resolve().parents[2]
Q = gguf.GGMLQuantizationType
TEXT = ("the quick brown fox jumps over the lazy dog. def return self import if else for in "
        "None class\n")


def _source():
    helper_source()            # fetched when the cache lacks it (tests/helpers/llama_cpp.py)
    return gc.llama_cpp_source()


def _tiny_llama(out: Path) -> Path:
    import sentencepiece as spm
    out.mkdir(parents=True)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([f"{w} {i} {TEXT}" for i, w in enumerate(words)] * 20),
        model_writer=buf, vocab_size=320, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Path]:
    """(the tiny model's directory, its reference GGUF)."""
    _source()
    d = _tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny")
    return d, gc.convert_reference(d, d.parent / "ref.gguf")


def _encode(w: torch.Tensor, t: str) -> np.ndarray:
    """A stand-in for bitplan's encoders: rows of w in HF order, packed as type t."""
    w32 = w.float().numpy()
    q = w32.astype(np.float16) if t == "F16" else gguf.quants.quantize(w32, Q[t])
    return q.view(np.uint8).reshape(w32.shape[0], -1)


def _plan_types(plan, ffn="Q8_0", attn="F16", vocab="F16") -> dict[str, str]:
    return {g: ffn if ".ffn_" in g else attn if ".attn_" in g else vocab
            for g, _ in plan.values()}


def _write(model, out: Path, types, order=None) -> Path:
    d, ref = model
    plan = tensor_plan(d, ref)
    ckpt = Checkpoint(d)
    items = list(plan.items()) if order is None else order(list(plan.items()))
    with GGUFPlanWriter(ref, out, types, perms={g: p for g, p in plan.values()}) as w:
        for hf, (g, _) in items:
            w.put(g, _encode(ckpt.get(hf), types[g]))
    return out


def _kvs(reader) -> dict:
    return {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}


# -- finding llama.cpp and what its converter knows ---------------------------------------------
def test_the_version_is_the_build_scripts():
    script = (REPO / "scripts" / "build_llama_cpp.sh").read_text()
    assert re.search(r"^VERSION=(\S+)", script, re.M).group(1) == gc.LLAMA_CPP_PYTHON_VERSION


def test_a_missing_source_tree_says_to_run_make_llama_cpp(tmp_path, monkeypatch):
    monkeypatch.setenv(gc.SRC_ENV, str(tmp_path))
    with pytest.raises(gc.LlamaCppNotFound, match="make llama-cpp"):
        gc.llama_cpp_source()


def test_the_converter_knows_llama_and_refuses_an_unknown_architecture(tmp_path):
    src = _source()
    known = gc.known_architectures(src)
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"} <= known
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert gc.check_convertible(tmp_path) == "LlamaForCausalLM"
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FrobForCausalLM"]}))
    with pytest.raises(ValueError, match=rf"does not know architecture FrobForCausalLM "
                                         rf"\(known: .* {len(known)} architectures\)"):
        gc.check_convertible(tmp_path)
    with pytest.raises(ValueError, match="FrobForCausalLM"):   # before any work
        gc.convert_reference(tmp_path, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_the_reference_is_cached_and_a_failure_is_one_line(model, tmp_path):
    d, ref = model
    mtime = ref.stat().st_mtime_ns
    assert gc.convert_reference(d, ref) == ref and ref.stat().st_mtime_ns == mtime
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_attention_heads"] = None
    (bad / "config.json").write_text(json.dumps(cfg))
    lines: list[str] = []
    with pytest.raises(gc.ConversionError) as err:
        gc.convert_reference(bad, tmp_path / "bad.gguf", progress=lines.append)
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg and "Error" in msg
    assert lines and not list(tmp_path.glob("bad.gguf*"))


# -- names and rows ----------------------------------------------------------------------------
def _rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:   # conversion/llama.py permute
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def test_the_plan_maps_names_and_finds_the_rotary_permutation(model):
    d, ref = model
    plan = tensor_plan(d, ref)
    assert plan["model.layers.1.self_attn.q_proj.weight"][0] == "blk.1.attn_q.weight"
    assert plan["model.embed_tokens.weight"] == ("token_embd.weight", None)
    assert plan["lm_head.weight"] == ("output.weight", None)
    assert len(plan) == 2 + 2 * 7
    for g, perm in plan.values():
        if g.endswith(("attn_q.weight", "attn_k.weight")):
            rows = 64 if "attn_q" in g else 32
            n_head = 4 if "attn_q" in g else 2
            assert perm.tolist() == _rope_permute(np.arange(rows), n_head).tolist(), g
        else:
            assert perm is None, g
    # module names work as well as weight names
    assert tensor_plan(d, ref, ["model.layers.0.self_attn.k_proj"])[
        "model.layers.0.self_attn.k_proj"][0] == "blk.0.attn_k.weight"


def test_only_a_row_permutation_is_accepted():
    rng = np.random.default_rng(0)
    hf = rng.integers(0, 255, (6, 8), dtype=np.uint8)
    assert row_permutation("t", hf, hf) is None
    perm = np.array([3, 0, 5, 1, 4, 2])
    assert row_permutation("t", hf[perm], hf).tolist() == perm.tolist()
    dup = np.vstack([hf[:1], hf[:1], hf[2:]])                  # equal rows stay in order
    assert row_permutation("t", dup, dup) is None
    assert row_permutation("t", dup[[1, 0, 2, 3, 4, 5]], dup) is None
    scaled = hf.copy()
    scaled[2] ^= 1
    with pytest.raises(ValueError, match="t: row 2 .* transforms it"):
        row_permutation("t", scaled, hf)
    with pytest.raises(ValueError, match="split, fused or padded"):
        row_permutation("t", hf.reshape(3, 16), hf)


# -- the written GGUF --------------------------------------------------------------------------
def test_the_written_gguf_is_the_reference_with_our_tensors(model, tmp_path):
    d, ref = model
    plan = tensor_plan(d, ref)
    types = _plan_types(plan)
    out = _write(model, tmp_path / "plan.gguf", types)
    r, rr = gguf.GGUFReader(out), gguf.GGUFReader(ref)
    kv, ref_kv = _kvs(r), _kvs(rr)
    # every key of the reference, its value, its order; the two llama-quantize rewrites last
    assert list(kv)[-2:] == ["general.quantization_version", "general.file_type"]
    assert [k for k in kv if k in ref_kv][:-2] == [k for k in ref_kv if k not in list(kv)[-2:]]
    assert {k: v for k, v in kv.items() if k != "general.file_type"} == \
        {k: v for k, v in ref_kv.items() if k != "general.file_type"}
    assert kv["general.quantization_version"] == 2
    assert kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16   # most weights are F16
    assert len(ref_kv["tokenizer.ggml.tokens"]) == 320 and "chat_template" in str(list(kv))

    ref_t = {t.name: t for t in rr.tensors}
    names = [t.name for t in r.tensors]
    assert sorted(names) == sorted(ref_t)
    assert names[-2:] == ["output.weight", "token_embd.weight"]   # vocabulary last
    ckpt = Checkpoint(d)
    for t in r.tensors:
        rt = ref_t[t.name]
        assert t.shape.tolist() == rt.shape.tolist()
        if t.name not in types:          # norms: as the reference, byte for byte
            assert t.tensor_type == rt.tensor_type and np.array_equal(t.data, rt.data)
            continue
        assert t.tensor_type.name == types[t.name]
        hf = next(h for h, (g, _) in plan.items() if g == t.name)
        perm = plan[hf][1]
        w = ckpt.get(hf).float().numpy()
        w = w if perm is None else w[perm]
        got = gguf.quants.dequantize(t.data, t.tensor_type)
        want = (w.astype(np.float16).astype(np.float32) if types[t.name] == "F16" else
                gguf.quants.dequantize(gguf.quants.quantize(w, Q.Q8_0), Q.Q8_0))
        np.testing.assert_array_equal(got, want, err_msg=t.name)
        # and rows line up with the reference's (bf16) rows
        ref_w = gguf.quants.dequantize(rt.data, rt.tensor_type)
        np.testing.assert_allclose(got, ref_w, atol=2e-3 if types[t.name] == "F16" else 5e-3)


def test_put_order_does_not_change_the_file(model, tmp_path):
    d, ref = model
    types = _plan_types(tensor_plan(d, ref), attn="Q8_0")
    a = _write(model, tmp_path / "a.gguf", types)
    b = _write(model, tmp_path / "b.gguf", types, order=lambda items: items[::-1])
    c = _write(model, tmp_path / "c.gguf", types,
               order=lambda items: sorted(items, key=lambda it: (it[1][0].count("."), it[0])))
    assert a.read_bytes() == b.read_bytes() == c.read_bytes()
    assert gguf.GGUFReader(a).fields["general.file_type"].contents() == \
        gguf.LlamaFileType.MOSTLY_Q8_0


def test_block_by_block_puts_buffer_about_a_block(model, tmp_path):
    d, ref = model
    plan = tensor_plan(d, ref)
    types = _plan_types(plan)
    ckpt = Checkpoint(d)
    with GGUFPlanWriter(ref, tmp_path / "x.gguf", types,
                        perms={g: p for g, p in plan.values()}) as w:
        for hf, (g, _) in sorted(plan.items(), key=lambda it: (".layers." not in it[0], it[0])):
            w.put(g, _encode(ckpt.get(hf), types[g]))
            assert w.buffered_bytes < 64 * 128 * 2 * 3   # never more than a block's ffn
    assert w.peak_buffered_bytes > 0


def test_a_tensor_never_put_is_an_error_and_leaves_no_file(model, tmp_path):
    d, ref = model
    plan = tensor_plan(d, ref)
    types = _plan_types(plan)
    out = tmp_path / "m.gguf"
    w = GGUFPlanWriter(ref, out, types, perms={g: p for g, p in plan.values()})
    ckpt = Checkpoint(d)
    for hf, (g, _) in plan.items():
        if g != "blk.1.attn_v.weight":
            w.put(g, _encode(ckpt.get(hf), types[g]))
    with pytest.raises(ValueError, match=r"blk\.1\.attn_v\.weight was never put \(1 missing\)"):
        w.close()
    assert not list(tmp_path.iterdir())


def test_bad_puts_and_plans_are_refused(model, tmp_path):
    d, ref = model
    with pytest.raises(ValueError, match="no tensor blk.9.attn_q.weight"):
        GGUFPlanWriter(ref, tmp_path / "x.gguf", {"blk.9.attn_q.weight": "Q8_0"})
    with pytest.raises(ValueError, match="only 2-D"):
        GGUFPlanWriter(ref, tmp_path / "x.gguf", {"blk.0.attn_norm.weight": "Q8_0"})
    with pytest.raises(ValueError, match="unknown GGUF type"):
        GGUFPlanWriter(ref, tmp_path / "x.gguf", {"blk.0.attn_q.weight": "Q9_9"})
    with pytest.raises(ValueError, match="blocks of 256"):          # a 64-wide row
        GGUFPlanWriter(ref, tmp_path / "x.gguf", {"blk.0.attn_q.weight": "Q4_K"})
    w = GGUFPlanWriter(ref, tmp_path / "x.gguf", {"blk.0.attn_q.weight": "Q8_0"},
                       max_buffered_bytes=0)
    with pytest.raises(ValueError, match=r"uint8 rows \[64, 68\]"):
        w.put("blk.0.attn_q.weight", np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match="not a planned tensor"):
        w.put("blk.0.attn_k.weight", np.zeros((32, 68), np.uint8))
    w.put("blk.0.attn_q.weight", np.zeros((64, 68), np.uint8))
    with pytest.raises(ValueError, match="put twice"):
        w.put("blk.0.attn_q.weight", np.zeros((64, 68), np.uint8))
    w.close()
    w = GGUFPlanWriter(ref, tmp_path / "y.gguf", {"output.weight": "F16",
                                                  "blk.1.attn_q.weight": "F16"},
                       max_buffered_bytes=1000)
    with pytest.raises(ValueError, match="wait for blk.1.attn_q.weight, over the 1000-byte"):
        w.put("output.weight", np.zeros((320, 128), np.uint8))
    assert not (tmp_path / "y.gguf").exists()


def test_the_tensor_type_file():
    text = tensor_type_file({"blk.1.attn_q.weight": "Q4_K", "token_embd.weight": "Q8_0",
                             "blk.10.ffn_down.weight": "IQ4_NL"})
    assert text == ("^blk\\.1\\.attn_q\\.weight$=q4_k\n^token_embd\\.weight$=q8_0\n"
                    "^blk\\.10\\.ffn_down\\.weight$=iq4_nl\n")
    # llama-quantize searches each pattern as a regex in the name: anchored, 1 is not 10
    pat = text.split()[0].split("=")[0]
    assert re.search(pat, "blk.1.attn_q.weight") and not re.search(pat, "blk.11.attn_q.weight")
    assert tensor_type_file({}) == ""


# -- llama.cpp runs it ---------------------------------------------------------------------------
def _bin() -> Path:
    helper_bin()               # built when the cache lacks it
    return gc.llama_cpp_bin()


def _perplexity(b: Path, model: Path, text: Path) -> float:
    """llama-perplexity's estimate for `model` over two 32-token chunks. Its log lines go
    through a logging thread that exit sometimes cuts short, so a run whose numbers were lost
    (exit status 0, no estimate) is run again."""
    for _ in range(3):
        p = subprocess.run([str(b / "llama-perplexity"), "-m", str(model), "-f", str(text),
                            "-c", "32", "--chunks", "2", "-t", "2"],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        out = p.stdout + p.stderr
        found = (re.findall(r"Final estimate: PPL = ([\d.]+)", out)
                 or re.findall(r"\[2\]([\d.]+),", out))
        if found:
            return float(found[-1])
    raise AssertionError(f"llama-perplexity printed no estimate: {out[-3000:]}")


@pytest.mark.slow
def test_llama_cpp_runs_it_and_llama_quantize_makes_the_same_tensors(model, tmp_path):
    b = _bin()
    d, ref = model
    types = _plan_types(tensor_plan(d, ref), attn="Q8_0", vocab="Q8_0")
    for g in types:
        if g.endswith(("attn_v.weight", "attn_output.weight")):
            types[g] = "F16"
    ours = _write(model, tmp_path / "ours.gguf", types)
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 30)
    ppl = _perplexity(b, ours, text)
    assert 1.0 < ppl < 1000      # random weights, 320 tokens: about the vocabulary size

    plan_file = tmp_path / "plan.txt"
    plan_file.write_text(tensor_type_file(types))
    theirs = tmp_path / "theirs.gguf"
    q = subprocess.run([str(b / "llama-quantize"), "--tensor-type-file", str(plan_file),
                        str(ref), str(theirs), "Q8_0", "2"],
                       capture_output=True, text=True, timeout=300)
    assert q.returncode == 0, q.stderr[-3000:]
    r, t = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    assert list(_kvs(r).items()) == list(_kvs(t).items())   # same keys, values and order
    theirs_t = {x.name: x for x in t.tensors}
    for x in r.tensors:
        y = theirs_t[x.name]
        assert (x.tensor_type, x.shape.tolist()) == (y.tensor_type, y.shape.tolist()), x.name
        assert np.array_equal(np.asarray(x.data), np.asarray(y.data)), x.name
