"""Every `bitplan bench NAME` is run by a smoke test here, so none can drift from its claims."""

import re
from pathlib import Path

from bench.cli import BENCHES


def test_every_benchmark_has_a_smoke_test():
    here = Path(__file__).parent
    text = "\n".join(p.read_text() for p in here.glob("test_*.py") if p.name != Path(__file__).name)
    run = set(re.findall(r'bench\("([\w-]+)"', text)) | set(re.findall(r'"bench", "([\w-]+)"', text))
    assert set(BENCHES) <= run, f"benchmarks without a smoke test: {set(BENCHES) - run}"
