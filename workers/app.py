"""The Celery app: Redis broker, queues `gpu` (profile, compress, evaluate) and `cpu` (fit,
solve), late acks so a task whose worker dies is redelivered. The only module that builds a
Celery app; the API publishes to the same queues by task name (service.jobs.queue)."""

from __future__ import annotations

from celery import Celery

from service.jobs.queue import TASK_QUEUES, broker_transport_options, kombu_queues
from service.settings import Settings, get_settings


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    if not settings.redis_url:
        raise RuntimeError("the Celery worker needs BITPLAN_REDIS_URL (without it, `bitplan "
                           "serve` runs jobs in-process)")
    exchange, queues = kombu_queues()
    app = Celery("bitplan", broker=settings.redis_url, include=["workers.tasks"])
    app.conf.update(
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry_on_startup=True,
        task_queues=list(queues.values()),
        task_default_queue="cpu",
        task_default_exchange=exchange.name,
        task_default_routing_key="cpu",
        task_routes={name: {"queue": q, "routing_key": q} for name, q in TASK_QUEUES.items()},
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_enable_remote_control=False,
        task_track_started=False,
    )
    return app


app = make_celery()
