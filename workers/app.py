"""The Celery worker app: Redis broker (and result backend, which counts a chord's finished
shards), queues `gpu` (profile, its shards, compress) and `cpu` (fit, solve) as
service.jobs.registry routes them, late acks so a task whose worker dies is redelivered. Its
configuration is `service.jobs.queue.celery_conf`, shared with the publisher that sends chords;
the API publishes to the same queues by task name with kombu alone."""

from __future__ import annotations

from celery import Celery

from service.db.session import get_database
from service.jobs.queue import celery_conf
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


app = make_celery()
