"""Start and stop a real Celery worker process (`bitplan worker`) for a test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from service.jobs.queue import clear_prefix as clear_redis_prefix  # noqa: F401 (tests use it)
from tests.helpers.paths import REPO


class WorkerProcess:
    def __init__(self, settings, log_path: Path, queues: str = "gpu,cpu",
                 concurrency: int = 2) -> None:
        env = os.environ.copy()
        env.update({
            "BITPLAN_DATABASE_URL": settings.database_url,
            "BITPLAN_REDIS_URL": settings.redis_url,
            "BITPLAN_REDIS_PREFIX": settings.redis_prefix,
            "BITPLAN_DATA_DIR": str(settings.data_dir),
            "BITPLAN_MODEL_ROOTS": json.dumps([str(p) for p in settings.model_roots]),
            "BITPLAN_PROFILE_CONFIG": json.dumps(settings.profile_config),
            "BITPLAN_DEVICE": settings.device,
            "BITPLAN_PROFILE_SHARDS": str(settings.profile_shards),
            "PYTHONUNBUFFERED": "1",
            # the worker runs `concurrency` task threads; one torch thread each, or OpenMP's
            # spinning threads oversubscribe a small, busy machine (measured: the demo e2e took
            # > 600 s instead of 60 s with other jobs running)
            "OMP_NUM_THREADS": "1",
        })
        self.log_path = log_path
        self._log = open(log_path, "wb")   # closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", "--queues", queues,
             "--concurrency", str(concurrency)],
            cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            if " ready." in self.log():
                return
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {timeout}s:\n{self.log()[-4000:]}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def wait_for(predicate, timeout: float = 120.0, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
