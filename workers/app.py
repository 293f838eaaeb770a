"""The Celery worker app: Redis broker (and result backend, which counts a chord's finished
shards), queues `gpu` (profile, its shards, compress) and `cpu` (fit, solve) as
service.jobs.registry routes them, late acks so a task whose worker dies is redelivered. Its
configuration is `service.jobs.queue.celery_conf`, shared with the publisher that sends chords;
the API publishes to the same queues by task name with kombu alone."""

from __future__ import annotations

import os

from celery import Celery
from celery.signals import worker_init

from service.db.session import get_database
from service.jobs.queue import celery_conf
from service.jobs.registry import QueueName
from service.settings import Settings, get_settings
from workers.health import add_heartbeat, add_worker_beat


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    if not settings.redis_url:
        raise RuntimeError("the Celery worker needs BITPLAN_REDIS_URL (without it, `bitplan "
                           "serve` runs jobs in-process)")
    app = Celery("bitplan", include=["workers.tasks"])
    app.conf.update(celery_conf(settings))
    if settings.worker_heartbeat_file:   # liveness for the container's health check
        add_heartbeat(app, settings.worker_heartbeat_file, settings.worker_heartbeat_s)
    # seen by GET /v1/status (the database is only touched once the worker starts)
    add_worker_beat(app, get_database(settings.resolved_database_url), settings.worker_heartbeat_s)
    return app


def share_cores(sender=None, **_) -> int | None:
    """A threads pool runs `--concurrency` tasks in one process and each task's torch ops start
    their own OpenMP team: give each team cores // concurrency threads, or they oversubscribe
    the CPU (measured: the demo e2e 10× slower on a busy 2-core machine). OMP_NUM_THREADS, when
    set, wins. Returns the thread count set, if any."""
    if sender is None or os.environ.get("OMP_NUM_THREADS"):
        return None
    import torch

    threads = max(1, (os.cpu_count() or 1) // max(1, int(sender.concurrency or 1)))
    torch.set_num_threads(threads)
    return threads


def warm_imports(sender=None, **_) -> bool:
    """A worker that consumes the `gpu` queue imports the model side (compressor: torch and
    transformers' model code, 3.3 s on 2 CPU cores) when it starts, not inside its first task:
    otherwise every worker's first shard of a profile starts that much late. A fit/solve-only
    (`cpu`) worker is left to import what its tasks need. True when it imported."""
    if sender is None or QueueName.GPU.value not in sender.app.amqp.queues.consume_from:
        return False
    import compressor.pipeline.execute
    import compressor.pipeline.profile  # noqa: F401

    return True


worker_init.connect(share_cores, weak=False)
worker_init.connect(warm_imports, weak=False)
app = make_celery()
