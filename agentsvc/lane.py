"""The fast lane: the hottest API calls answered at the ASGI layer, on the event loop.

A run create or a status poll through Django costs a request object, a middleware chain, a
thread started and joined for the request, two signals, DRF's view machinery and the thread hops
of sync database calls: about 3 ms of CPU before the call's own work, which caps a web process
near 300 answers a second. A route of the lane (registered by the app that owns it) is served
here instead by an async handler that shares its steps with the DRF view of the same operation
(the key lookup, the per-key limits, validation, the statement, the presenter) and answers the
same bytes. Its queries go through a psycopg async pool of its own and its counters through an
asyncio Redis client, so a waiting call holds no thread.

Anything off the plain path falls through to Django before a step with an effect: a query
string the route does not read, an Idempotency-Key, a body that is not a JSON object (or that
strict_loads refuses), credentials that do not authenticate, tracing on, HTTPS redirects, or the
embedded default (SQLite, no Redis), where the lane is off. Both key headers at once are
answered here, 400 ambiguous_credentials, as Django answers them. Once the lane has counted
the request against the key's limit, it answers every outcome itself, through the same
problem+json mapping as Django's views.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import redis.asyncio
from django.conf import settings
from django.core.cache import caches
from django.db import connections
from django.http.request import split_domain_port, validate_host
from psycopg_pool import AsyncConnectionPool
from rest_framework.renderers import JSONRenderer

from agentsvc import limits, metrics, tracing
from agentsvc.auth import Headers, raw_key_from_headers
from agentsvc.errors import exception_problem
from agentsvc.models import ApiKey
from agentsvc.parsers import BodyError, strict_loads
from agentsvc.services import KEY_QUERY, key_matching, key_prefix, touch_due

access = logging.getLogger("agentsvc.access")


_columns: dict[str, list[str]] = {}  # statement -> its column names
Row = tuple[list[str], tuple] | None  # (column names, values) of one row


@dataclass
class Call:
    """One request on a lane route, as its handler sees it."""

    method: str
    path: str
    headers: Headers
    body: bytes
    kwargs: dict[str, str]
    query: dict[str, str]
    # Set by limits.admitted: the answer's RateLimit headers.
    ratelimit_state: Any = None
    conn: Any = None  # the call's connection, once it has one

    def json_object(self) -> dict | None:
        """The body as a JSON object, when it is sent as one (Content-Type application/json in
        UTF-8) and the strict parser takes it; None otherwise."""
        media, _, params = self.headers.get("content-type", "").partition(";")
        if media.strip().lower() != "application/json":
            return None
        if params and params.strip().lower().replace(" ", "") not in ("charset=utf-8", ""):
            return None
        try:
            data = strict_loads(self.body)
        except BodyError:
            return None
        return data if isinstance(data, dict) else None

    async def fetch(self, sql: str, params: list) -> tuple[list[str], list[tuple]]:
        """Run one statement: (column names, rows). A call takes one connection from the lane's
        pool at its first statement and keeps it until its end or `release`."""
        try:
            if self.conn is None:
                self.conn = await (await _pool()).getconn()
        except Exception as exc:
            with db().wrap_database_errors:
                raise exc from None
        return await _execute(self.conn, sql, params)

    async def release(self) -> None:
        """Give the call's connection back to the pool now."""
        if self.conn is not None:
            conn, self.conn = self.conn, None
            await (await _pool()).putconn(conn)

    async def key(self, query: tuple[str, list] | None = None) -> tuple[ApiKey | None, Row]:
        """The caller's active key (api_key_authenticate's lookup) and its row; None when the
        credentials do not authenticate. `query` is a key_query with joins and their
        parameters: what the call reads besides comes back in the same round trip."""
        sql, params = query or (KEY_QUERY, [])
        raw = raw_key_from_headers(self.headers)
        prefix = key_prefix(raw) if raw else None
        if prefix is None:
            return None, None
        names, rows = await self.fetch(sql, [*params, prefix])
        candidates = [instance(ApiKey, names, row) for row in rows]
        key = key_matching(raw, candidates)
        if key is None:
            return None, None
        row = next(row for candidate, row in zip(candidates, rows, strict=True) if candidate is key)
        if touch_due(key):
            await self.fetch(
                f'UPDATE "{ApiKey._meta.db_table}" SET last_used_at = %s WHERE id = %s',
                [key.last_used_at, key.pk],
            )
        return key, (names, row)

    async def admit(self, key: ApiKey, *, runs: int = 0) -> None:
        """Count the request (and `runs` run starts) in one round trip; 429 when over."""
        counters = limits.admission(key, runs=runs)
        limits.admitted(self, key, await limits.counts_async(_redis(), key, counters), runs=runs)


@dataclass
class Answer:
    status: int
    data: Any
    headers: dict[str, str] = field(default_factory=dict)


# await handler(call, **kwargs); None: Django answers
Handler = Callable[..., Awaitable[Answer | None]]


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern
    label: str  # the Django URL pattern: the route label of metrics and access lines
    allow: str  # the Allow header of the DRF view
    handler: Handler
    query: bool  # whether the handler reads a query string (else a call with one is declined)


_routes: list[Route] = []


def route(
    method: str, pattern: str, label: str, allow: str, handler: Handler, *, query: bool = False
) -> None:
    """Serve `method` on paths matching `pattern` (named groups become keyword arguments)."""
    _routes.append(Route(method, re.compile(pattern), label, allow, handler, query))


def _query(raw: bytes) -> dict[str, str] | None:
    """The query string as Django's QueryDict.get sees it (the last value of a name); None for
    what Django's middleware answers itself (a key in the URL, a NUL)."""
    pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True)
    if any(name == "api_key" or "\x00" in name + value for name, value in pairs):
        return None
    return dict(pairs)


def _security_headers() -> list[tuple[bytes, bytes]]:
    """What Django's SecurityMiddleware and XFrameOptionsMiddleware add to an API answer."""
    pairs = []
    if settings.SECURE_CONTENT_TYPE_NOSNIFF:
        pairs.append(("X-Content-Type-Options", "nosniff"))
    if settings.SECURE_REFERRER_POLICY:
        pairs.append(("Referrer-Policy", settings.SECURE_REFERRER_POLICY))
    if settings.SECURE_CROSS_ORIGIN_OPENER_POLICY:
        pairs.append(("Cross-Origin-Opener-Policy", settings.SECURE_CROSS_ORIGIN_OPENER_POLICY))
    pairs.append(("X-Frame-Options", getattr(settings, "X_FRAME_OPTIONS", "DENY").upper()))
    return [(k.encode(), v.encode()) for k, v in pairs]


def _hsts() -> tuple[bytes, bytes] | None:
    if not settings.SECURE_HSTS_SECONDS:
        return None
    value = f"max-age={settings.SECURE_HSTS_SECONDS}"
    if settings.SECURE_HSTS_INCLUDE_SUBDOMAINS:
        value += "; includeSubDomains"
    if settings.SECURE_HSTS_PRELOAD:
        value += "; preload"
    return (b"strict-transport-security", value.encode())


def _host_allowed(headers: Headers, scope: dict) -> bool:
    """Django's Host check (CommonMiddleware); a forwarded host is left to Django."""
    if "x-forwarded-host" in headers:
        return False
    host = headers.get("host")
    if host is None:
        server = scope.get("server")
        return server is not None and validate_host(str(server[0]), settings.ALLOWED_HOSTS)
    domain, _port = split_domain_port(host)
    allowed = settings.ALLOWED_HOSTS
    if settings.DEBUG and not allowed:
        allowed = [".localhost", "127.0.0.1", "[::1]"]
    return bool(domain) and validate_host(domain, allowed)


# --- The lane's own connections: a psycopg async pool and an asyncio Redis client per loop ----

_pools: dict[asyncio.AbstractEventLoop, AsyncConnectionPool] = {}
_redises: dict[asyncio.AbstractEventLoop, Any] = {}


def enabled() -> bool:
    from agentsvc.cache import RedisCache

    return db().vendor == "postgresql" and isinstance(caches["default"], RedisCache)


async def _pool() -> AsyncConnectionPool:
    loop = asyncio.get_running_loop()
    pool = _pools.get(loop)
    if pool is None:
        # Django's own connection parameters (and its adapters: JSON as text, times in UTC),
        # autocommit, and the same bound as its pool.
        params = connections["default"].get_connection_params()
        params.pop("cursor_factory", None)
        pool = _pools[loop] = AsyncConnectionPool(
            kwargs={**params, "autocommit": True},
            min_size=1,
            max_size=settings.DB_POOL_MAX,
            timeout=settings.DATABASES["default"]["OPTIONS"]["pool"]["timeout"],
            open=False,
        )
        await pool.open()
    return pool


async def _execute(conn, sql: str, params: list) -> tuple[list[str], list[tuple]]:
    try:
        cursor = await conn.execute(sql, params)
        result = cursor.pgresult
        if result is None or not result.nfields:
            return [], []
        names = _columns.get(sql)
        if names is None:  # a statement's columns never change: read them once
            names = _columns[sql] = [c.name for c in cursor.description]
        return names, await cursor.fetchall()
    except Exception as exc:
        with db().wrap_database_errors:  # psycopg's errors as Django's (503, 409...)
            raise exc from None


async def fetch(sql: str, params: list) -> tuple[list[str], list[tuple]]:
    """One statement on a connection of the lane's pool taken for it alone."""
    try:
        async with (await _pool()).connection() as conn:
            return await _execute(conn, sql, params)
    except Exception as exc:
        with db().wrap_database_errors:
            raise exc from None


def _redis():
    """The loop's Redis client, on at most REDIS_POOL_MAX connections: a burst of calls waits
    for one (REDIS_POOL_TIMEOUT_S, then 503) instead of opening a connection per call in flight,
    which thousands of calls at once would hold open afterwards (and Redis refuses clients past
    its maxclients, every process's included)."""
    loop = asyncio.get_running_loop()
    client = _redises.get(loop)
    if client is None:
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            settings.REDIS_URL,
            max_connections=settings.REDIS_POOL_MAX,
            timeout=settings.REDIS_POOL_TIMEOUT_S,
            client_name=LANE_CLIENT_NAME,
        )
        client = _redises[loop] = redis.asyncio.Redis(connection_pool=pool)
    return client


LANE_CLIENT_NAME = "agentsvc-lane"  # CLIENT LIST tells the lane's connections apart


_wrapper = None


def db():
    """A Django database wrapper for what needs no connection: quoting, adapting values for
    the driver (`get_db_prep_save`), decoding them (`from_db_value`), mapping errors. Looked up
    once: `django.db.connection` is a context-local proxy, dear on a hot path."""
    global _wrapper
    if _wrapper is None:
        _wrapper = connections["default"]
    return _wrapper


def instance(model, names: list[str], row: tuple, prefix: str = ""):
    """A model instance from a row of `SELECT *` (or of columns named `prefix` + column), as
    the ORM builds it: JSON columns (text from Django's adapters) decoded."""
    values = dict(zip(names, row, strict=True))
    fields = model._meta.concrete_fields
    obj = model.from_db(
        "default",
        [f.attname for f in fields],
        [_from_db(f, values[prefix + f.column]) for f in fields],
    )
    for name, value in values.items():
        if not prefix and "__" not in name and name not in obj.__dict__:
            setattr(obj, name, value)  # extra columns (owner_name)
    return obj


def joined(row: Row, model, alias: str):
    """The `alias`-prefixed instance of `model` in a key row (key_query's joins), or None when
    the join found no row."""
    names, values = row
    prefix = f"{alias}__"
    if values[names.index(prefix + model._meta.pk.column)] is None:
        return None
    return instance(model, names, values, prefix)


def _from_db(field, value):
    if value is not None and hasattr(field, "from_db_value"):
        return field.from_db_value(value, None, db())
    return value


async def _answer(handler: Handler, call: Call) -> Answer | None:
    try:
        return await handler(call, **call.kwargs)
    except Exception as exc:
        response = exception_problem(call, exc)
        return Answer(
            response.status_code,
            response.content,
            {k: v for k, v in response.items() if k.lower() != "content-length"},
        )
    finally:
        await call.release()


class Lane:
    """ASGI: lane routes first, everything else (and everything a handler declines) to `app`."""

    def __init__(self, app) -> None:
        self.app = app
        self.enabled: bool | None = None
        self.security = None
        self.renderer = JSONRenderer()

    def _match(self, scope: dict) -> tuple[Route, dict[str, str]] | None:
        if scope["type"] != "http" or tracing.enabled():
            return None
        if self.enabled is None:
            self.enabled = enabled()
        if not self.enabled:
            return None
        if settings.SECURE_SSL_REDIRECT and scope.get("scheme") != "https":
            return None
        for candidate in _routes:
            if candidate.method == scope["method"]:
                match = candidate.pattern.fullmatch(scope["path"])
                if match and (candidate.query or not scope.get("query_string")):
                    return candidate, match.groupdict()
        return None

    async def __call__(self, scope, receive, send):
        matched = self._match(scope)
        if matched is None:
            return await self.app(scope, receive, send)
        found, kwargs = matched
        sent = False

        async def send_once(message):
            nonlocal sent
            sent = True
            await send(message)

        try:
            await self._serve(scope, receive, send_once, found, kwargs)
        except Exception as exc:  # the lane's own bug: problem+json, as Django would answer
            if sent:
                raise
            response = exception_problem(Call("", scope["path"], Headers(), b"", {}, {}), exc)
            await send_once(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [(k.encode(), v.encode()) for k, v in response.items()],
                }
            )
            await send_once({"type": "http.response.body", "body": response.content})

    async def _serve(self, scope, receive, send, found: Route, kwargs: dict[str, str]) -> None:
        headers = Headers.from_scope(scope)
        messages, body = [], b""
        if scope["method"] == "POST":
            messages, body = await _read_body(receive)
        started = time.perf_counter()
        answer = None
        query = _query(scope.get("query_string", b""))
        if (
            body is not None
            and query is not None
            and "idempotency-key" not in headers
            and _host_allowed(headers, scope)
        ):
            call = Call(scope["method"], scope["path"], headers, body, kwargs, query)
            answer = await _answer(found.handler, call)
        metrics.lane_call(route=found.label, answered=answer is not None)
        if answer is None:
            return await self.app(scope, _replay(messages, receive), send)
        await self._send(scope, send, found, call, answer)
        seconds = time.perf_counter() - started
        metrics.http_request(
            method=call.method, route=found.label, status=answer.status, seconds=seconds
        )
        access.debug("%s %s %s %.1f ms", call.method, found.label, answer.status, seconds * 1000)

    async def _send(self, scope, send, found: Route, call: Call, answer: Answer) -> None:
        if isinstance(answer.data, bytes):  # a problem, already rendered
            content = answer.data
            names = {k.lower() for k in answer.headers}
            extra = [] if "content-type" in names else [(b"content-type", b"application/json")]
        else:
            content = self.renderer.render(answer.data)
            extra = [(b"content-type", b"application/json")]
        out = [*extra, *((k.encode(), str(v).encode()) for k, v in answer.headers.items())]
        out.append((b"allow", found.allow.encode()))
        if self.security is None:
            self.security = _security_headers()
        out += self.security
        if scope.get("scheme") == "https" and (hsts := _hsts()) is not None:
            out.append(hsts)
        if call.ratelimit_state is not None:
            out += [
                (k.encode(), v.encode())
                for k, v in limits.ratelimit_headers(call.ratelimit_state).items()
            ]
        out.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": answer.status, "headers": out})
        await send({"type": "http.response.body", "body": content})


async def _read_body(receive) -> tuple[list[dict], bytes | None]:
    """The request's body messages and the body; None for the body when it is over
    MAX_REQUEST_BYTES (Django answers 413) or the client left."""
    messages, size = [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, None
        size += len(message.get("body", b""))
        if size > settings.MAX_REQUEST_BYTES:
            return messages, None
        if not message.get("more_body"):
            return messages, b"".join(m.get("body", b"") for m in messages)


def _replay(messages: list[dict], receive):
    """A `receive` that hands Django the body messages the lane already read, then the rest."""
    pending = list(messages)

    async def replayed():
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
