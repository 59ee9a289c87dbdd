"""Readiness: is this process able to take traffic, and can runs actually run?"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.core.cache import caches
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

# Checks whose failure makes the service not ready (docs/api.md section 9); models are added below.
REQUIRED = ["database", "migrations", "broker", "workers"]
# Checks that feature apps add at start-up (name -> fn returning a detail, raising when not ok).
_checks: dict[str, Callable[[], str]] = {}
# The models the published chains need (runs/availability.py): {"provider/model": check}, every
# one required. Read only when the database answers.
_models: Callable[[], dict[str, dict[str, Any]]] = dict


def check_register(name: str, check: Callable[[], str], *, required: bool) -> None:
    _checks[name] = check
    if required and name not in REQUIRED:
        REQUIRED.append(name)


def models_check_register(check: Callable[[], dict[str, dict[str, Any]]]) -> None:
    global _models
    _models = check


def _timed(check: Callable[[], str]) -> dict[str, Any]:
    started = time.monotonic()
    try:
        detail, ok = check(), True
    except Exception as e:
        detail, ok = f"{type(e).__name__}: {e}"[:300], False
    return {"ok": ok, "latency_ms": round((time.monotonic() - started) * 1000, 1), "detail": detail}


def _database() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return connection.vendor


_migrations_ok_at = 0.0


def _migrations() -> str:
    global _migrations_ok_at
    if time.monotonic() - _migrations_ok_at < 60:
        return "applied"
    executor = MigrationExecutor(connection)
    plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
    if plan:
        raise RuntimeError(f"{len(plan)} migrations not applied")
    _migrations_ok_at = time.monotonic()
    return "applied"


def _cache() -> str:
    cache = caches["default"]
    cache.set("readyz", "1", 10)
    if cache.get("readyz") != "1":
        raise RuntimeError("value written was not read back")
    return type(cache).__name__


def _channel_layer() -> str:
    layer = get_channel_layer()
    async_to_sync(layer.group_send)("readyz", {"type": "readyz.ping"})
    return type(layer).__name__


def _broker() -> str:
    from agentsvc.broker import broker as process_broker

    broker = process_broker()
    if not broker.ping():
        raise RuntimeError("broker did not answer")
    return f"{type(broker).__name__}, {broker.queue_size()} queued"


def _workers() -> str:
    from django_q.conf import Conf
    from django_q.status import Stat

    clusters = [s for s in Stat.get_all() if s.status in (Conf.IDLE, Conf.WORKING)]
    if not clusters:
        raise RuntimeError("no worker cluster is alive")
    return f"{len(clusters)} cluster(s), {sum(len(s.workers) for s in clusters)} workers"


def processes_not_ready() -> dict[str, str]:
    """The processes that runs need (the worker cluster, and those the apps registered: the
    executors) that are not up: {check: detail}, empty when all are (`manage.py serve` waits
    for this before its banner)."""
    checks = {"workers": _workers, **_checks}
    results = {name: _timed(check) for name, check in checks.items()}
    return {name: r["detail"] for name, r in results.items() if not r["ok"]}


def readiness() -> tuple[bool, dict[str, Any]]:
    database = _timed(_database)
    skipped = {"ok": False, "latency_ms": 0, "detail": "skipped: the database is unreachable"}
    checks: dict[str, Any] = {
        "database": database,
        # Without a database this would wait for a connection again and say nothing new.
        "migrations": _timed(_migrations) if database["ok"] else skipped,
        "cache": _timed(_cache),
        "channel_layer": _timed(_channel_layer),
        "broker": _timed(_broker),
        "workers": _timed(_workers),
        **{name: _timed(check) for name, check in _checks.items()},
        "models": {},
    }
    if database["ok"]:
        try:
            checks["models"] = _models()
        except Exception as e:
            checks["models"] = {"*": {"ok": False, "latency_ms": 0, "detail": str(e)[:300]}}
    ready = all(checks[name]["ok"] for name in REQUIRED) and all(
        m["ok"] for m in checks["models"].values()
    )
    return ready, checks
