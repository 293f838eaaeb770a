"""Worker liveness for the deployment's healthcheck: a real `bitplan worker` keeps its heartbeat
file fresh from the consumer loop, `bitplan worker-health` passes while it does, fails once the
worker is frozen, and the file is gone after a clean stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tests.helpers.paths import REPO
from tests.workers.worker_proc import clear_redis_prefix, wait_for


def _health(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", "worker-health", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_worker_health_without_a_heartbeat_fails_clearly(tmp_path):
    env = os.environ | {"BITPLAN_WORKER_HEARTBEAT_FILE": str(tmp_path / "none.alive")}
    r = _health(env)
    assert r.returncode == 1 and "no heartbeat" in r.stdout and "Traceback" not in r.stderr
    stale = tmp_path / "stale.alive"
    stale.write_text("1")
    os.utime(stale, (time.time() - 120, time.time() - 120))
    r = _health(env | {"BITPLAN_WORKER_HEARTBEAT_FILE": str(stale)})
    assert r.returncode == 1 and "ago" in r.stdout


def test_worker_heartbeat_tracks_the_consumer_loop(tmp_path, redis_url, sqlite_url):
    beat = tmp_path / "worker.alive"
    prefix = f"bitplan-test-{uuid.uuid4().hex}:"
    env = os.environ | {"BITPLAN_REDIS_URL": redis_url, "BITPLAN_REDIS_PREFIX": prefix,
                        "BITPLAN_DATABASE_URL": sqlite_url, "BITPLAN_DATA_DIR": str(tmp_path),
                        "BITPLAN_WORKER_HEARTBEAT_FILE": str(beat),
                        "BITPLAN_WORKER_HEARTBEAT_S": "0.5", "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "worker", "--queues", "cpu"],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_for(lambda: beat.is_file() or proc.poll() is not None, 120, what="first beat")
        assert proc.poll() is None, Path(log_path).read_text()
        first = beat.stat().st_mtime
        wait_for(lambda: beat.stat().st_mtime > first, 10, what="a second beat")
        r = _health(env, "--max-age", "3")
        assert r.returncode == 0 and r.stdout.startswith("ok"), (r.stdout, r.stderr)
        # a frozen worker (here: stopped) stops beating and turns unhealthy
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(3.5)
        r = _health(env, "--max-age", "3")
        assert r.returncode == 1 and "unhealthy" in r.stdout
        os.kill(proc.pid, signal.SIGCONT)
        wait_for(lambda: _health(env, "--max-age", "3").returncode == 0, 20, what="recovery")
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        assert not beat.exists()            # a stopped worker leaves no fresh-looking file
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait(10)
        clear_redis_prefix(redis_url, prefix)
