"""Wake-ups for stream readers: a tiny message on the channel layer after an event commits.

The database is the truth; a wake-up only tells readers in other processes to look now instead
of at their next re-check. A wake-up that cannot be published is dropped (and logged): a Redis
hiccup delays readers by at most STREAM_RECHECK_S and never fails a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
import time
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
    """Publishes at once, on a private event loop of the calling thread.

    No background thread and no queue that could grow while Redis is slow: the caller pays the
    Redis round trips (about a millisecond), bounded by TIMEOUT_S. After a failure, publishing
    pauses for PAUSE_S so an unreachable Redis cannot slow runs down; readers then rely on the
    database re-check.
    """

    TIMEOUT_S = 0.25
    PAUSE_S = 5.0

    def __init__(self) -> None:
        self._pid: int | None = None
        self._local = threading.local()
        self._layer: Any = None
        self._paused_until = 0.0

    def _ensure_layer(self) -> None:
        if self._pid != os.getpid():  # new process (fork): new connections
            # Its own layer instance: channels_redis keeps connection pools per event loop.
            self._layer = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)
            self._local = threading.local()
            self._pid = os.getpid()

    def _loop(self) -> asyncio.AbstractEventLoop:
        loop = getattr(self._local, "loop", None)
        if loop is None:
            loop = self._local.loop = asyncio.new_event_loop()
        return loop

    def publish(self, messages: list[tuple[str, dict]]) -> None:
        if time.monotonic() < self._paused_until:
            return
        self._ensure_layer()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None:  # called from async code: do not block its loop
            task = running.create_task(self._send(messages))
            _pending.add(task)
            task.add_done_callback(_pending.discard)
            return
        loop = self._loop()
        try:
            loop.run_until_complete(asyncio.wait_for(self._send(messages), self.TIMEOUT_S))
        except Exception as e:
            self._paused_until = time.monotonic() + self.PAUSE_S
            logger.warning("stream wake-ups paused for %s s: %r", self.PAUSE_S, e)

    async def _send(self, messages: list[tuple[str, dict]]) -> None:
        await asyncio.gather(*(self._layer.group_send(group, msg) for group, msg in messages))


_pending: set[asyncio.Task] = set()
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
