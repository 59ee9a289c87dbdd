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

from runs.events import FEED_EVENTS, RUN_QUEUED

logger = logging.getLogger(__name__)

FEED_ALL_GROUP = "feed.all"
# Every executor process listens here for "a run was queued": claim now, not at the next poll.
EXECUTORS_GROUP = "executors"


def run_group(run_id: UUID | str) -> str:
    return f"run.{run_id}"


def feed_group(owner_id: int | str) -> str:
    return f"feed.owner.{owner_id}"


class _Publisher:
    """Publishes from one background thread per process, on its own long-lived event loop.

    The channel layer keeps a Redis connection pool per event loop: one loop means one pool,
    whichever thread (a request's, a worker's) asks. Callers hand the messages over and go on;
    at most MAX_PENDING are in flight, beyond that wake-ups are dropped, so a slow Redis builds
    no queue. A send taking over TIMEOUT_S, or failing, pauses publishing for PAUSE_S: readers
    then rely on the database re-check.

    A run's wake-up goes at once. The others only say "look again" (an owner's feed, the staff
    feed, the executors): they gather for LINGER_S and each goes once, and a process sends them
    at most once per SIGNAL_INTERVAL_S. The runs queued in the same moments wake the executors
    and the feeds once, not once per run: at hundreds of creates a second, publishing one group
    message per run and group cost a tenth of a web process's CPU.
    """

    TIMEOUT_S = 0.25
    PAUSE_S = 5.0
    MAX_PENDING = 1000
    LINGER_S = 0.002
    SIGNAL_INTERVAL_S = 0.02

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._layer: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending = 0
        self._signals: dict[str, dict] = {}  # group -> message, waiting out the linger
        self._signals_sent = 0.0  # monotonic time of the last send of signals
        self._paused_until = 0.0

    def _start(self) -> asyncio.AbstractEventLoop:
        if self._pid != os.getpid():  # first use, or a forked child: a thread and pool of its own
            self._layer = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)
            self._loop = asyncio.new_event_loop()
            self._pending = 0
            self._signals = {}
            self._signals_sent = 0.0
            threading.Thread(
                target=self._loop.run_forever, name="wakeup-publisher", daemon=True
            ).start()
            self._pid = os.getpid()
        return self._loop

    def publish(self, messages: list[tuple[str, dict]]) -> None:
        if time.monotonic() < self._paused_until:
            return
        runs = [m for m in messages if m[1]["type"] == "run.wake"]
        with self._lock:
            loop = self._start()
            lingering = bool(self._signals)
            for group, message in messages:
                if message["type"] != "run.wake":
                    self._signals[group] = message
            if self._signals and not lingering:
                due = self._signals_sent + self.SIGNAL_INTERVAL_S - time.monotonic()
                delay = max(self.LINGER_S, due)
                loop.call_soon_threadsafe(loop.call_later, delay, self._signals_due)
            if not runs or self._pending >= self.MAX_PENDING:
                return
            self._pending += 1
        asyncio.run_coroutine_threadsafe(self._send(runs), loop)

    def _signals_due(self) -> None:  # on the publisher's loop
        with self._lock:
            signals, self._signals = list(self._signals.items()), {}
            self._signals_sent = time.monotonic()
            if self._pending >= self.MAX_PENDING:
                return
            self._pending += 1
        self._loop.create_task(self._send(signals))

    async def _send(self, messages: list[tuple[str, dict]]) -> None:
        try:
            sends = (self._layer.group_send(group, msg) for group, msg in messages)
            # A group commit hands over hundreds at once: a little more time for those.
            timeout = min(self.TIMEOUT_S + 0.002 * len(messages), 2.0)
            await asyncio.wait_for(asyncio.gather(*sends), timeout)
        except Exception as e:
            if time.monotonic() >= self._paused_until:  # one line per pause, not per send
                logger.warning("stream wake-ups paused for %s s: %r", self.PAUSE_S, e)
            self._paused_until = time.monotonic() + self.PAUSE_S
        finally:
            with self._lock:
                self._pending -= 1


_publisher = _Publisher()


def _socket_path(name: str) -> str | None:
    if settings.STREAM_WAKEUP_VIA_LAYER or not settings.EMBEDDED:
        return None
    path = str(Path(settings.DATA_DIR) / name)
    return path if len(path.encode()) < 100 else None  # AF_UNIX paths are short


def wakeup_socket_path() -> str | None:
    """Embedded default: the web process listens for wake-ups on a Unix datagram socket next to
    the SQLite database, so the executor process can reach it without Redis."""
    return _socket_path("stream-wakeup.sock")


def executor_socket_path() -> str | None:
    """Embedded default: the executor listens here for queued runs (web to executor)."""
    return _socket_path("executor-wakeup.sock")


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


Wakeup = tuple[UUID | str, int | None, int, str, bool]  # run, owner, seq, last event, feed?


def wakeups_publish(wakeups: list[Wakeup]) -> None:
    """Wake readers of these runs (and the owners' status feeds where status or progress moved),
    and the executors when a run was queued. Called from `transaction.on_commit`.

    Without Redis the in-memory layer cannot reach another process, so each wake-up goes as a
    datagram to the web process's (or the executor's) socket in DATA_DIR; readers there also
    re-check the database every STREAM_POLL_MS in case it does not arrive."""
    queued = any(event == RUN_QUEUED for _, _, _, event, _ in wakeups)
    if not settings.STREAM_WAKEUP_VIA_LAYER:
        path = wakeup_socket_path()
        if path:
            for run_id, owner_id, seq, _, feed in wakeups:
                owner = owner_id if feed else None
                payload = json.dumps({"run": str(run_id), "seq": seq, "owner": owner}).encode()
                _datagrams.send(path, payload)
        executors = executor_socket_path()
        if queued and executors:
            _datagrams.send(executors, b"queued")
        return
    messages = []
    owners: set[int] = set()
    for run_id, owner_id, seq, event, feed in wakeups:
        run = str(run_id)
        if not (seq == 1 and event == RUN_QUEUED):  # nobody reads a run before it is answered
            messages.append((run_group(run), {"type": "run.wake", "run": run, "seq": seq}))
        if feed and owner_id is not None:
            owners.add(owner_id)
    # A feed wake only says "look again": one per owner, and one for the staff feed.
    for owner_id in owners:
        messages.append((feed_group(owner_id), {"type": "feed.wake", "owner": owner_id}))
    if owners:
        messages.append((FEED_ALL_GROUP, {"type": "feed.wake", "owner": next(iter(owners))}))
    if queued:
        messages.append((EXECUTORS_GROUP, {"type": "executor.wake"}))
    try:
        _publisher.publish(messages)
    except Exception:  # a wake-up must never break the write that caused it
        logger.exception("stream wake-up not scheduled")


def executors_wake_for_cancel() -> None:
    """A running run was asked to stop: its executor looks at once instead of at its next
    cancellation poll. Called on commit; dropped like any wake-up, the poll is the fallback."""
    if not settings.STREAM_WAKEUP_VIA_LAYER:
        path = executor_socket_path()
        if path:
            _datagrams.send(path, b"cancel")
        return
    try:
        _publisher.publish([(EXECUTORS_GROUP, {"type": "executor.cancel"})])
    except Exception:
        logger.exception("executor wake-up not scheduled")


def wakeup_publish(*, run_id: UUID | str, owner_id: int | None, seq: int, event: str) -> None:
    """One run's wake-up (see wakeups_publish)."""
    wakeups_publish([(run_id, owner_id, seq, event, event in FEED_EVENTS)])
