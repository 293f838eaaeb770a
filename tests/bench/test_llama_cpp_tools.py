"""bench/llama_cpp.py against the real llama.cpp tools (`make llama-cpp` builds them; skipped
when they are not built): llama-imatrix, llama-quantize, llama-perplexity's KL divergence and
llama-bench on the tiny Llama GGUF of bench/tiny_gguf.py, with their numbers read back."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from bench import llama_cpp as lc
from bench.tiny_gguf import CONTEXT, CORPUS, write_tiny_llama_gguf
from tests.helpers.llama_cpp import llama_cpp_bin

CTX = CONTEXT          # 128: the tiny model's context; every chunk scores its last 63 tokens
CHUNKS = 8             # 8 x 63 = 504 scored tokens: enough for llama-perplexity's summary


def _need_tools() -> None:
    llama_cpp_bin()            # built when the cache lacks it (tests/helpers/llama_cpp.py)
    for tool in lc.TOOLS:
        lc.llama_cpp_bin(tool)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    _need_tools()
    d = tmp_path_factory.mktemp("llama_cpp")
    words = CORPUS.split()
    rng = random.Random(0)
    text = d / "text.txt"          # ~1500 words: ~4400 tokens of this tokenizer, 34 chunks of 128
    text.write_text(" ".join(rng.choice(words) for _ in range(1500)))
    f32 = write_tiny_llama_gguf(d / "f32.gguf", quant=None, floats="F32")
    f16 = write_tiny_llama_gguf(d / "f16.gguf", quant=None, floats="F16")
    base = d / "base.logits"
    ref = lc.kld_base(f32, text, base, ctx=CTX, chunks=CHUNKS)
    return {"dir": d, "text": text, "f32": f32, "f16": f16, "base": base, "ref": ref}


@pytest.fixture(scope="module")
def quants(work) -> dict[str, tuple[Path, int]]:
    out = {}
    for mix in ("Q8_0", "Q4_0"):
        path = work["dir"] / f"{mix}.gguf"
        out[mix] = (path, lc.quantize(work["f32"], path, mix))
    return out


def test_a_missing_binary_says_make_llama_cpp_builds_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(lc.ENV_BIN, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="make llama-cpp"):
        lc.llama_cpp_bin("llama-quantize")
    monkeypatch.delenv(lc.ENV_BIN)
    assert lc.llama_cpp_bin_dir().parts[-5:-2] == ("bitplan", "llama.cpp", lc._version())


@pytest.mark.slow
def test_a_failing_tool_raises_with_its_error_lines_and_progress_sees_output(tmp_path) -> None:
    _need_tools()
    seen: list[str] = []
    with pytest.raises(RuntimeError) as err:
        lc.run_tool("llama-quantize", [tmp_path / "absent.gguf", tmp_path / "o.gguf", "Q8_0"],
                    progress=seen.append)
    msg = str(err.value)
    assert msg.startswith("llama-quantize failed") and "absent.gguf" in msg
    assert "Traceback" not in msg and "usage:" not in msg
    assert seen and any("absent.gguf" in ln for ln in seen)
    with pytest.raises(RuntimeError, match="llama-quantize failed"):   # a bad mix: usage text cut
        lc.quantize(tmp_path / "absent.gguf", tmp_path / "o.gguf", "Q9_9")


@pytest.mark.slow
def test_imatrix_is_written_and_feeds_quantize(work) -> None:
    lines: list[str] = []
    im = lc.imatrix(work["f32"], work["text"], work["dir"] / "imatrix.gguf", ctx=CTX,
                    chunks=4, progress=lines.append)
    assert im.stat().st_size > 0 and any("compute_imatrix" in ln for ln in lines)
    import gguf

    names = {t.name for t in gguf.GGUFReader(str(im)).tensors}
    assert "blk.0.ffn_down.weight.in_sum2" in names          # this version's GGUF imatrix
    dat = lc.imatrix(work["f32"], work["text"], work["dir"] / "imatrix.dat", ctx=CTX, chunks=2)
    assert dat.stat().st_size > 0 and dat.read_bytes()[:4] != b"GGUF"
    out = work["dir"] / "q4-imatrix.gguf"
    assert lc.quantize(work["f32"], out, "Q4_0", imatrix=im) > 0
    assert lc.quantized_types(out)["blk.1.attn_q.weight"] == "Q4_0"


@pytest.mark.slow
def test_quantize_sizes_and_types(work, quants) -> None:
    (q8, q8_size), (q4, q4_size) = quants["Q8_0"], quants["Q4_0"]
    assert q4_size < q8_size < work["f32"].stat().st_size
    assert q8_size == q8.stat().st_size
    t8, t4 = lc.quantized_types(q8), lc.quantized_types(q4)
    assert t8["blk.0.ffn_down.weight"] == "Q8_0" and t4["blk.0.ffn_down.weight"] == "Q4_0"
    assert t4["blk.0.attn_norm.weight"] == "F32"
    assert t4["token_embd.weight"] == "Q8_0"  # llama.cpp's Q4_0 mix: Q6_K, which 64 cols can't
    # a k-quant mix: 64-wide rows do not fit Q4_K's 256-blocks, llama.cpp falls back (Q5_0)
    km = work["dir"] / "Q4_K_M.gguf"
    assert q4_size < lc.quantize(work["f32"], km, "Q4_K_M") < q8_size
    assert "Q5_0" in set(lc.quantized_types(km).values())
    # per-tensor overrides, from a file (regex=type, one a line) and as options
    tt = work["dir"] / "types.txt"
    tt.write_text("blk\\.0\\.ffn_down=q8_0\nattn_v=f16\n")
    out = work["dir"] / "mixed.gguf"
    size = lc.quantize(work["f32"], out, "Q4_0", tensor_type_file=tt,
                       tensor_types={"blk\\.1\\.ffn_up": "q8_0"})
    got = lc.quantized_types(out)
    assert (got["blk.0.ffn_down.weight"], got["blk.1.ffn_down.weight"]) == ("Q8_0", "Q4_0")
    assert got["blk.0.attn_v.weight"] == got["blk.1.attn_v.weight"] == "F16"
    assert got["blk.1.ffn_up.weight"] == "Q8_0" and size > q4_size


@pytest.mark.slow
def test_kld_is_zero_for_the_reference_and_grows_with_coarser_quants(work, quants) -> None:
    ref = work["ref"]
    assert {k: ref[k] for k in ("ctx", "chunks", "tokens", "vocab")} == {
        "ctx": CTX, "chunks": CHUNKS, "tokens": CTX * CHUNKS, "vocab": lc.gguf_vocab_size(
            work["f32"])}
    same = lc.kld(work["f32"], work["base"], ctx=CTX, chunks=CHUNKS)
    assert same["complete"] and same["chunks"] == CHUNKS
    assert same["kld"] < 1e-4 and same["same_top"] == pytest.approx(1.0)
    if "ppl" in ref:      # printed at the very end: llama.cpp's log may drop it
        assert same["ppl"] == pytest.approx(ref["ppl"], rel=1e-3)
    f16 = lc.kld(work["f16"], work["base"])
    assert f16["kld"] < 1e-4
    q8 = lc.kld(quants["Q8_0"][0], work["base"])
    q4 = lc.kld(quants["Q4_0"][0], work["base"])
    assert 0 < q8["kld"] < q4["kld"]
    assert q4["same_top"] < q8["same_top"] <= 1
    assert q8["kld_p99"] < q4["kld_p99"] and q4["kld_median"] <= q4["kld_p99"] <= q4["kld_max"]
    for r in (same, f16, q8, q4):
        assert r["complete"] and math.isfinite(r["ppl"]) and r["ppl"] > 1
        assert {"ppl_base", "ln_ppl_ratio", "dp_rms", "kld_p95"} <= r.keys()
    with pytest.raises(ValueError, match="holds 128 for ctx"):
        lc.kld(work["f32"], work["base"], ctx=256)


def test_parse_kld_falls_back_to_the_last_chunk_row() -> None:
    out = ("chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence"
           "              Δp RMS            Same top p\n"
           "   1      12.5000 ±    1.2000       0.01000 ±    0.00500       0.02000 ±    0.00100"
           "     1.500 ±  0.200 %    97.000 ±  1.000 %\n")
    got = lc.parse_kld(out)
    assert got == {"chunks": 1, "ppl": 12.5, "ln_ppl_ratio": 0.01, "kld": 0.02,
                   "dp_rms": pytest.approx(0.015), "same_top": pytest.approx(0.97)}
    with pytest.raises(RuntimeError, match="no KL divergence"):
        lc.parse_kld("perplexity: tokenizing the input ..\n")


@pytest.mark.slow
def test_too_short_a_text_is_a_clear_error(work) -> None:
    short = work["dir"] / "short.txt"
    short.write_text(CORPUS)
    for _ in range(3):    # the reason must not depend on which log lines llama.cpp delivered
        with pytest.raises(RuntimeError, match=r"llama-perplexity: the text tokenizes to .*256"):
            lc.kld_base(work["f32"], short, work["dir"] / "short.logits", ctx=CTX)
        with pytest.raises(RuntimeError, match=r"(?s)llama-imatrix.*tokens"):
            lc.imatrix(work["f32"], short, work["dir"] / "short.gguf", ctx=CTX)


@pytest.mark.slow
def test_bench_decode_reports_tokens_per_second(quants) -> None:
    tps = lc.bench_decode(quants["Q4_0"][0], n_gen=16, reps=2)
    assert tps > 0 and math.isfinite(tps)
