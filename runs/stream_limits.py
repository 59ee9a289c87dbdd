"""Caps on open streams: STREAMS_PER_KEY per API key (across processes) and STREAMS_MAX per process.

The per-key count lives in the cache (Redis in production, so every web process shares it). A
process that dies holding streams leaks its counts until the cache key expires (LEASE_TTL_S after
the key's last stream opened); counts are never trusted below zero.
"""

from __future__ import annotations

import logging

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import cache

logger = logging.getLogger(__name__)

LEASE_TTL_S = 3600

_open_here = 0


class StreamLimitExceeded(Exception):
    def __init__(self, scope: str) -> None:
        super().__init__(scope)
        self.scope = scope  # "key" (429) or "server" (503)


def open_streams_here() -> int:
    return _open_here


def _key_name(key_id: int) -> str:
    return f"streams:key:{key_id}"


def _key_acquire(key_id: int) -> bool:
    name = _key_name(key_id)
    cache.add(name, 0, LEASE_TTL_S)
    try:
        count = cache.incr(name)
    except ValueError:  # expired between add and incr
        cache.add(name, 1, LEASE_TTL_S)
        count = 1
    cache.touch(name, LEASE_TTL_S)
    if count > settings.STREAMS_PER_KEY:
        _key_release(key_id)
        return False
    return True


def _key_release(key_id: int) -> None:
    try:
        if cache.decr(_key_name(key_id)) < 0:
            cache.set(_key_name(key_id), 0, LEASE_TTL_S)
    except ValueError:
        pass  # expired: nothing to give back


class StreamLease:
    """One open stream. `acquire` raises StreamLimitExceeded; `release` is idempotent."""

    def __init__(self, key_id: int | None) -> None:
        self.key_id = key_id
        self.held = False

    async def acquire(self) -> StreamLease:
        global _open_here
        if _open_here >= settings.STREAMS_MAX:
            raise StreamLimitExceeded("server")
        _open_here += 1
        self.held = True
        if self.key_id is not None:
            try:
                ok = await sync_to_async(_key_acquire, thread_sensitive=False)(self.key_id)
            except BaseException:
                self._release_local()
                raise
            if not ok:
                self._release_local()
                raise StreamLimitExceeded("key")
        return self

    def _release_local(self) -> None:
        global _open_here
        if self.held:
            self.held = False
            _open_here -= 1

    async def release(self) -> None:
        if not self.held:
            return
        self._release_local()
        if self.key_id is not None:
            try:
                await sync_to_async(_key_release, thread_sensitive=False)(self.key_id)
            except Exception:
                logger.exception("stream lease not released in the cache")
