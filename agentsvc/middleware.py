from __future__ import annotations

import logging
import time

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.urls import Resolver404, get_resolver
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from agentsvc import logs, metrics, tracing
from agentsvc.errors import exception_problem, problem_response
from agentsvc.limits import ratelimit_headers

_CODES = {
    400: "bad_request",
    403: "not_found",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


def _is_api(request) -> bool:
    return request.path.startswith("/api/")


def _query_problem(request):
    return query_problem(request) if _is_api(request) else None


def query_problem(request):
    """401 for a key in the URL, where it would end up in access logs and browser history;
    400 for a NUL anywhere in the query string: no parameter may hold one, and PostgreSQL
    refuses it in a query with an error that would otherwise surface as a 500. Every API
    path's (Django's, and A2A's and MCP's at the ASGI layer)."""
    if "api_key" in request.GET:
        return problem_response(
            request,
            "authentication_failed",
            "API keys are not accepted in URLs: send Authorization: Bearer <key> (browsers: "
            "a stream ticket from POST /api/v1/stream-tickets).",
            headers={"WWW-Authenticate": 'Bearer realm="api"'},
        )
    bad = sorted({k for k, values in request.GET.lists() for v in [k, *values] if "\x00" in v})
    if not bad:
        return None
    return problem_response(
        request,
        "validation_error",
        "Query parameters may not contain NUL (%00).",
        errors=[{"field": name, "message": "Contains NUL."} for name in bad],
    )


def _body_problem(request):
    """413 before any view sees a body over MAX_REQUEST_BYTES."""
    if request.method not in ("POST", "PUT", "PATCH") or not _is_api(request):
        return None
    try:
        declared = int(request.headers.get("Content-Length") or 0)
    except ValueError:
        return problem_response(request, "validation_error", "Invalid Content-Length header.")
    if declared > settings.MAX_REQUEST_BYTES:
        return problem_response(
            request,
            "payload_too_large",
            f"The body may be at most {settings.MAX_REQUEST_BYTES} bytes.",
        )
    try:
        request.body  # noqa: B018 - reading it enforces DATA_UPLOAD_MAX_MEMORY_SIZE
    except RequestDataTooBig:
        return problem_response(
            request,
            "payload_too_large",
            f"The body may be at most {settings.MAX_REQUEST_BYTES} bytes.",
        )
    return None


class ApiProblemMiddleware:
    """Keeps HTML error pages and stack traces away from API callers."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self.__acall__(request)
        problem = _query_problem(request) or _body_problem(request)
        return self._finish(request, problem or self.get_response(request))

    async def __acall__(self, request):
        problem = _query_problem(request) or _body_problem(request)
        if problem is not None:
            return problem
        return self._finish(request, await self.get_response(request))

    @staticmethod
    def _finish(request, response):
        state = getattr(request, "ratelimit_state", None)
        if state is not None:
            for name, value in ratelimit_headers(state).items():
                response[name] = value
        content_type = response.get("Content-Type", "")
        if (
            _is_api(request)
            and response.status_code >= 400
            and not content_type.startswith(("application/problem+json", "text/event-stream"))
        ):
            # An error page from Django itself (a bad Host header, a crash): same status, as JSON.
            return problem_response(
                request,
                _CODES.get(response.status_code, "server_error"),
                status=response.status_code,
            )
        return response

    def process_exception(self, request, exception):
        if not _is_api(request):
            return None
        return exception_problem(request, exception)


# Pages for people (the admin, the dashboard and the API docs): scripts only from this origin,
# never inline. The admin's templates set inline `style` attributes and Swagger UI sets styles
# from its script, so those pages allow inline styles; the dashboard needs none.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src {style}; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; "
    "frame-ancestors 'none'"
)
CSP_PAGES = {
    "/admin/": _CSP.format(style="'self' 'unsafe-inline'"),
    "/dashboard/": _CSP.format(style="'self'"),
    "/api/docs": _CSP.format(style="'self' 'unsafe-inline'"),
}


class ContentSecurityPolicyMiddleware:
    """Content-Security-Policy on the pages for people (CSP_PAGES, by path prefix)."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self.__acall__(request)
        return self._finish(request, self.get_response(request))

    async def __acall__(self, request):
        return self._finish(request, await self.get_response(request))

    @staticmethod
    def _finish(request, response):
        for prefix, policy in CSP_PAGES.items():
            if request.path.startswith(prefix):
                response.setdefault("Content-Security-Policy", policy)
                break
        return response


# --- Request id, request span, latency ------------------------------------------------------

# A line per request at DEBUG, by URL pattern (never the query string), with its request id.
access = logging.getLogger("agentsvc.access")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _route(request) -> str:
    """The URL pattern that served the request (`api/v1/runs/<uuid:run_id>`), not its path: a
    label with a bounded number of values. `unmatched` for paths no pattern knows."""
    match = getattr(request, "resolver_match", None)
    if match is None:  # answered before the view (a limit, a bad body): resolve it here
        try:
            match = get_resolver().resolve(request.path_info)
        except Resolver404:
            return "unmatched"
    return match.route or "unmatched"


class _Observed:
    """One request's request id in the log context, its span, and its latency."""

    def __init__(self, request) -> None:
        scope = getattr(request, "scope", None) or {}
        self.request = request
        self.request_id = scope.get("request_id") or logs.request_id_from(
            request.headers.get(logs.REQUEST_ID_HEADER)
        )
        request.request_id = self.request_id
        self.tokens = logs.bind(request_id=self.request_id, run_id=None, key_prefix=None)
        self.method = request.method if request.method in _METHODS else "OTHER"
        self.span = None
        self.attached = None
        if tracing.enabled():
            self.span = tracing.tracer().start_span(
                self.method,
                context=tracing.headers_context(request.headers),
                kind=SpanKind.SERVER,
                attributes={"http.request.method": self.method, "url.path": request.path},
            )
            self.attached = otel_context.attach(trace.set_span_in_context(self.span))
        self.started = time.perf_counter()

    def finish(self, response):
        try:
            response.setdefault(logs.REQUEST_ID_HEADER, self.request_id)
            route = _route(self.request)
            seconds = time.perf_counter() - self.started
            metrics.http_request(
                method=self.method, route=route, status=response.status_code, seconds=seconds
            )
            access.debug(
                "%s %s %s %.1f ms",
                self.method,
                route,
                response.status_code,
                seconds * 1000,
            )
            if self.span is not None:
                self.span.update_name(f"{self.method} {route}")
                self.span.set_attribute("http.route", route)
                self.span.set_attribute("http.response.status_code", response.status_code)
                if response.status_code >= 500:
                    self.span.set_status(Status(StatusCode.ERROR))
        finally:
            self.close()
        return response

    def close(self) -> None:
        if self.span is not None:
            self.span.end()
            otel_context.detach(self.attached)
            self.span = None
        if self.tokens:
            logs.unbind(self.tokens)
            self.tokens = {}


class RequestContextMiddleware:
    """First in the chain: the request's id (the caller's X-Request-ID if valid, else a new
    one) in every log line written while serving it and on its response, its span (tracing on),
    and `agentsvc_http_request_duration_seconds` by method, route and status. For a stream the
    duration is the time to its first byte."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self.__acall__(request)
        observed = _Observed(request)
        try:
            response = self.get_response(request)
        except BaseException:
            observed.close()
            raise
        return observed.finish(response)

    async def __acall__(self, request):
        observed = _Observed(request)
        try:
            response = await self.get_response(request)
        except BaseException:
            observed.close()
            raise
        return observed.finish(response)
