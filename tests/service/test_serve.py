"""`bitplan serve` with no settings but a data dir: SQLite under the data dir, migrated on
start, the in-process queue, answering on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx

from service.db.migrate import current, head
from tests.helpers.net import free_port
from tests.helpers.paths import REPO


def test_serve_embedded_default(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BITPLAN_")}
    env["BITPLAN_DATA_DIR"] = str(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        assert r.status_code == 200 and r.json()["checks"] == {"database": "ok", "queue": "ok"}
        r = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        db = tmp_path / "bitplan.sqlite3"
        assert db.is_file() and current(f"sqlite:///{db}") == head()
    finally:
        proc.terminate()
        proc.wait(20)
