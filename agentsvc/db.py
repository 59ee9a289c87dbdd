"""Database work called from async code (streams, the hub, the WebSocket consumers)."""

from __future__ import annotations

from collections.abc import Callable

from channels.db import database_sync_to_async


def db_async(fn: Callable) -> Callable:
    """`fn` awaitable, run in the default executor in parallel with other calls.

    Not thread-sensitive: that would put every stream's queries through one thread. The thread's
    connection is checked before the call and handed back to the pool after it (CONN_MAX_AGE is
    0): an executor thread keeps no pooled connection checked out while it sits idle, which with
    a few such threads would exhaust a small pool and turn every other request into a 503."""
    return database_sync_to_async(fn, thread_sensitive=False)
