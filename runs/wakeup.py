"""Wake-ups for stream readers: a tiny message on the channel layer after an event commits.

The database is the truth; a wake-up only tells readers in other processes to look now instead
of at their next re-check. Publishing is fire-and-forget from a background event loop owned by
this process, so `event_append` never waits for Redis and a Redis hiccup never fails a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any
from uuid import UUID

from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers
from django.conf import settings

logger = logging.getLogger(__name__)

# Events that change what the status feed shows (status or progress).
FEED_EVENTS = frozenset(
    {
        "run.queued",
        "run.started",
        "agent.started",
        "agent.completed",
        "run.completed",
        "run.failed",
        "run.cancelled",
        "run.timed_out",
    }
)
TERMINAL_EVENTS = frozenset({"run.completed", "run.failed", "run.cancelled", "run.timed_out"})
FEED_ALL_GROUP = "feed.all"


def run_group(run_id: UUID | str) -> str:
    return f"run.{run_id}"


def feed_group(owner_id: int | str) -> str:
    return f"feed.owner.{owner_id}"


class _Publisher:
    """One asyncio loop in a daemon thread per process (re-made after a fork)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._layer: Any = None

    def _ensure(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._pid != os.getpid() or self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="wakeup", daemon=True).start()
                # Its own layer instance: channels_redis keeps connection pools per event loop.
                self._layer = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)
                self._loop, self._pid = loop, os.getpid()
            return self._loop

    def publish(self, messages: list[tuple[str, dict]]) -> None:
        loop = self._ensure()
        future = asyncio.run_coroutine_threadsafe(self._send(messages), loop)
        future.add_done_callback(_log_failure)

    async def _send(self, messages: list[tuple[str, dict]]) -> None:
        for group, message in messages:
            await self._layer.group_send(group, message)


def _log_failure(future) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.warning("stream wake-up not published: %s", future.exception())


_publisher = _Publisher()


def wakeup_socket_path() -> str | None:
    """Embedded default: the web process listens for wake-ups on a Unix datagram socket next to
    the SQLite database, so the worker process can reach it without Redis."""
    if settings.STREAM_WAKEUP_VIA_LAYER or not settings.EMBEDDED:
        return None
    path = str(Path(settings.DATA_DIR) / "stream-wakeup.sock")
    return path if len(path.encode()) < 100 else None  # AF_UNIX paths are short


class _DatagramSender:
    """Non-blocking sends; no listener, a full buffer or any error just drops the wake-up."""

    def __init__(self) -> None:
        self._pid: int | None = None
        self._sock: socket.socket | None = None

    def send(self, path: str, payload: bytes) -> None:
        if self._pid != os.getpid() or self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
            self._pid = os.getpid()
        with contextlib.suppress(OSError):
            self._sock.sendto(payload, path)


_datagrams = _DatagramSender()


def wakeup_publish(*, run_id: UUID | str, owner_id: int | None, seq: int, event: str) -> None:
    """Wake readers of this run (and of the owner's status feed when status or progress moved).

    Called from `transaction.on_commit`. Without Redis the in-memory layer cannot reach another
    process, so the wake-up goes as a datagram to the web process's socket in DATA_DIR; readers
    there also re-check the database every STREAM_POLL_MS in case it does not arrive.
    """
    run = str(run_id)
    if not settings.STREAM_WAKEUP_VIA_LAYER:
        path = wakeup_socket_path()
        if path:
            feed = owner_id if event in FEED_EVENTS else None
            _datagrams.send(path, json.dumps({"run": run, "seq": seq, "owner": feed}).encode())
        return
    messages = [(run_group(run), {"type": "run.wake", "run": run, "seq": seq})]
    if event in FEED_EVENTS and owner_id is not None:
        feed = {"type": "feed.wake", "run": run, "owner": owner_id}
        messages += [(feed_group(owner_id), feed), (FEED_ALL_GROUP, feed)]
    try:
        _publisher.publish(messages)
    except Exception:  # a wake-up must never break the write that caused it
        logger.exception("stream wake-up not scheduled")
