"""What every log line says about where it comes from: the request or run it was written for,
and the API key's display prefix (never the key).

The fields live in context variables, so they follow the work wherever it runs: a request's
ASGI task and the thread its sync view runs on (asgiref copies the context there and back), a
run's coroutine (set inside its task, which copies the context at creation), and the threads
the executor hands database work and webhook attempts to (which run_in_executor does not copy:
those callers pass the context on themselves). `ContextFilter` puts them on every record.
"""

from __future__ import annotations

import contextlib
import logging
import re
import uuid
from collections.abc import Iterator
from contextvars import ContextVar, Token

from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

FIELDS = ("request_id", "run_id", "key_prefix")
_vars: dict[str, ContextVar[str | None]] = {name: ContextVar(name, default=None) for name in FIELDS}

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def request_id_from(value: str | bytes | None) -> str:
    """The caller's X-Request-ID if it is 1-128 of [A-Za-z0-9._-], else a new one: a bad value
    is replaced, never refused (it only names the request in logs)."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if value and _REQUEST_ID.fullmatch(value):
        return value
    return uuid.uuid4().hex


def current() -> dict[str, str]:
    """The fields set in this context."""
    return {name: value for name, var in _vars.items() if (value := var.get()) is not None}


def bind(**fields: str | None) -> dict[str, Token]:
    """Set fields in this context (until `unbind` with the tokens, or the context ends)."""
    return {
        name: _vars[name].set(None if value is None else str(value))
        for name, value in fields.items()
    }


def unbind(tokens: dict[str, Token]) -> None:
    for name, token in tokens.items():
        _vars[name].reset(token)


@contextlib.contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    tokens = bind(**fields)
    try:
        yield
    finally:
        unbind(tokens)


class ContextFilter(logging.Filter):
    """Adds request_id, run_id and key_prefix to every record passing the handler (those set)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _vars.items():
            value = var.get()
            if value is not None and not hasattr(record, name):
                setattr(record, name, value)
        return True


class TaskChatterFilter(logging.Filter):
    """django-q2 writes four INFO lines for every task it runs (enqueued, created from its
    schedule, processing, processed): on an idle service, the keeper's and the purge's ticks
    every 30 s. Those lines go; the cluster's start and stop and every warning and error (a
    task that failed) stay. The scheduled tasks log themselves what they did, when they did
    something."""

    _PER_TASK = frozenset({"tasks", "scheduler", "worker", "monitor"})  # django_q's modules

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.module not in self._PER_TASK


class PlainFormatter(logging.Formatter):
    """`time level logger message`, then ` request_id=… run_id=… key_prefix=…` where set."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = " ".join(
            f"{name}={value}" for name in FIELDS if (value := getattr(record, name, None))
        )
        if not extra:
            return text
        first, newline, rest = text.partition("\n")  # after the message, before a traceback
        return f"{first} {extra}{newline}{rest}"


class JsonFormatter(_JsonFormatter):
    """One JSON object a line. Only known fields are written: Django passes the request object
    as an `extra`, and its text (the full URL) has no business in a log shipper."""

    KEEP = frozenset(
        {"time", "level", "logger", "message", "exc_info", "stack_info", "status_code", *FIELDS}
    )

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("rename_fields", {"levelname": "level", "name": "logger"})
        kwargs.setdefault("timestamp", "time")  # ISO 8601, UTC
        super().__init__("%(levelname)s %(name)s %(message)s", *args, **kwargs)

    def add_fields(self, log_data, record, message_dict) -> None:
        super().add_fields(log_data, record, message_dict)
        for key in [k for k in log_data if k not in self.KEEP]:
            del log_data[key]
