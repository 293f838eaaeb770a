"""The deployment files, read as data (no docker here): every compose service declares its
health (API = readiness, workers = a heartbeat check), the Postgres password comes only from the
environment and reaches every database URL the same way, the build context leaves out
virtualenvs/data/history/caches but keeps what the Dockerfile copies, and torch's wheel index is
a build argument (CPU by default, CUDA for the GPU worker)."""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
import sys
import tomllib

import yaml

from tests.helpers.paths import REPO

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
DOCKERFILE = (REPO / "Dockerfile").read_text()


def _instructions() -> list[str]:
    """Dockerfile instructions with line continuations joined, comments dropped."""
    lines = [ln for ln in DOCKERFILE.splitlines() if not ln.lstrip().startswith("#")]
    return [i.strip() for i in re.sub(r"\\\n", "", "\n".join(lines)).splitlines() if i.strip()]


def _health_cmd(svc: dict) -> str:
    test = svc["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(test)


def test_every_service_declares_its_health():
    for name, svc in SERVICES.items():
        assert "healthcheck" in svc, f"{name} has no healthcheck"
        hc = svc["healthcheck"]
        if svc.get("restart") == "no":                 # one-shot (migrate): no check to run
            assert hc == {"disable": True}, name
        else:
            assert not hc.get("disable") and hc.get("test"), f"{name}: healthcheck disabled"


def test_api_health_gates_on_readiness():
    cmd = _health_cmd(SERVICES["api"])
    assert "/readyz" in cmd and "/healthz" not in cmd
    healthcheck = next(i for i in _instructions() if i.startswith("HEALTHCHECK"))
    assert "/readyz" in healthcheck                 # the image's own check (default: the API)


def test_workers_have_a_heartbeat_liveness_check():
    workers = {n: s for n, s in SERVICES.items() if "worker" in s.get("command", [])}
    assert set(workers) == {"worker-gpu", "worker-cpu"}
    for name, svc in workers.items():
        assert _health_cmd(svc) == "CMD bitplan worker-health", name
        assert svc["environment"]["BITPLAN_WORKER_HEARTBEAT_FILE"].startswith("/tmp/"), name


def test_postgres_password_is_required_from_the_environment():
    text = (REPO / "docker-compose.yml").read_text()
    assert "POSTGRES_PASSWORD:-" not in text        # no fallback value anywhere
    required = "${POSTGRES_PASSWORD:?"
    assert SERVICES["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith(required)
    urls = {n: s["environment"]["BITPLAN_DATABASE_URL"] for n, s in SERVICES.items()
            if "BITPLAN_DATABASE_URL" in s.get("environment", {})}
    assert {"migrate", "api", "worker-gpu", "worker-cpu"} <= set(urls)
    assert len(set(urls.values())) == 1, urls       # one URL for the API and every worker
    url = next(iter(urls.values()))
    assert re.fullmatch(r"postgresql\+psycopg://bitplan:\$\{POSTGRES_PASSWORD:\?[^}]+\}"
                        r"@postgres:5432/bitplan", url), url


def test_dockerignore_excludes_local_state_but_not_what_the_image_copies():
    path = REPO / ".dockerignore"
    assert path.is_file()
    patterns = [ln.strip() for ln in path.read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for must in (".venv", "var", ".git", "**/__pycache__", ".env"):
        assert must in patterns, must
    copied = [src for i in _instructions() if i.startswith("COPY ")
              for src in i.split()[1:-1] if not src.startswith("--")]
    assert {"pyproject.toml", "README.md", "service", "models", "data"} <= set(copied)
    for src in copied:
        hits = [p for p in patterns if fnmatch.fnmatch(src, p.removeprefix("**/"))]
        assert not hits, f"{src} is copied by the Dockerfile but ignored by {hits}"


def test_torch_index_is_a_build_arg_cpu_by_default_cuda_for_the_gpu_worker(tmp_path):
    arg = next(i for i in _instructions() if i.startswith("ARG TORCH_INDEX_URL="))
    assert arg.endswith("download.pytorch.org/whl/cpu")
    install = next(i for i in _instructions() if "TORCH_SPEC" in i)
    assert '--index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"' in install
    gpu_args = SERVICES["worker-gpu"]["build"]["args"]
    assert re.search(r"download\.pytorch\.org/whl/cu\d+", gpu_args["TORCH_INDEX_URL"])
    assert SERVICES["worker-gpu"]["image"] != SERVICES["api"]["image"]   # two builds, two tags
    # the version the Dockerfile installs is the one pyproject.toml pins
    spec_cmd = install.removeprefix("RUN ").split(" && ")[0]
    (tmp_path / "python").symlink_to(sys.executable)
    out = subprocess.run(["sh", "-c", spec_cmd + ' && printf %s "$TORCH_SPEC"'], cwd=REPO,
                         env=os.environ | {"PATH": f"{tmp_path}:{os.environ['PATH']}"},
                         capture_output=True, text=True, check=True).stdout
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert out == next(d for d in deps if re.match(r"torch\W", d))
