"""The queue interface: `enqueue(task_name, job_id)`, and `fan_out(header, body)`: run every
header task, then the body once all have finished (a Celery chord).

Two implementations run the same runner (service.jobs.runner.run_task):
- `CeleryQueue` publishes Celery protocol-2 messages by task name with kombu, so the API never
  imports celery or workers; a Celery worker (workers/) consumes them from the `gpu`/`cpu` queues.
  Only workers fan out (a profile splitting into shards): that publishes a real Celery chord,
  counted in Redis by Celery's result backend (celery is imported there, in the worker).
- `InProcessQueue` runs them on a small thread pool when no Redis URL is set (embedded mode).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from kombu import Connection, Exchange
from kombu import Queue as KQueue

from service.jobs.registry import QueueName, spec_of
from service.settings import Settings

log = logging.getLogger(__name__)

EXCHANGE = "bitplan"
QUEUES: tuple[str, ...] = tuple(q.value for q in QueueName)


Call = tuple[str, str]   # (task name, job id)


class Queue(Protocol):
    def enqueue(self, task_name: str, job_id: str) -> None: ...
    def fan_out(self, header: list[Call], body: Call) -> None: ...
    def ping(self) -> bool: ...
    def close(self) -> None: ...


def broker_transport_options(settings: Settings) -> dict:
    """Late-acked messages of a dead worker are re-delivered once `visibility_timeout` has
    passed; workers look for such messages every `unacked_restore_interval` seconds (kombu's
    default scans only every 100 s, far longer than a short test timeout)."""
    vt = settings.visibility_timeout_s
    return {"global_keyprefix": settings.redis_prefix, "visibility_timeout": vt,
            "unacked_restore_interval": max(1, min(10, vt // 4)),
            "unacked_restore_throttle": 1}


def clear_prefix(redis_url: str, prefix: str) -> None:
    """Delete every key under `prefix` (a test's or a benchmark's private broker namespace)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=500))
    if keys:
        client.delete(*keys)
    client.close()


def kombu_queues():
    exchange = Exchange(EXCHANGE, type="direct", durable=True)
    return exchange, {q: KQueue(q, exchange, routing_key=q, durable=True) for q in QUEUES}


def celery_conf(settings: Settings) -> dict:
    """The Celery configuration every bitplan Celery app shares (the workers', and the one a
    worker publishes chords with): queues and routes from the registry, Redis as broker and as
    the result backend that counts a chord's finished header tasks."""
    from service.jobs.registry import TASKS

    exchange, queues = kombu_queues()
    return dict(
        broker_url=settings.redis_url, result_backend=settings.redis_url,
        broker_transport_options=broker_transport_options(settings),
        result_backend_transport_options={"global_keyprefix": settings.redis_prefix},
        result_expires=7 * 24 * 3600,
        broker_connection_retry_on_startup=True,
        task_queues=list(queues.values()),
        task_default_queue="cpu",
        task_default_exchange=exchange.name,
        task_default_routing_key="cpu",
        task_routes={t.value: {"queue": spec.queue.value, "routing_key": spec.queue.value}
                     for t, spec in TASKS.items()},
        task_serializer="json", result_serializer="json", accept_content=["json"],
        task_ignore_result=True,   # job state lives in the database; chords count in Redis
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_enable_remote_control=False,
        task_track_started=False,
    )


class CeleryQueue:
    """Publishes to Redis exactly what `celery_app.send_task(name, args=[job_id])` would."""

    def __init__(self, settings: Settings) -> None:
        assert settings.redis_url, "CeleryQueue needs a Redis URL"
        self._conn = Connection(settings.redis_url,
                                transport_options=broker_transport_options(settings))
        self._exchange, self._queues = kombu_queues()
        self._lock = threading.Lock()
        self._producer = None
        self._settings = settings
        self._celery = None

    def fan_out(self, header: list[Call], body: Call) -> None:
        """A Celery chord: every header task on its queue; the body once all have finished
        (Redis counts them). Signatures are immutable: tasks take only their job id."""
        from celery import Celery, chord

        with self._lock:
            if self._celery is None:
                self._celery = Celery("bitplan-chords", set_as_current=False)
                self._celery.conf.update(celery_conf(self._settings))
            app = self._celery

        def sig(task_name: str, job_id: str):
            spec_of(task_name)
            return app.signature(task_name, args=[job_id], immutable=True)

        chord([sig(*c) for c in header], app=app)(sig(*body))
        log.info("fanned out %d × %s, then %s(%s)", len(header),
                 header[0][0] if header else "-", *body)

    def enqueue(self, task_name: str, job_id: str) -> None:
        queue = self._queues[spec_of(task_name).queue.value]
        task_id = uuid.uuid4().hex
        args = [job_id]
        headers = {
            "lang": "py", "task": task_name, "id": task_id, "shadow": None, "eta": None,
            "expires": None, "group": None, "group_index": None, "retries": 0,
            "timelimit": [None, None], "root_id": task_id, "parent_id": None,
            "argsrepr": repr(args), "kwargsrepr": "{}", "origin": "bitplan-api",
            "ignore_result": True,
        }
        body = (args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None})
        with self._lock:
            if self._producer is None:
                self._producer = self._conn.Producer(serializer="json")
            self._producer.publish(
                body, exchange=self._exchange, routing_key=queue.routing_key,
                declare=[queue], headers=headers, correlation_id=task_id, reply_to="",
                delivery_mode=2, serializer="json",
                retry=True, retry_policy={"max_retries": 3, "interval_start": 0.2,
                                          "interval_step": 0.5, "interval_max": 2})
        log.info("enqueued %s(%s) on %s", task_name, job_id, queue.name)

    def ping(self) -> bool:
        try:
            with self._lock:
                self._conn.ensure_connection(max_retries=1, timeout=2)
                client = self._conn.default_channel.client
                return bool(client.ping())
        except Exception:  # readiness is a yes/no answer
            log.warning("queue not reachable", exc_info=True)
            return False

    def close(self) -> None:
        with self._lock:
            self._conn.release()


class InProcessQueue:
    """Runs tasks on a thread pool in this process, with the same runner and retry policy
    (`run` is service.jobs.runner.run_with_retries; see runner.make_queue)."""

    def __init__(self, settings: Settings,
                 run: Callable[[str, str, Settings, Queue], str]) -> None:
        self.settings = settings
        self._run_task = run
        self._pool = ThreadPoolExecutor(max_workers=max(1, settings.inprocess_workers),
                                        thread_name_prefix="bitplan-job")
        self._pending = 0
        self._cv = threading.Condition()

    def fan_out(self, header: list[Call], body: Call) -> None:
        """The chord's semantics on the thread pool: the body runs when the last header task
        has returned, whatever its outcome (as Celery counts a finished task). The body counts
        as pending from now, so `wait_idle` never sees a gap between the two."""
        for task_name, _ in [*header, body]:
            spec_of(task_name)
        left = [len(header)]
        lock = threading.Lock()
        with self._cv:
            self._pending += len(header) + 1

        def then(_future) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                self._pool.submit(self._run, *body)

        if not header:
            self._pool.submit(self._run, *body)
        for task_name, job_id in header:
            self._pool.submit(self._run, task_name, job_id).add_done_callback(then)

    def enqueue(self, task_name: str, job_id: str) -> None:
        spec_of(task_name)   # ValueError for a name that is not ours
        with self._cv:
            self._pending += 1
        self._pool.submit(self._run, task_name, job_id)

    def _run(self, task_name: str, job_id: str) -> None:
        try:
            self._run_task(task_name, job_id, self.settings, self)
        except Exception:
            log.exception("in-process task %s(%s) failed", task_name, job_id)
        finally:
            with self._cv:
                self._pending -= 1
                self._cv.notify_all()

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Tests and the CLI: wait until no task is queued or running."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
