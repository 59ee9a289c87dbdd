"""A2A and MCP at the ASGI layer, beside the fast lane: their paths go to their apps through
the steps every API call takes, everything else to the app behind.

Before a request reaches the SDK's app: the Host check, the query string's and the body's
checks (MAX_REQUEST_BYTES, the strict JSON parser), the caller's key (and the chain the path
names, in the same statement), and the request counted against the key's requests-per-minute,
unless it starts a run (`message:send`, `message:stream`, JSON-RPC `SendMessage` and
`SendStreamingMessage`, MCP `tools/call`), which counts it with the run start in one round trip.
A refusal is answered in the protocol's own error shape with the problem's code and detail:
google.rpc.Status for A2A's HTTP+JSON binding, a JSON-RPC error for A2A's JSON-RPC binding and
MCP, problem+json for the agent cards. Every answer carries the API's security headers and its
RateLimit headers; each request is measured and logged as Django's are.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.http import QueryDict
from django.http.request import split_domain_port, validate_host

from agentsvc import lane, limits, metrics, tracing
from agentsvc.auth import Headers
from agentsvc.errors import ApplicationError, echo
from agentsvc.middleware import query_problem
from agentsvc.parsers import BodyError, strict_loads
from interop import calls

access = logging.getLogger("agentsvc.access")

CALLER = "agentsvc.caller"
BASE_URL = "agentsvc.base_url"
_CHAIN_ENDPOINT = re.compile(r"/a2a/v1/chains/(?P<chain>[-a-zA-Z0-9_]+)(?=/)")
_ID = r"[^/]+"
# The A2A HTTP+JSON binding's paths after an endpoint, and their route labels.
_REST = [
    (re.compile(r"/message:send"), "/message:send"),
    (re.compile(r"/message:stream"), "/message:stream"),
    (re.compile(r"/tasks"), "/tasks"),
    (re.compile(rf"/tasks/{_ID}:cancel"), "/tasks/<id>:cancel"),
    (re.compile(rf"/tasks/{_ID}:subscribe"), "/tasks/<id>:subscribe"),
    (re.compile(rf"/tasks/{_ID}/pushNotificationConfigs"), "/tasks/<id>/pushNotificationConfigs"),
    (
        re.compile(rf"/tasks/{_ID}/pushNotificationConfigs/{_ID}"),
        "/tasks/<id>/pushNotificationConfigs/<config>",
    ),
    (re.compile(rf"/tasks/{_ID}"), "/tasks/<id>"),
    (re.compile(r"/extendedAgentCard"), "/extendedAgentCard"),
]
_STARTS = {
    "rest": frozenset({"/message:send", "/message:stream"}),
    "jsonrpc": frozenset({"SendMessage", "SendStreamingMessage"}),
    "mcp": frozenset({"tools/call"}),
}
# google.rpc.Code names of the HTTP statuses a refusal can have.
_RPC_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    409: "ABORTED",
    413: "INVALID_ARGUMENT",
    415: "INVALID_ARGUMENT",
    422: "FAILED_PRECONDITION",
    429: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
}
ERROR_DOMAIN = "agentsvc"
JSONRPC_SERVER_ERROR = -32000  # JSON-RPC's implementation-defined server error


@dataclass(frozen=True)
class Target:
    app: str  # "a2a" or "mcp"
    binding: str  # "card", "rest", "jsonrpc", "mcp"; "other" for paths no route serves
    chain: str | None
    label: str  # the route label of metrics and access lines
    rest: str = ""  # the HTTP+JSON binding's path after the endpoint


def target(path: str) -> Target | None:
    """What serves a path, or None for the app behind (Django)."""
    if path == "/.well-known/agent-card.json":
        return Target("a2a", "card", None, ".well-known/agent-card.json")
    if path in ("/mcp", "/mcp/"):
        return Target("mcp", "mcp", None, "mcp")
    if not path.startswith("/a2a/"):
        return None
    match = _CHAIN_ENDPOINT.match(path)
    prefix, endpoint, chain = (
        (match.group(0), "a2a/v1/chains/<name>", match.group("chain"))
        if match
        else ("/a2a/v1", "a2a/v1", None)
    )
    rest = path[len(prefix) :]
    if rest == "/.well-known/agent-card.json":
        return Target("a2a", "card", chain, f"{endpoint}/.well-known/agent-card.json")
    if path.startswith("/a2a/v1/"):
        if rest == "/jsonrpc":
            return Target("a2a", "jsonrpc", chain, f"{endpoint}/jsonrpc")
        for pattern, label in _REST:
            if pattern.fullmatch(rest):
                return Target("a2a", "rest", chain, endpoint + label, rest)
    return Target("a2a", "other", None, "a2a/<unknown>")


def _starts_run(found: Target, method: str, body: Any) -> bool:
    if found.binding == "rest":
        return method == "POST" and found.rest in _STARTS["rest"]
    if found.binding in ("jsonrpc", "mcp") and isinstance(body, dict):
        return body.get("method") in _STARTS[found.binding]
    return False


def _host(headers: Headers, scope: dict) -> str | None:
    """The request's host as Django takes it, when ALLOWED_HOSTS allows it; else None."""
    host = None
    if settings.USE_X_FORWARDED_HOST:
        host = headers.get("x-forwarded-host")
    host = host or headers.get("host")
    if host is None:
        server = scope.get("server")
        host = f"{server[0]}:{server[1]}" if server else ""
    domain, _port = split_domain_port(host)
    allowed = settings.ALLOWED_HOSTS
    if settings.DEBUG and not allowed:
        allowed = [".localhost", "127.0.0.1", "[::1]"]
    return host if domain and validate_host(domain, allowed) else None


def _details(problem: calls.Problem) -> list[dict]:
    metadata = {"code": problem.code, "type": problem.body["type"]}
    if "Retry-After" in problem.headers:
        metadata["retry_after"] = problem.headers["Retry-After"]
    details: list[dict] = [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": problem.code.upper(),
            "domain": ERROR_DOMAIN,
            "metadata": metadata,
        }
    ]
    if problem.body.get("errors"):
        details.append(
            {
                "@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [
                    {"field": e["field"], "description": e["message"]}
                    for e in problem.body["errors"]
                ],
            }
        )
    return details


def refusal(found: Target, problem: calls.Problem, body: Any = None) -> tuple[int, dict]:
    """A refusal before the protocol's app, in the protocol's error shape."""
    if found.binding == "rest":
        error = {
            "code": problem.status,
            "status": _RPC_STATUS.get(problem.status, "UNKNOWN"),
            "message": problem.detail,
            "details": _details(problem),
        }
        return problem.status, {"error": error}
    if found.binding in ("jsonrpc", "mcp"):
        request_id = body.get("id") if isinstance(body, dict) else None
        if not isinstance(request_id, str | int) or isinstance(request_id, bool):
            request_id = None
        data: Any = _details(problem) if found.binding == "jsonrpc" else problem.body
        error = {"code": JSONRPC_SERVER_ERROR, "message": problem.detail, "data": data}
        return problem.status, {"jsonrpc": "2.0", "id": request_id, "error": error}
    return problem.status, problem.body


@functools.cache
def _security_headers() -> tuple[tuple[bytes, bytes], ...]:
    """The headers the lane adds as Django's middleware would: the API's own (settings do not
    change while a process runs)."""
    return tuple(lane._security_headers())


@dataclass(frozen=True)
class _Shim:
    """What the problem checks read of a request."""

    path: str
    GET: QueryDict


class Interop:
    """ASGI: A2A and MCP paths through the common steps to their apps; the rest to `app`."""

    def __init__(self, app) -> None:
        from interop.a2a.app import a2a_app
        from interop.mcp.app import McpApp

        self.app = app
        self.apps = {"a2a": a2a_app(), "mcp": McpApp()}

    async def __call__(self, scope, receive, send):
        found = target(scope["path"]) if scope["type"] == "http" else None
        if found is None or (settings.SECURE_SSL_REDIRECT and scope.get("scheme") != "https"):
            return await self.app(scope, receive, send)  # Django redirects to https
        started = time.perf_counter()
        headers = Headers.from_scope(scope)
        caller: calls.Caller | None = None
        status = 0

        async def answer(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = list(_security_headers())
                if scope.get("scheme") == "https" and (hsts := lane._hsts()) is not None:
                    extra.append(hsts)
                state = caller.rate_state if caller is not None else None
                if state is not None:
                    extra += [
                        (k.encode(), v.encode()) for k, v in limits.ratelimit_headers(state).items()
                    ]
                names = {name.lower() for name, _ in message.get("headers", ())}
                added = [(k, v) for k, v in extra if k.lower() not in names]
                message = {**message, "headers": [*message.get("headers", ()), *added]}
                seconds = time.perf_counter() - started
                metrics.http_request(
                    method=scope["method"], route=found.label, status=status, seconds=seconds
                )
                access.debug(
                    "%s %s %s %.1f ms", scope["method"], found.label, status, seconds * 1000
                )
            await send(message)

        async def refuse(exc: Exception, body: Any = None) -> None:
            problem = calls.problem_of(exc, scope["path"])
            code, content = refusal(found, problem, body)
            await _send(answer, code, content, problem.headers, found)

        if found.app == "mcp" and scope["method"] != "POST":
            # No stream of the server's own (GET): stateless, a request's notifications ride
            # its response. The SDK would hold a GET open with nothing ever to send.
            return await refuse(ApplicationError("method_not_allowed", headers={"Allow": "POST"}))
        host = _host(headers, scope)
        if host is None:
            raw = headers.get("host", "")
            return await refuse(
                ApplicationError("bad_request", f"Invalid HTTP_HOST header: {echo(raw)!r}.")
            )
        if scope.get("query_string"):
            shim = _Shim(scope["path"], QueryDict(scope["query_string"]))
            if (response := query_problem(shim)) is not None:
                problem = calls.problem_answer(response)
                return await _send(answer, *refusal(found, problem), problem.headers, found)
        messages, body = await lane._read_body(receive)
        if body is None:
            if messages and messages[-1]["type"] == "http.disconnect":
                return None
            return await refuse(
                ApplicationError(
                    "payload_too_large",
                    f"The body may be at most {settings.MAX_REQUEST_BYTES} bytes.",
                )
            )
        parsed = None
        if body.strip():
            try:
                parsed = strict_loads(body)
            except BodyError as exc:
                return await refuse(exc)
        scope = {**scope, BASE_URL: f"{scope.get('scheme', 'http')}://{host}"}
        if found.binding not in ("card", "other"):
            try:
                caller = await calls.authenticate(headers, scope["path"], found.chain)
                if not _starts_run(found, scope["method"], parsed):
                    await calls.count(caller)
            except ApplicationError as exc:
                return await refuse(exc, parsed)
            scope[CALLER] = caller
        try:
            await self.apps[found.app](scope, lane._replay(messages, receive), answer)
        finally:
            if caller is not None and not caller.counted:  # refused by the SDK before our code
                with contextlib.suppress(ApplicationError):
                    await calls.count(caller)


async def _send(send, status: int, content: dict, headers: dict, found: Target) -> None:
    body = json.dumps(content, separators=(",", ":"), ensure_ascii=False).encode()
    plain = found.binding in ("card", "other")
    media = "application/problem+json" if plain else "application/json"
    out = [(b"content-type", media.encode()), (b"content-length", str(len(body)).encode())]
    out += [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body})


def interop_mount(app):
    """`app` with A2A and MCP in front of it, when the `interop` extra is installed. The A2A
    SDK's spans (its own switch) follow this service's tracing: off unless tracing is on."""
    os.environ.setdefault("OTEL_INSTRUMENTATION_A2A_SDK_ENABLED", str(tracing.enabled()).lower())
    try:
        import a2a.server  # noqa: F401
        import mcp.server  # noqa: F401
    except ImportError:
        logging.getLogger(__name__).info("A2A and MCP off: the interop extra is not installed")
        return app
    return Interop(app)
