"""The README's front-door example runs as written: the whole loop on the demo through
compressor.api, with the demo's plan bytes unchanged (the shipped profile decides them)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO_PLAN_BYTES = 1_914_112   # `make demo` at 2.75bpp, README table (the solver is exact)


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_is_ten_lines_through_the_front_door():
    code = readme_example()
    lines = [ln for ln in code.splitlines() if ln.strip()]
    assert len(lines) <= 10
    assert "from compressor import api" in code
    assert all(f"api.{verb}(" in code for verb in ("profile", "plan", "compress", "load"))


@pytest.mark.slow
def test_the_readme_example_runs(tmp_path):
    (tmp_path / "models").symlink_to(REPO / "models")   # the example's relative model path
    env = os.environ | {"XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
                        "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", readme_example()], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    first, generated = out.stdout.split("\n", 1)    # the continuation spans lines
    nbytes, kl = re.fullmatch(r"([\d,]+) bytes, KL ([\d.]+)", first).groups()
    assert int(nbytes.replace(",", "")) == DEMO_PLAN_BYTES
    assert 0.09 < float(kl) < 0.14             # README: 0.1136 (float order varies by CPU)
    assert generated.startswith("def read_config(path):") and len(generated) > 30
    assert (tmp_path / "var" / "example" / "bitplan_manifest.json").is_file()
    assert any((tmp_path / "cache" / "bitplan" / "profiles").iterdir())
