"""Caps on open streams: STREAMS_PER_KEY per API key (across processes) and STREAMS_MAX per process.

With Redis, each open stream is a lease in a sorted set per key, scored by its expiry: a process
refreshes its leases every LEASE_TTL_S / 3, so the leases of a process that dies (or is restarted
with streams open) drop out within LEASE_TTL_S instead of blocking the key. Without Redis there
is one web process (the embedded default) and the count lives in it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from functools import cache

import redis
from asgiref.sync import sync_to_async
from django.conf import settings

from agentsvc.errors import PROBLEMS, ApplicationError

logger = logging.getLogger(__name__)

# The 503 of a full web process; registered here, beside the limit it explains.
PROBLEMS.setdefault(
    "streams_full",
    (
        503,
        "Too many open streams",
        "This web process holds as many open streams as it may (STREAMS_MAX); retry after "
        "Retry-After, when a load balancer may send you to another one.",
    ),
)

LEASE_TTL_S = 60
_PREFIX = "agentsvc:streams:key:"

_open_here = 0
_local_by_key: dict[int, int] = {}
_held: dict[str, int] = {}  # lease id -> key id, refreshed while held
_refreshers: dict[asyncio.AbstractEventLoop, asyncio.Task] = {}


class StreamLimitExceeded(Exception):
    def __init__(self, scope: str) -> None:
        super().__init__(scope)
        self.scope = scope  # "key" (429) or "server" (503)


def open_streams_here() -> int:
    return _open_here


@cache
def _redis() -> redis.Redis | None:
    return redis.Redis.from_url(settings.REDIS_URL) if settings.REDIS_URL else None


def _shared_acquire(key_id: int, lease: str) -> bool:
    client, name, now = _redis(), f"{_PREFIX}{key_id}", time.time()
    pipe = client.pipeline(transaction=True)
    pipe.zremrangebyscore(name, "-inf", now)
    pipe.zadd(name, {lease: now + LEASE_TTL_S})
    pipe.zcard(name)
    pipe.expire(name, LEASE_TTL_S)
    count = pipe.execute()[2]
    if count > settings.STREAMS_PER_KEY:
        client.zrem(name, lease)
        return False
    return True


def _shared_release(key_id: int, lease: str) -> None:
    _redis().zrem(f"{_PREFIX}{key_id}", lease)


def _shared_refresh(held: dict[str, int]) -> None:
    expiry = time.time() + LEASE_TTL_S
    pipe = _redis().pipeline(transaction=False)
    for lease, key_id in held.items():
        pipe.zadd(f"{_PREFIX}{key_id}", {lease: expiry}, xx=True)
        pipe.expire(f"{_PREFIX}{key_id}", LEASE_TTL_S)
    pipe.execute()


async def _refresh_forever() -> None:
    while True:
        await asyncio.sleep(LEASE_TTL_S / 3)
        if _held:
            try:
                await sync_to_async(_shared_refresh, thread_sensitive=False)(dict(_held))
            except Exception:
                logger.exception("stream leases not refreshed")


class StreamLease:
    """One open stream. `acquire` raises StreamLimitExceeded; `release` is idempotent."""

    def __init__(self, key_id: int | None) -> None:
        self.key_id = key_id
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.held = False
        self.shared = False
        self.counted_here = False

    async def acquire(self) -> StreamLease:
        global _open_here
        if _open_here >= settings.STREAMS_MAX:
            raise StreamLimitExceeded("server")
        _open_here += 1
        self.held = True
        if self.key_id is None:
            return self
        if _redis() is None:
            if _local_by_key.get(self.key_id, 0) >= settings.STREAMS_PER_KEY:
                self._release_local()
                raise StreamLimitExceeded("key")
            _local_by_key[self.key_id] = _local_by_key.get(self.key_id, 0) + 1
            self.counted_here = True
            return self
        try:
            ok = await sync_to_async(_shared_acquire, thread_sensitive=False)(self.key_id, self.id)
        except BaseException:
            self._release_local()
            raise
        if not ok:
            self._release_local()
            raise StreamLimitExceeded("key")
        self.shared = True
        _held[self.id] = self.key_id
        loop = asyncio.get_running_loop()
        if loop not in _refreshers:
            _refreshers[loop] = loop.create_task(_refresh_forever())
        return self

    def _release_local(self) -> None:
        global _open_here
        if self.held:
            self.held = False
            _open_here -= 1
            if self.counted_here:
                self.counted_here = False
                _local_by_key[self.key_id] = max(0, _local_by_key.get(self.key_id, 0) - 1)

    async def release(self) -> None:
        if not self.held:
            return
        self._release_local()
        if self.shared:
            self.shared = False
            _held.pop(self.id, None)
            try:
                await sync_to_async(_shared_release, thread_sensitive=False)(self.key_id, self.id)
            except Exception:
                logger.exception("stream lease not released; it expires in %s s", LEASE_TTL_S)


async def stream_lease(key_id: int) -> StreamLease:
    """A lease for one more open stream of this key (SSE, A2A, an MCP tool call): 429
    `concurrency_limit` over STREAMS_PER_KEY, 503 `streams_full` over STREAMS_MAX."""
    try:
        return await StreamLease(key_id).acquire()
    except StreamLimitExceeded as e:
        if e.scope == "key":
            raise ApplicationError(
                "concurrency_limit",
                f"This key may hold {settings.STREAMS_PER_KEY} open streams at once.",
                headers={"Retry-After": "1"},
                **{"violated-policies": ["streams"]},
            ) from None
        raise ApplicationError(
            "streams_full",
            "This server holds as many open streams as it may; try again shortly.",
            headers={"Retry-After": "1"},
        ) from None
