"""`make llama-cpp` (scripts/build_llama_cpp.sh): llama.cpp's tools built from the source in the
llama-cpp-python sdist, cached outside the clone, and real: llama-quantize rewrites a GGUF that
the `gguf` package writes, and llama-perplexity runs the result. The first run on a machine
builds them (about 5 min on 2 cores); later runs find them in the cache."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from bench.tiny_gguf import write_tiny_llama_gguf
from tests.helpers.llama_cpp import llama_cpp_bin

TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench")


@pytest.fixture(scope="module")
def llama_bin() -> Path:
    return llama_cpp_bin()     # built by the script when the cache lacks it


@pytest.mark.slow
def test_llama_cpp_tools_quantize_and_run_a_gguf(llama_bin, tmp_path) -> None:
    import gguf

    assert all((llama_bin / t).is_file() for t in TOOLS)
    src = write_tiny_llama_gguf(tmp_path / "tiny.gguf", quant=None, floats="F32")
    dst = tmp_path / "tiny-q8.gguf"
    q = subprocess.run([str(llama_bin / "llama-quantize"), str(src), str(dst), "Q8_0"],
                       capture_output=True, text=True, timeout=300)
    assert q.returncode == 0, q.stderr[-3000:]
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(dst).tensors}
    # llama.cpp's own choices: 2-D weights whose rows are multiples of 32 to Q8_0, norms F32
    assert {v for k, v in types.items() if k.endswith("_norm.weight")} == {"F32"}
    assert "Q8_0" in set(types.values())
    text = tmp_path / "text.txt"
    text.write_text("def return self import if else for in the None class " * 40)
    p = subprocess.run([str(llama_bin / "llama-perplexity"), "-m", str(dst), "-f", str(text),
                        "-c", "32", "--chunks", "2", "-t", "2"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ppl = float(re.search(r"Final estimate: PPL = ([\d.]+)", p.stdout + p.stderr).group(1))
    assert ppl > 1.0
