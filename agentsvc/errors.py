"""RFC 9457 problem+json: the one place errors are formatted."""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.db import InterfaceError, OperationalError
from django.http import Http404, JsonResponse
from redis.exceptions import RedisError
from rest_framework import exceptions as drf_exceptions

logger = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"

# code -> (status, title, explanation shown on /api/problems/<code>)
PROBLEMS: dict[str, tuple[int, str, str]] = {
    "authentication_failed": (
        401,
        "Authentication failed",
        "The request had no API key, or the key is unknown or revoked. Send "
        "`Authorization: Bearer <key>` or `X-API-Key: <key>`.",
    ),
    "bad_request": (
        400,
        "Bad request",
        "The request could not be understood, for example a Host header this server does not "
        "serve.",
    ),
    "ambiguous_credentials": (
        400,
        "Ambiguous credentials",
        "The request sent both `Authorization` and `X-API-Key`. Send the key in one of them: "
        "the server does not pick one (WebSocket: close 4400).",
    ),
    "not_found": (404, "Not found", "No such resource, or it belongs to another owner."),
    "validation_error": (
        400,
        "Invalid request",
        "The request body or query string is not valid. `errors` lists each field and what is "
        "wrong with it.",
    ),
    "payload_too_large": (
        413,
        "Payload too large",
        "The request body is larger than the server accepts (MAX_REQUEST_BYTES).",
    ),
    "unsupported_media_type": (
        415,
        "Unsupported media type",
        "Send JSON bodies with `Content-Type: application/json`.",
    ),
    "not_acceptable": (
        406,
        "Not acceptable",
        "The Accept header asks for a representation this endpoint cannot produce.",
    ),
    "method_not_allowed": (
        405,
        "Method not allowed",
        "This endpoint does not support the HTTP method used; see the Allow header.",
    ),
    "idempotency_key_reused": (
        422,
        "Idempotency key reused",
        "The Idempotency-Key was already used with a different request body.",
    ),
    "idempotency_request_in_progress": (
        409,
        "Request in progress",
        "A request with this Idempotency-Key is still being answered; retry after Retry-After.",
    ),
    "rate_limited": (
        429,
        "Too many requests",
        "A per-key request or run rate limit was exceeded; retry after Retry-After.",
    ),
    "token_budget_exceeded": (
        429,
        "Token budget exceeded",
        "The key's tokens-per-minute budget cannot cover this run now; retry after Retry-After.",
    ),
    "run_too_large": (
        422,
        "Run too large for the token budget",
        "The run (or the batch) reserves more tokens than the key's whole tokens-per-minute "
        "budget, so it can never start under this limit: waiting does not help. Send a smaller "
        "input or batch, or ask for a larger budget.",
    ),
    "concurrency_limit": (
        429,
        "Too many active runs or streams",
        "The key has as many active runs or open streams as it may; wait for one to finish.",
    ),
    "queue_full": (503, "Queue full", "The server's run queue is full; retry after Retry-After."),
    "streams_full": (
        503,
        "Too many open streams",
        "This server holds as many open streams (SSE and WebSocket) as it may; retry after "
        "Retry-After.",
    ),
    "run_not_cancellable": (
        409,
        "Run not cancellable",
        "The run has already ended, so it can no longer be cancelled.",
    ),
    "run_not_waiting": (
        409,
        "Run not waiting for input",
        "The run is not waiting for an answer (it has not asked, was answered, or has ended), "
        "so there is nothing to answer.",
    ),
    "input_already_received": (
        409,
        "Input already received",
        "This request of the run has already been answered (by another caller or an operator); "
        "the first answer counts.",
    ),
    "chain_failed": (
        502,
        "Chain failed",
        "The run ended with an error; `run_id` names it and GET /api/v1/runs/{id} has details.",
    ),
    "chain_timed_out": (504, "Chain timed out", "The run exceeded its chain's timeout."),
    "service_unavailable": (
        503,
        "Service unavailable",
        "A backing service (database or queue) is unreachable right now; retry after Retry-After.",
    ),
    "run_not_finished": (
        409,
        "Run not finished",
        "The run has not ended yet, so it has no terminal event to send to its webhooks.",
    ),
    "server_error": (
        500,
        "Internal server error",
        "Something went wrong on the server. The error was logged; retrying may help.",
    ),
}


# Text a caller sent that a problem repeats (a chain name, a query value, a host) is cut to this
# many characters, so an answer never mirrors a huge input back (echo()). As a net for messages
# built elsewhere (DRF's, jsonschema's), problem_response bounds every member too.
ECHO_CHARS = 64
DETAIL_CHARS = 300
FIELD_CHARS = 100
INSTANCE_CHARS = 100
MAX_FIELD_ERRORS = 50


def echo(value: object, limit: int = ECHO_CHARS) -> str:
    """Caller-supplied text as a problem may repeat it: at most `limit` characters, then "…"."""
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _bounded_errors(errors: object) -> object:
    if not isinstance(errors, list):
        return errors
    return [
        {
            **item,
            "field": echo(item.get("field", ""), FIELD_CHARS),
            "message": echo(item.get("message", ""), DETAIL_CHARS),
        }
        if isinstance(item, dict)
        else item
        for item in errors[:MAX_FIELD_ERRORS]
    ]


class ApplicationError(Exception):
    """An error with a problem code; the handler turns it into problem+json."""

    def __init__(
        self,
        code: str,
        detail: str = "",
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail or code)
        self.code = code
        self.status = status or PROBLEMS[code][0]
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra


def problem_response(
    request,
    code: str,
    detail: str = "",
    *,
    status: int | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JsonResponse:
    default_status, title, _ = PROBLEMS.get(code, (status or 500, code, ""))
    status = status or default_status
    body: dict[str, Any] = {
        "type": f"/api/problems/{code}",
        "title": title,
        "status": status,
        "detail": echo(detail or title, DETAIL_CHARS),
        "code": code,
        "instance": echo(request.path, INSTANCE_CHARS) if request is not None else None,
    }
    body.update({k: v for k, v in extra.items() if v is not None})
    if "errors" in body:
        body["errors"] = _bounded_errors(body["errors"])
    response = JsonResponse(body, status=status, content_type=PROBLEM_CONTENT_TYPE)
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def _field_errors(detail: Any, prefix: str = "") -> list[dict[str, str]]:
    """Flatten DRF's nested error detail into [{field, message}]."""
    errors: list[dict[str, str]] = []
    if isinstance(detail, dict):
        for key, value in detail.items():
            name = prefix if key == "non_field_errors" else (f"{prefix}.{key}" if prefix else key)
            if isinstance(key, int):  # a list item's errors (ListField): events[0]
                name = f"{prefix}[{key}]"
            errors.extend(_field_errors(value, name))
    elif isinstance(detail, list):
        for i, value in enumerate(detail):
            if isinstance(value, dict | list):
                errors.extend(_field_errors(value, f"{prefix}[{i}]"))
            else:
                errors.extend(_field_errors(value, prefix))
    else:
        errors.append({"field": prefix or "body", "message": str(detail)})
    return errors


def exception_handler(exc: Exception, context: dict) -> JsonResponse:
    """DRF's EXCEPTION_HANDLER: every API error leaves as problem+json."""
    return exception_problem(context.get("request"), exc)


def exception_problem(request, exc: Exception) -> JsonResponse:
    """The problem+json answer for any exception: the one mapping, for DRF and plain views."""
    if isinstance(exc, ApplicationError):
        return problem_response(
            request, exc.code, exc.detail, status=exc.status, headers=exc.headers, **exc.extra
        )
    if isinstance(exc, Http404 | drf_exceptions.NotFound):
        return problem_response(request, "not_found", "Not found.")
    if isinstance(exc, drf_exceptions.NotAuthenticated | drf_exceptions.AuthenticationFailed):
        return problem_response(
            request,
            "authentication_failed",
            str(exc.detail),
            headers={"WWW-Authenticate": 'Bearer realm="api"'},
        )
    if isinstance(exc, PermissionDenied | drf_exceptions.PermissionDenied):
        # Existence of another owner's object is never revealed.
        return problem_response(request, "not_found", "Not found.")
    if isinstance(exc, drf_exceptions.MethodNotAllowed):
        return problem_response(request, "method_not_allowed", str(exc.detail))
    if isinstance(exc, drf_exceptions.UnsupportedMediaType):
        return problem_response(request, "unsupported_media_type", str(exc.detail))
    if isinstance(exc, drf_exceptions.NotAcceptable):
        return problem_response(request, "not_acceptable", str(exc.detail))
    if isinstance(exc, drf_exceptions.ParseError):
        field = getattr(exc, "field", "body")  # agentsvc.parsers.BodyError names where
        return problem_response(
            request,
            "validation_error",
            "The body is not valid JSON." if field == "body" else "The body holds a refused value.",
            errors=[{"field": field, "message": str(exc.detail)}],
        )
    if isinstance(exc, RequestDataTooBig):
        return problem_response(request, "payload_too_large")
    if isinstance(exc, drf_exceptions.ValidationError):
        return problem_response(
            request,
            "validation_error",
            "The request is not valid.",
            errors=_field_errors(exc.detail),
        )
    if isinstance(exc, drf_exceptions.Throttled):
        return problem_response(
            request, "rate_limited", headers={"Retry-After": str(int(exc.wait or 1))}
        )
    if isinstance(exc, drf_exceptions.APIException):
        return problem_response(request, "server_error", str(exc.detail), status=exc.status_code)
    if isinstance(exc, OperationalError | InterfaceError | RedisError):
        logger.warning("Backing service error on %s: %s", request.path if request else "?", exc)
        return problem_response(request, "service_unavailable", headers={"Retry-After": "5"})
    logger.exception("Unhandled error on %s", request.path if request else "?", exc_info=exc)
    return problem_response(request, "server_error")
