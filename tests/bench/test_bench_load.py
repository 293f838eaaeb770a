"""`bitplan bench load --json`: a short bounded run really serves plans and reports its figures
(the 50-client, 60-second figure belongs to the benchmark itself, not to the test suite)."""

import json
import os
import subprocess
import sys

from service.settings import REPO_ROOT


def test_bench_load_short_run_reports_figures_and_no_errors(tmp_path, demo_model_path):
    env = os.environ | {"BITPLAN_LOAD_CLIENTS": "4", "BITPLAN_LOAD_SECONDS": "4",
                        "BITPLAN_DATA_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "service.cli", "bench", "load", "--json"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    fig = json.loads(out.stdout)
    assert {"clients", "seconds", "requests", "throughput_rps", "p95_ms", "errors"} <= set(fig)
    assert fig["clients"] == 4 and fig["seconds"] >= 4
    assert fig["errors"] == 0, fig
    assert fig["requests"] > 4 and fig["throughput_rps"] > 0 and fig["p95_ms"] > 0
    assert fig["requests"] / fig["throughput_rps"] >= 4 * 0.9   # rate = requests over the run
