"""`bitplan serve` as a child process on a free loopback port, for whatever talks to a real
server over HTTP (the `api` and `load` benchmarks, the browser and remote-CLI tests):

    with serve_subprocess(env, log=tmp / "server.log") as srv:
        httpx.get(f"{srv.url}/v1/models", ...)

It starts with exactly the environment given, is ready when /readyz answers
(service.client.wait_ready), and on exit only this process is stopped (terminate, then kill)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from service.client import wait_ready
from service.settings import REPO_ROOT

LOG_TAIL = 3000   # characters of the server's output an error carries


class ServerDidNotStart(RuntimeError):
    """The server exited, or was not ready in time; the message ends with its output's tail
    (when it wrote to a log)."""


@dataclass(frozen=True)
class ServerProcess:
    url: str                  # http://127.0.0.1:<port>
    port: int
    proc: subprocess.Popen
    log: Path | None          # stdout + stderr, when asked for


def free_port() -> int:
    """A loopback port nobody listens on now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Terminate `proc`, kill it if it is still there after `timeout` seconds, and reap it."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _tail(log: Path | None) -> str:
    return log.read_text(errors="replace")[-LOG_TAIL:] if log and log.is_file() else ""


@contextmanager
def serve_subprocess(env: Mapping[str, str], *, args: Sequence[str] = (),
                     log: Path | None = None, start_timeout: float = 90.0,
                     cwd: Path = REPO_ROOT) -> Iterator[ServerProcess]:
    """Run `python -m service.cli serve --port <free port> *args` with `env` (the whole
    environment, not additions) until the block ends. `log`: where its output goes (otherwise
    discarded). Raises ServerDidNotStart if it exits or is not ready in `start_timeout` s."""
    port = free_port()
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), *args]
    if log is None:
        proc = subprocess.Popen(cmd, cwd=cwd, env=dict(env), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    else:
        with open(log, "wb") as out:   # the child holds its own copy of the descriptor
            proc = subprocess.Popen(cmd, cwd=cwd, env=dict(env), stdout=out,
                                    stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_ready(url, start_timeout, alive=lambda: proc.poll() is None):
            state = (f"exited with status {proc.returncode}" if proc.poll() is not None
                     else f"was not ready after {start_timeout:.0f} s")
            raise ServerDidNotStart(f"server {state}: {_tail(log)}".rstrip(": "))
        yield ServerProcess(url, port, proc, log)
    finally:
        stop(proc)
