"""Worker liveness: a consumer bootstep that touches a heartbeat file from the consumer's own
event loop. The file stays fresh only while that loop runs (a hung or broker-less worker stops
touching it, and the step removes it when the consumer stops); `bitplan worker-health` checks
its age. Long tasks run in the pool, so they do not stop the beat."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from celery import Celery, bootsteps

log = logging.getLogger(__name__)


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(str(os.getpid()))
    tmp.replace(path)   # atomic: the health check never reads a half-written file


def add_heartbeat(app: Celery, path: str | Path, interval_s: float) -> None:
    """Register the heartbeat step on `app`'s consumer (before the worker starts)."""
    target = Path(path)

    class Heartbeat(bootsteps.StartStopStep):
        requires = {"celery.worker.consumer.tasks:Tasks"}   # beat once tasks are consumed

        def __init__(self, parent, **kwargs) -> None:
            super().__init__(parent, **kwargs)
            self.tref = None

        def start(self, c) -> None:
            self._beat()
            self.tref = c.timer.call_repeatedly(interval_s, self._beat)

        def stop(self, c) -> None:
            if self.tref is not None:
                self.tref.cancel()
                self.tref = None
            target.unlink(missing_ok=True)

        shutdown = stop

        def _beat(self) -> None:
            try:
                touch(target)
            except OSError as exc:   # a full disk must not kill the consumer; the check fails
                log.warning("heartbeat %s not written: %s", target, exc)

    app.steps["consumer"].add(Heartbeat)
