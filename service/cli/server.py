"""Service commands: serve, worker, db upgrade, teams create, keys create/revoke."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from sqlalchemy import select

from service.db.auth import create_key, create_team, find_team, revoke_key
from service.db.migrate import current, upgrade
from service.db.models import Team
from service.db.session import get_database
from service.jobs.queue import QUEUES
from service.jobs.runner import make_queue
from service.jobs.sweeper import sweep
from service.settings import get_settings

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the REST API (embedded default: SQLite + in-process "
                                     "jobs)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.add_argument("--no-migrate", action="store_true",
                   help="do not upgrade the SQLite schema on start (Postgres never is)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run a Celery worker (needs BITPLAN_REDIS_URL)")
    p.add_argument("--queues", default="gpu,cpu", help="comma-separated: gpu, cpu")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--pool", default="threads", choices=["threads", "solo", "prefork"])
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("worker-health", help="liveness of a worker on this host: exit 0 while "
                                             "its heartbeat file (BITPLAN_WORKER_HEARTBEAT_FILE)"
                                             " is fresh")
    p.add_argument("--max-age", type=float, default=None,
                   help="seconds (default: 3 heartbeat intervals, at least 30)")
    p.set_defaults(func=cmd_worker_health)

    p = sub.add_parser("sweep", help="re-send jobs nobody runs: queued ones whose message may be "
                                     "lost, running ones whose worker died (once, or --loop)")
    p.add_argument("--loop", action="store_true", help="keep sweeping every --interval seconds")
    p.add_argument("--interval", type=float, default=None,
                   help="seconds between sweeps (default: BITPLAN_SWEEP_INTERVAL_S)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("db", help="database administration")
    dsub = p.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    q = dsub.add_parser("upgrade", help="apply the Alembic migrations (default: to head)")
    q.add_argument("revision", nargs="?", default="head")
    q.set_defaults(func=cmd_db_upgrade)
    q = dsub.add_parser("current", help="print the schema revision")
    q.set_defaults(func=cmd_db_current)

    p = sub.add_parser("teams", help="team administration")
    tsub = p.add_subparsers(dest="teams_command", required=True, metavar="ACTION")
    q = tsub.add_parser("create", help="create a team")
    q.add_argument("name")
    q.set_defaults(func=cmd_teams_create)
    q = tsub.add_parser("list", help="list teams")
    q.set_defaults(func=cmd_teams_list)

    p = sub.add_parser("keys", help="API key administration")
    ksub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    q = ksub.add_parser("create", help="create an API key for a team (printed once)")
    q.add_argument("team", help="team name or id")
    q.add_argument("--label", default=None)
    q.set_defaults(func=cmd_keys_create)
    q = ksub.add_parser("revoke", help="revoke an API key (the key itself or its key id)")
    q.add_argument("key")
    q.set_defaults(func=cmd_keys_revoke)


def _db():
    return get_database(get_settings().resolved_database_url)


def cmd_serve(args) -> int:
    import uvicorn  # the web stack loads only for `serve`

    settings = get_settings()
    url = settings.resolved_database_url
    if url.startswith("sqlite") and not args.no_migrate:
        upgrade(url)
    mode = "Celery via Redis" if settings.redis_url else "in-process jobs"
    log.info("bitplan API on http://%s:%d (docs at /docs), %s", args.host, args.port, mode)
    if args.workers > 1:
        if not settings.redis_url:
            raise ValueError("--workers > 1 needs BITPLAN_REDIS_URL (in-process jobs live in one "
                             "process)")
        uvicorn.run("service.api.app:create_app", factory=True, host=args.host, port=args.port,
                    workers=args.workers, log_level="info")
    else:
        from service.api import create_app  # the web stack loads only for `serve`

        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")
    return 0


def cmd_worker(args) -> int:
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    bad = [q for q in queues if q not in QUEUES]
    if bad or not queues:
        raise ValueError(f"unknown queue(s) {bad or queues}; choose from {', '.join(QUEUES)}")
    if not get_settings().redis_url:
        raise ValueError("a worker needs BITPLAN_REDIS_URL; without it `bitplan serve` runs "
                         "jobs in-process")
    # Celery's own command line runs workers.app (the service never imports workers); exec
    # keeps this process's pid, so signals sent to `bitplan worker` reach the worker itself
    argv = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q",
            ",".join(queues), "--concurrency", str(args.concurrency), "--pool", args.pool,
            "--loglevel", args.loglevel, "--without-gossip", "--without-mingle",
            "-n", f"bitplan-{'-'.join(queues)}@%h"]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)
    return 0  # pragma: no cover - execv does not return


def cmd_worker_health(args) -> int:
    settings = get_settings()
    path = settings.worker_heartbeat_file
    if path is None:
        raise ValueError("set BITPLAN_WORKER_HEARTBEAT_FILE (for the worker and this check)")
    max_age = args.max_age if args.max_age is not None else max(30.0,
                                                                3 * settings.worker_heartbeat_s)
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        print(f"unhealthy: no heartbeat at {path} (worker not started, stopped or disconnected)")
        return 1
    if age > max_age:
        print(f"unhealthy: last heartbeat {age:.0f}s ago (limit {max_age:.0f}s)")
        return 1
    print(f"ok: last heartbeat {age:.1f}s ago")
    return 0


def cmd_sweep(args) -> int:

    settings = get_settings()
    interval = args.interval if args.interval is not None else settings.sweep_interval_s
    if args.loop and interval <= 0:
        raise ValueError("--loop needs a positive --interval")
    queue = make_queue(settings)
    try:
        while True:
            n = sweep(_db(), queue, settings.job_lease_s, settings.requeue_after_s)
            print(json.dumps({"requeued": n}), flush=True)
            if not args.loop:
                return 0
            time.sleep(interval)
    finally:
        if hasattr(queue, "wait_idle"):
            queue.wait_idle(3600)
        queue.close()


def cmd_db_upgrade(args) -> int:
    upgrade(get_settings().resolved_database_url, args.revision)
    print(f"database at revision {args.revision}")
    return 0


def cmd_db_current(args) -> int:
    print(current(get_settings().resolved_database_url) or "(empty)")
    return 0


def cmd_teams_create(args) -> int:
    with _db().session() as s:
        team = create_team(s, args.name)
        print(json.dumps({"id": team.id, "name": team.name}))
    return 0


def cmd_teams_list(args) -> int:

    with _db().session() as s:
        for t in s.scalars(select(Team).order_by(Team.name)):
            print(f"{t.id}  {t.name}")
    return 0


def cmd_keys_create(args) -> int:
    with _db().session() as s:
        team = find_team(s, args.team)
        if team is None:
            raise ValueError(f"no team {args.team!r}; create it with `bitplan teams create`")
        row, key = create_key(s, team, args.label)
    print(key)
    if sys.stderr.isatty() or os.environ.get("BITPLAN_VERBOSE_KEYS"):
        print(f"key id {row.key_id} for team {team.name}: shown once, store it now",
              file=sys.stderr)
    return 0


def cmd_keys_revoke(args) -> int:
    with _db().session() as s:
        n = revoke_key(s, args.key)
    if n == 0:
        raise ValueError("no active key matches")
    print(f"revoked {n} key(s)")
    return 0
