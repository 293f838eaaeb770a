"""llama.cpp for the tests that run it: fetched and built by scripts/build_llama_cpp.sh when the
cache (outside the clone) lacks it, once per machine — never skipped, so a machine without it
builds it (about 5 min on 2 cores) rather than passing tests that did not run."""

from __future__ import annotations

import subprocess
import sys
from functools import cache
from pathlib import Path

from service.settings import REPO_ROOT


def _script(*args: str) -> Path:
    pip = Path(sys.executable).with_name("pip")
    out = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "build_llama_cpp.sh"), str(pip),
                          *args], capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    return Path(out.stdout.strip().splitlines()[-1])


@cache
def llama_cpp_source() -> Path:
    """The llama.cpp source tree (its converter and gguf-py): fetched, not built."""
    return _script("--source")


@cache
def llama_cpp_bin() -> Path:
    """The directory of llama-quantize, llama-imatrix, llama-perplexity and llama-bench."""
    return _script()
