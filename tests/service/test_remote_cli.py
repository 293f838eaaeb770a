"""`bitplan remote …` against a real `bitplan serve` (uvicorn, embedded mode) on a free port:
plan prints progress until done and then the plan's summary; compress, download (sha256 verified
and every file checked), jobs, status, models and cancel work over HTTP with BITPLAN_SERVER and
BITPLAN_API_KEY."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys

import httpx
import pytest

from tests.helpers.paths import REPO
from tests.helpers.server import live_server


def _remote(srv, *args: str, team: str = "alpha") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BITPLAN_")}
    env |= {"BITPLAN_SERVER": srv.url, "BITPLAN_API_KEY": srv.keys[team],
            "PYTHONPATH": srv.env["PYTHONPATH"]}
    return subprocess.run([sys.executable, "-m", "service.cli", "remote", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow   # a real server profiles, solves and compresses the tiny model (~40 s)
def test_remote_plan_compress_download(tmp_path, model_root, tiny_model):
    with live_server(tmp_path / "server", model_root) as srv:
        r = _remote(srv, "plan", "tiny-qwen", "--budget", "0.85x")
        assert r.returncode == 0, r.stderr
        bars = [ln for ln in r.stderr.splitlines() if ln.startswith("[")]
        assert len(bars) >= 2 and "100.0%" in bars[-1] and "succeeded" in bars[-1], r.stderr
        assert any("waiting for profile" in b or "profile/" in b for b in bars), bars
        plan_id = re.search(r"^plan ([0-9a-f]{32})", r.stdout, re.M)[1]
        api = httpx.get(f"{srv.url}/v1/plans/{plan_id}",
                        headers={"Authorization": f"Bearer {srv.keys['alpha']}"}).json()
        assert f"({api['total_bytes']} B, " in r.stdout
        assert f"predicted KL {api['predicted_error']:.4g}" in r.stdout
        rows = [ln for ln in r.stdout.splitlines() if ln.startswith("model.layers.")]
        first = next(n for n in api["linears"] if n["name"].startswith("model.layers."))
        assert len(rows) == 14 and rows[0].split()[1] == str(first["bits"])

        r = _remote(srv, "compress", plan_id)
        assert r.returncode == 0, r.stderr
        art_id = re.search(r"^artifact ([0-9a-f]{32}) ready", r.stdout, re.M)[1]
        assert "KL " in r.stdout and "top-1" in r.stdout
        out = tmp_path / "dl"
        r = _remote(srv, "download", art_id, "-o", str(out), "--extract")
        assert r.returncode == 0, r.stderr
        assert "(verified, " in r.stdout and "files checked)" in r.stdout
        tar = next(out.glob("*.tar"))
        assert hashlib.sha256(tar.read_bytes()).hexdigest() in r.stdout

        jobs = _remote(srv, "jobs").stdout
        assert jobs.count("succeeded") == 2 and "compress" in jobs
        assert "inprocess" in _remote(srv, "status").stdout
        assert "tiny-qwen" in _remote(srv, "models").stdout
        job_id = jobs.split()[0]
        r = _remote(srv, "cancel", job_id)
        assert r.returncode == 2 and "already succeeded" in r.stderr
        r = _remote(srv, "show", plan_id, team="beta")           # another team's plan
        assert r.returncode == 2 and "not found" in r.stderr


@pytest.mark.slow   # a real server profiles a tiny Llama for gguf and solves (~40 s)
def test_remote_plan_with_target_gguf(tmp_path):
    from bench.tiny_llama import write_tiny_llama
    from tests.helpers.llama_cpp import llama_cpp_source

    llama_cpp_source()   # the converter's vocabulary pass checks the tokenizer first
    root = tmp_path / "models"
    write_tiny_llama(root / "tiny-llama")   # the tiny Qwen's BPE the converter does not know
    with live_server(tmp_path / "server", root) as srv:
        r = _remote(srv, "plan", "tiny-llama", "--budget", "0.6x", "--target", "gguf")
        assert r.returncode == 0, r.stderr
        plan_id = re.search(r"^plan ([0-9a-f]{32}).*target gguf$", r.stdout, re.M)[1]
        api = httpx.get(f"{srv.url}/v1/plans/{plan_id}",
                        headers={"Authorization": f"Bearer {srv.keys['alpha']}"}).json()
        assert api["target"] == "gguf"
        names = {li["name"] for li in api["linears"]}
        rows = {ln.split()[0]: ln.split()[1] for ln in r.stdout.splitlines()
                if ln.split() and ln.split()[0] in names}
        assert rows == {li["name"]: li["gguf_type"] for li in api["linears"]}
        r = _remote(srv, "plan", "tiny-llama", "--budget", "0.6x", "--target", "llama")
        assert r.returncode == 2 and "invalid choice" in r.stderr
