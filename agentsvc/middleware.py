from __future__ import annotations

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.core.exceptions import RequestDataTooBig

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
    """401 for a key in the URL, where it would end up in access logs and browser history;
    400 for a NUL anywhere in the query string: no parameter may hold one, and PostgreSQL
    refuses it in a query with an error that would otherwise surface as a 500."""
    if not _is_api(request):
        return None
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


# Pages for people (the admin and the dashboard): scripts only from this origin, never inline.
# The admin's templates set inline `style` attributes, so its pages allow inline styles; the
# dashboard needs none.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src {style}; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; "
    "frame-ancestors 'none'"
)
CSP_PAGES = {
    "/admin/": _CSP.format(style="'self' 'unsafe-inline'"),
    "/dashboard/": _CSP.format(style="'self'"),
}


class ContentSecurityPolicyMiddleware:
    """Content-Security-Policy on the admin and dashboard pages (CSP_PAGES, by path prefix)."""

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
