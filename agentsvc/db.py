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


def close_pools_before_fork() -> None:
    """Close this process's connection pools before it forks (register with os.register_at_fork).

    django-q2 forks its worker processes from the cluster's sentinel, at start and again each
    time one is recycled (every 500 tasks) or dies, and the sentinel uses the database itself
    (the scheduler). It closes Django's connections first, but with a pool that only hands them
    back: the pool and its open connections were copied into the child, and parent and child then
    spoke over the same sockets, mixing statements and results of unrelated transactions. The
    parent makes a new pool on its next query; the child starts with none."""
    from django.db import connections

    for conn in connections.all():
        if conn.alias in getattr(conn, "_connection_pools", {}):  # a pool of this process
            if not conn.in_atomic_block:
                conn.close()
            conn.close_pool()
