"""Typed errors carrying the problem+json fields of docs/api.md section 2."""

from __future__ import annotations

import json
from typing import Any

import httpx


class AgentsvcError(Exception):
    """Base of everything this client raises."""


class APIConnectionError(AgentsvcError):
    """The server could not be reached (after the retries)."""


class WaitTimeout(AgentsvcError, TimeoutError):
    """`runs.wait` gave up before the run ended; the run goes on."""

    def __init__(self, run: dict[str, Any]) -> None:
        super().__init__(f"run {run.get('run_id')} still {run.get('status')}")
        self.run = run


class APIError(AgentsvcError):
    """An error answer of the API: status, code and the other problem+json members."""

    def __init__(
        self,
        status: int,
        code: str,
        title: str = "",
        detail: str = "",
        *,
        errors: list[dict[str, str]] | None = None,
        run_id: str | None = None,
        violated_policies: list[str] | None = None,
        retry_after: float | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {detail or title}")
        self.status = status
        self.code = code
        self.title = title
        self.detail = detail
        self.errors = errors or []
        self.run_id = run_id
        self.violated_policies = violated_policies or []
        self.retry_after = retry_after
        self.body = body or {}


class AuthenticationError(APIError):
    """401: missing, unknown or revoked key."""


class PermissionDeniedError(APIError):
    """403."""


class NotFoundError(APIError):
    """404: no such object, or another owner's."""


class ValidationError(APIError):
    """400/413/415/422: the request itself is wrong; `errors` lists fields."""


class ConflictError(APIError):
    """409, and 422 idempotency_key_reused: the request clashes with the state."""


class RateLimitError(APIError):
    """429: over a limit of the key; `retry_after` says when to come back."""


class ServerError(APIError):
    """5xx."""


class ChainFailedError(ServerError):
    """502 chain_failed from invoke: the run failed; `run_id` names it."""


class ChainTimedOutError(ServerError):
    """504 chain_timed_out from invoke."""


class ServiceUnavailableError(ServerError):
    """503 (queue_full, ...)."""


def retry_after_of(response: httpx.Response) -> float | None:
    """Retry-After as seconds (only the delta-seconds form is sent by the service)."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _class_for(status: int, code: str) -> type[APIError]:
    if code == "idempotency_key_reused" or status == 409:
        return ConflictError
    by_code = {"chain_failed": ChainFailedError, "chain_timed_out": ChainTimedOutError}
    if code in by_code:
        return by_code[code]
    by_status = {
        401: AuthenticationError,
        403: PermissionDeniedError,
        404: NotFoundError,
        429: RateLimitError,
        503: ServiceUnavailableError,
    }
    if status in by_status:
        return by_status[status]
    if status in (400, 413, 415, 422):
        return ValidationError
    return ServerError if status >= 500 else APIError


def error_from_response(response: httpx.Response, body: bytes | None = None) -> APIError:
    """The typed error of a non-2xx answer (problem+json, or whatever a proxy sent)."""
    raw = response.content if body is None else body
    try:
        problem = json.loads(raw)
        if not isinstance(problem, dict):
            problem = {}
    except ValueError:
        problem = {}
    status = response.status_code
    code = problem.get("code") or f"http_{status}"
    return _class_for(status, code)(
        status,
        code,
        problem.get("title", response.reason_phrase),
        problem.get("detail", ""),
        errors=problem.get("errors"),
        run_id=problem.get("run_id"),
        violated_policies=problem.get("violated-policies") or problem.get("violated_policies"),
        retry_after=retry_after_of(response),
        body=problem,
    )
