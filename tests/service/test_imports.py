"""Imports go one way: the API never pulls in celery or workers, and starts without torch."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers.paths import REPO


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(' '.join(sys.modules))"],
                         cwd=REPO, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_service_api_imports_neither_celery_nor_workers_nor_torch():
    mods = _modules_after("from service.api import create_app\nimport service.jobs.runner\n"
                          "import service.jobs.submit\nimport service.jobs.planning\nimport service.cli")
    assert not {m for m in mods if m == "celery" or m.startswith("celery.")}
    assert not {m for m in mods if m == "workers" or m.startswith("workers.")}
    assert "torch" not in mods and "transformers" not in mods


def test_workers_build_the_celery_app_with_both_queues():
    code = ("import os\nos.environ['BITPLAN_REDIS_URL']='redis://127.0.0.1:6399/0'\n"
            "from workers.app import app\nimport workers.tasks\n"
            "print(sorted(q.name for q in app.conf.task_queues))\n"
            "print(sorted(n for n in app.tasks if n.startswith('bitplan.')))\n"
            "print(app.conf.task_acks_late, app.conf.task_reject_on_worker_lost)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out[0] == "['cpu', 'gpu']"
    assert out[1] == str(sorted(["bitplan.compress", "bitplan.fit", "bitplan.profile",
                                 "bitplan.profile_shard", "bitplan.solve"]))
    assert out[2] == "True True"


def test_the_http_client_is_light():
    """`service.client` is what users import on a laptop: httpx, no torch, no database."""
    mods = _modules_after("import service.client")
    heavy = {"torch", "transformers", "sqlalchemy", "fastapi", "numpy", "celery"}
    assert not {m.split(".")[0] for m in mods} & heavy
