"""Django's Redis cache, with one client and connection pool per server, shared by every
instance of the backend in the process.

Django keeps a cache backend per thread and per async context (`caches` is an asgiref Local):
under ASGI every request gets a new one, and Django's Redis client gives each instance its own
connection pools, so each request opened new Redis connections, dropped only when garbage
collected (hundreds per web process under load; a shared Redis refused clients past its
`maxclients`). The pools and clients here belong to the process. Django's client also builds a
new `redis.Redis` for every cache operation, about 90 µs of setting up response callbacks each
time (a rate-limit check makes four); a client over a pool is safe to share between threads.
"""

from __future__ import annotations

from django.core.cache.backends.redis import RedisCache as DjangoRedisCache
from django.core.cache.backends.redis import RedisCacheClient

# (servers, pool options, pool index) -> the client over that pool. redis-py's pools notice a
# fork and start afresh in the child.
_clients: dict[tuple, object] = {}


class _Client(RedisCacheClient):
    def get_client(self, key=None, *, write=False):
        index = self._get_connection_pool_index(write)
        shared = (tuple(self._servers), repr(sorted(self._pool_options.items())), index)
        client = _clients.get(shared)
        if client is None:
            pool = self._get_connection_pool(write)
            client = _clients.setdefault(shared, self._client(connection_pool=pool))
        return client


class RedisCache(DjangoRedisCache):
    def __init__(self, server, params) -> None:
        super().__init__(server, params)
        self._class = _Client
