"""The per-process wake-up hub every stream reader waits on.

One hub per event loop (daphne has one). It holds one channel-layer channel for the whole process
and joins a run's group only while someone here watches that run, so an event costs one Redis
message per web process, not one per reader; readers are woken locally.

In the embedded default (no Redis; the in-memory layer cannot reach the worker process) the
wake-ups come as datagrams on a Unix socket in DATA_DIR instead. Wake-ups may be lost either way,
so the hub also re-checks the database on a timer: every STREAM_RECHECK_S with Redis, every
STREAM_POLL_MS without. Each tick is one query per process
(the watched runs' `last_seq`, and the newest feed event id), whatever the number of readers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import AsyncIterator

from channels.layers import get_channel_layer
from django.conf import settings
from django.db.models import Max

from agentsvc.db import db_async
from runs.events import FEED_EVENTS
from runs.models import Run, RunEvent
from runs.wakeup import FEED_ALL_GROUP, feed_group, run_group, wakeup_socket_path

logger = logging.getLogger(__name__)

CHUNK = 500


class Waiter:
    """A reader's doorbell: set by the hub, cleared by the reader when it re-reads."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def ring(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> bool:
        """True when rung, False on timeout."""
        if not self._event.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), timeout)
        rung = self._event.is_set()
        self._event.clear()
        return rung


def _last_seqs(run_ids: list[str]) -> dict[str, int]:
    seqs: dict[str, int] = {}
    for i in range(0, len(run_ids), CHUNK):
        rows = Run.objects.filter(pk__in=run_ids[i : i + CHUNK]).values_list("pk", "last_seq")
        seqs.update((str(pk), seq) for pk, seq in rows)
    return seqs


def _feed_head() -> int:
    return RunEvent.objects.filter(type__in=FEED_EVENTS).aggregate(m=Max("pk"))["m"] or 0


class Hub:
    def __init__(self) -> None:
        self.runs: dict[str, set[Waiter]] = {}
        self.feeds: dict[str, set[Waiter]] = {}  # group name -> waiters
        self.known_seq: dict[str, int] = {}
        self.feed_head = -1
        self.via_layer = settings.STREAM_WAKEUP_VIA_LAYER
        self.layer = get_channel_layer() if self.via_layer else None
        self.channel: str | None = None
        self.reads: dict[tuple, asyncio.Future] = {}  # reads in flight, shared (runs.streams)
        self._ready = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []

    @property
    def interval(self) -> float:
        if self.via_layer:
            return settings.STREAM_RECHECK_S
        return settings.STREAM_POLL_MS / 1000

    async def _start(self) -> None:
        async with self._ready:
            if self._tasks:
                return
            if self.layer is not None:
                # The default prefix, as every WebSocket consumer's channel: channels-redis reads
                # all of a process's channels through one lock but one Redis list per prefix, so
                # under another prefix the hub's wake-ups waited behind a consumer's blocking pop
                # (up to 5 s) and readers only saw events at the next re-check.
                self.channel = await self.layer.new_channel()
                self._tasks.append(asyncio.create_task(self._listen()))
            else:
                await self._bind_datagrams()
            self._tasks.append(asyncio.create_task(self._recheck()))

    async def _bind_datagrams(self) -> None:
        """Embedded default: take the wake-up socket in DATA_DIR (the newest web process wins;
        any other keeps polling the database)."""
        path = wakeup_socket_path()
        if not path:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(path)
            os.chmod(path, 0o600)
            await asyncio.get_running_loop().create_datagram_endpoint(
                lambda: _Datagrams(self), sock=sock
            )
        except OSError as e:
            logger.warning("stream hub: no wake-up socket (%s); polling the database only", e)

    @contextlib.asynccontextmanager
    async def watch_run(self, run_id: str) -> AsyncIterator[Waiter]:
        async with self._watch(self.runs, run_id, run_group(run_id)) as waiter:
            yield waiter

    @contextlib.asynccontextmanager
    async def watch_feed(self, owner_id: int | None) -> AsyncIterator[Waiter]:
        """owner_id None: every run (staff)."""
        group = FEED_ALL_GROUP if owner_id is None else feed_group(owner_id)
        async with self._watch(self.feeds, group, group) as waiter:
            yield waiter

    @contextlib.asynccontextmanager
    async def _watch(self, table: dict, name: str, group: str) -> AsyncIterator[Waiter]:
        await self._start()
        waiter = Waiter()
        waiters = table.setdefault(name, set())
        first = not waiters
        waiters.add(waiter)
        try:
            if first and table is self.runs:
                self.known_seq[name] = 0  # the next re-check rings it once: no gap at subscribe
            if first and self.layer is not None:
                try:
                    await self.layer.group_add(group, self.channel)
                except Exception:  # Redis away: the database re-check still finds every event
                    logger.warning("stream hub: could not join %s", group, exc_info=True)
            yield waiter
        finally:
            waiters.discard(waiter)
            if not waiters and table.get(name) is waiters:
                del table[name]
                self.known_seq.pop(name, None)
                if self.layer is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(self.layer.group_discard(group, self.channel))

    def _ring(self, waiters: set[Waiter] | None) -> None:
        for waiter in waiters or ():
            waiter.ring()

    async def _listen(self) -> None:
        while True:
            try:
                message = await self.layer.receive(self.channel)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("stream hub: channel layer receive failed; retrying")
                await asyncio.sleep(1)
                continue
            if message.get("type") == "run.wake":
                self.wake_run(message.get("run", ""), message.get("seq", 0))
            elif message.get("type") == "feed.wake":
                self.wake_feed(message.get("owner"))

    def wake_run(self, run: str, seq: int) -> None:
        if seq > self.known_seq.get(run, seq):
            self.known_seq[run] = seq
        self._ring(self.runs.get(run))

    def wake_feed(self, owner_id) -> None:
        self._ring(self.feeds.get(feed_group(owner_id)))
        self._ring(self.feeds.get(FEED_ALL_GROUP))

    async def _recheck(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self._recheck_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("stream hub: database re-check failed")

    async def _recheck_once(self) -> None:
        if self.runs:
            seqs = await db_async(_last_seqs)(list(self.runs))
            for run, seq in seqs.items():
                if seq > self.known_seq.get(run, seq):
                    self.known_seq[run] = seq
                    self._ring(self.runs.get(run))
        if self.feeds:
            head = await db_async(_feed_head)()
            if head != self.feed_head:
                self.feed_head = head
                for waiters in list(self.feeds.values()):
                    self._ring(waiters)
        else:
            self.feed_head = -1

    @property
    def watching(self) -> int:
        return sum(len(w) for w in self.runs.values()) + sum(len(w) for w in self.feeds.values())


class _Datagrams(asyncio.DatagramProtocol):
    """Wake-ups from the worker process in the embedded default (runs.wakeup)."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def datagram_received(self, data: bytes, addr) -> None:
        try:
            message = json.loads(data)
            self.hub.wake_run(str(message["run"]), int(message["seq"]))
            if message.get("owner") is not None:
                self.hub.wake_feed(message["owner"])
        except (ValueError, KeyError, TypeError):
            pass  # not ours: ignore


_hubs: dict[asyncio.AbstractEventLoop, Hub] = {}


def get_hub() -> Hub:
    """The hub of the running event loop."""
    loop = asyncio.get_running_loop()
    hub = _hubs.get(loop)
    if hub is None:
        for stale in [lp for lp in _hubs if lp.is_closed()]:
            del _hubs[stale]
        hub = _hubs[loop] = Hub()
    return hub
