"""`bitplan import-gguf`: a GGUF (here a tiny Llama written by bench/tiny_gguf.py) becomes a
Hugging Face model directory that loads with transformers and computes what transformers' own
GGUF load computes; a tied head stays tied; bad input fails in one line naming the file and
leaves no directory behind."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.tiny_gguf import gguf_name, tiny_llama_weights, tiny_tokenizer, write_tiny_llama_gguf
from compressor.checkpoint.gguf_import import inspect_gguf

TEXT = "Hello world, it's a test of the planner: 42 bits!"
IDS = [[5, 17, 100, 250, 3, 42, 7, 299]]


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    from service.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:        # argparse's own errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _tensors(out) -> dict[str, torch.Tensor]:
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _direct_logits(gguf, dtype) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=dtype).eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits


def _logits(out) -> tuple[torch.Tensor, AutoModelForCausalLM]:
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype="auto").eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits, model


def test_quantized_gguf_imports_as_bf16_with_tied_head_and_tokenizer(tmp_path, capsys):
    gguf = write_tiny_llama_gguf(tmp_path / "tiny.gguf", tied=True, quant="Q8_0")
    out = tmp_path / "model"
    code, stdout, err = _run(["import-gguf", str(gguf), "--out", str(out)], capsys)
    assert code == 0, err
    for stage in ("reading", "converting", "writing"):
        assert any(ln.startswith(stage) for ln in err.splitlines()), err
    result = json.loads(stdout)
    assert result["dtype"] == "bfloat16" and result["tied"] is True
    assert result["source_types"] == {"Q8_0": 14, "F32": 6}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp dir left

    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["num_hidden_layers"] == 2
    tensors = _tensors(out)
    assert "lm_head.weight" not in tensors and len(tensors) == 20
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}

    logits, model = _logits(out)
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # transformers' own GGUF load at the same dtype: the same weights, so the same numbers
    torch.testing.assert_close(logits, _direct_logits(gguf, torch.bfloat16), rtol=0, atol=0)
    # …and within bf16's rounding (a few parts in a thousand a weight, through two blocks) of
    # the float32 dequantized model
    full = _direct_logits(gguf, torch.float32)
    assert (logits.float() - full).abs().max() < 0.05 * full.abs().max()

    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok(TEXT)["input_ids"]
    assert tok.decode(ids) == TEXT
    assert len(tok) == len(tiny_tokenizer()[0])
    # the GGUF's own special tokens, and no BOS prepended (tokenizer.ggml.add_bos_token false)
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<|im_start|>", "<|im_end|>",
                                                             "<|endoftext|>")
    assert ids[0] != tok.bos_token_id


def test_float_gguf_keeps_its_float_type_and_untied_head(tmp_path, capsys):
    gguf = write_tiny_llama_gguf(tmp_path / "f16.gguf", tied=False, quant=None, floats="F16")
    assert inspect_gguf(gguf).float_dtype == "float16"        # F32 norms, F16 matrices
    out = tmp_path / "model"
    code, stdout, err = _run(["import-gguf", str(gguf), "--out", str(out)], capsys)
    assert code == 0, err
    assert json.loads(stdout)["dtype"] == "float16"
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    tensors = _tensors(out)
    assert "lm_head.weight" in tensors and {t.dtype for t in tensors.values()} == {torch.float16}
    logits, model = _logits(out)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    torch.testing.assert_close(logits, _direct_logits(gguf, torch.float16), rtol=0, atol=0)


def test_f32_import_is_exact_and_undoes_the_rotary_permutation(tmp_path, capsys):
    """An all-F32 file comes back bit for bit under the Hugging Face names, q/k in HF order."""
    gguf = write_tiny_llama_gguf(tmp_path / "f32.gguf", tied=True, quant=None, floats="F32")
    out = tmp_path / "model"
    code, stdout, err = _run(["import-gguf", str(gguf), "--out", str(out), "--dtype", "auto"],
                             capsys)
    assert code == 0, err
    assert json.loads(stdout)["dtype"] == "float32"
    want = tiny_llama_weights(len(tiny_tokenizer()[0]), tied=True)
    got = _tensors(out)
    assert set(got) == set(want)
    for name, w in want.items():
        assert torch.equal(got[name], torch.from_numpy(w)), (name, gguf_name(name))


def test_dtype_flag_overrides_auto(tmp_path, capsys):
    gguf = write_tiny_llama_gguf(tmp_path / "tiny.gguf", quant="Q4_0")
    out = tmp_path / "model"
    code, stdout, err = _run(["import-gguf", str(gguf), "--out", str(out), "--dtype", "float32"],
                             capsys)
    assert code == 0, err
    assert {t.dtype for t in _tensors(out).values()} == {torch.float32}
    torch.testing.assert_close(_logits(out)[0], _direct_logits(gguf, torch.float32),
                               rtol=0, atol=0)


# ---------------------------------------------------------------- bad input

def _not_gguf(d):
    p = d / "notes.gguf"
    p.write_text("these are my notes, not a model\n")
    return p


def _truncated(d):
    whole = write_tiny_llama_gguf(d / "whole.gguf").read_bytes()
    p = d / "half.gguf"
    p.write_bytes(whole[: len(whole) // 2])
    return p


def _unknown_arch(d):
    return write_tiny_llama_gguf(d / "alien.gguf", architecture="nosucharch")


def _missing(d):
    return d / "nowhere.gguf"


BAD = [("not a GGUF", _not_gguf, "not a GGUF file"), ("truncated", _truncated, "truncated"),
       ("unknown architecture", _unknown_arch, "nosucharch"),
       ("missing file", _missing, "no such file")]


@pytest.mark.parametrize("make,reason", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_gguf_is_one_line_naming_the_file_and_writes_nothing(tmp_path, capsys, make, reason):
    src = tmp_path / "src"
    src.mkdir()
    gguf = make(src)
    out = tmp_path / "out" / "model"
    code, stdout, err = _run(["import-gguf", str(gguf), "--out", str(out)], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("bitplan import-gguf: error:"), err
    assert gguf.name in lines[0] and reason in lines[0], err
    assert not out.exists() and not out.parent.exists()
    assert stdout == ""


def test_existing_output_is_refused_unless_forced(tmp_path, capsys):
    gguf = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = _run(["import-gguf", str(gguf), "--out", str(out)], capsys)
    assert code == 2 and "--force" in err and str(out) in err, err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    code, _, err = _run(["import-gguf", str(gguf), "--out", str(out), "--force"], capsys)
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "tiny.gguf"]


def test_a_failure_while_writing_leaves_no_directory(tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedModel

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    gguf = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", broken)
    out = tmp_path / "model"
    code, _, err = _run(["import-gguf", str(gguf), "--out", str(out)], capsys)
    assert code == 2 and "disk full" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]
