"""The task queue (django-q2): one broker per process, shared by every thread.

`get_broker()` builds a new broker, and with Redis a new connection pool, on every call: a TCP
connection per enqueued task. The process keeps one instead (a forked child makes its own).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from django_q.brokers import Broker, get_broker
from django_q.tasks import async_task

_lock = threading.Lock()
_broker: tuple[int, Broker] | None = None


def broker() -> Broker:
    global _broker
    with _lock:
        if _broker is None or _broker[0] != os.getpid():
            _broker = (os.getpid(), get_broker())
        return _broker[1]


def enqueue(func: str, *args: Any, **options: Any) -> None:
    async_task(func, *args, broker=broker(), save=False, **options)
