"""The steps an A2A or MCP call shares with the REST API: the caller's key (the one reading of
credentials and the key lookup), the per-key limits, runs started, read, waited on and cancelled
through the run services, and every error as the problem+json answer it would be.

Two forms of each step, as for the REST API: with PostgreSQL and Redis the fast lane's (its
psycopg pool, its Redis client, the run start's one statement, grouped), so a call holds no
thread; in the embedded default (SQLite, no Redis) the services in one hop to a worker thread.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from django.conf import settings
from django.http import Http404

from agentsvc import lane, limits, tracing
from agentsvc.auth import Headers, raw_key_from_headers
from agentsvc.db import db_async
from agentsvc.errors import ApplicationError, exception_problem
from agentsvc.idempotency import (
    fingerprint,
    idempotency_begin,
    idempotency_forget,
    idempotency_store,
    request_key,
)
from agentsvc.models import ApiKey
from agentsvc.services import api_key_authenticate
from runs import lane as runs_lane
from runs import selectors, services
from runs.api import chain_not_found
from runs.hub import get_hub
from runs.models import Chain, Run
from runs.presenters import run_handle
from runs.seen import run_seen
from webhooks.serializers import RunWebhookInput

AUTH_HEADERS = {"WWW-Authenticate": 'Bearer realm="api"'}
# The codes of a run start refused by a limit or by backpressure (or while the first request
# with its Idempotency-Key is still being answered): the caller may come back.
REFUSED_STARTS = frozenset(
    {
        "idempotency_request_in_progress",
        "rate_limited",
        "token_budget_exceeded",
        "run_too_large",
        "concurrency_limit",
        "queue_full",
        "streams_full",
    }
)


@dataclass(frozen=True)
class Problem:
    """An error as the REST API answers it: status, problem+json members, headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str]

    @property
    def code(self) -> str:
        return self.body["code"]

    @property
    def detail(self) -> str:
        return self.body["detail"]


@dataclass(frozen=True)
class _Path:
    path: str  # what problem answers name as `instance`


def problem_of(exc: Exception, path: str) -> Problem:
    """The problem+json answer of any exception, from the one mapping (agentsvc.errors)."""
    return problem_answer(exception_problem(_Path(path), exc))


def problem_answer(response) -> Problem:
    """A problem+json answer (a JsonResponse of agentsvc.errors) as a Problem."""
    headers = {
        name: value
        for name, value in response.items()
        if name.lower() not in ("content-type", "content-length")
    }
    return Problem(response.status_code, json.loads(response.content), headers)


def fields_renamed(exc: Exception, names: dict[str, str]) -> ApplicationError:
    """A validation error whose fields are renamed from the REST body's to the protocol's
    request (`input.topic` → `message.parts[0].data.topic`, `arguments.topic`)."""
    problem = problem_of(exc, "")
    errors = []
    for error in problem.body.get("errors", []):
        field = error["field"]
        for old, new in names.items():
            if field == old or field.startswith((f"{old}.", f"{old}[")):
                field = new + field[len(old) :]
                break
        errors.append({**error, "field": field})
    return ApplicationError("validation_error", problem.detail, errors=errors)


_fast: bool | None = None


def fast() -> bool:
    """Whether the lane's steps serve (PostgreSQL and Redis, tracing off), as for the REST API."""
    global _fast
    if _fast is None:
        _fast = lane.enabled()
    return _fast and not tracing.enabled()


@dataclass
class Caller:
    """An authenticated A2A or MCP request."""

    key: ApiKey
    path: str
    headers: Headers
    chain: Chain | None = None  # the chain the path names, read with the key
    call: lane.Call | None = None  # the lane's steps, when they serve
    counted: bool = False  # counted against the key's requests-per-minute
    ratelimit_state: Any = field(default=None, repr=False)  # limits.admitted's

    @property
    def rate_state(self) -> Any:
        return self.call.ratelimit_state if self.call is not None else self.ratelimit_state


def _key_and_chain(raw: str, name: str | None) -> tuple[ApiKey | None, Chain | None]:
    key = api_key_authenticate(raw=raw)
    if key is None or name is None:
        return key, None
    try:
        return key, selectors.chain_get(name=name)
    except Http404:
        return key, None


async def authenticate(headers: Headers, path: str, chain_name: str | None = None) -> Caller:
    """The caller's key (and the chain the path names, in the same statement): 400
    `ambiguous_credentials`, 401 `authentication_failed`, 404 for a chain that does not exist
    (counted as a request, as the REST API counts it)."""
    raw = raw_key_from_headers(headers)
    if raw is None:
        raise ApplicationError(
            "authentication_failed",
            "Send Authorization: Bearer <key> or X-API-Key: <key>.",
            headers=AUTH_HEADERS,
        )
    if fast():
        call = lane.Call("POST", path, headers, b"", {}, {})
        try:
            if chain_name is not None:
                key, chain = await runs_lane.key_and_chain(call, chain_name)
            else:
                key, chain = (await call.key())[0], None
        finally:
            await call.release()
    else:
        key, chain, call = *(await db_async(_key_and_chain)(raw, chain_name)), None
    if key is None:
        raise ApplicationError(
            "authentication_failed", "Unknown or revoked API key.", headers=AUTH_HEADERS
        )
    caller = Caller(key, path, headers, chain, call)
    if chain_name is not None and chain is None:
        await count(caller)
        raise chain_not_found(chain_name, None)
    return caller


async def count(caller: Caller) -> None:
    """Count the request against the key's requests-per-minute (once); 429 when over."""
    if caller.counted:
        return
    caller.counted = True
    if caller.call is not None:
        await caller.call.admit(caller.key)
    else:
        await db_async(limits.requests_admit)(caller, caller.key)


async def chain_named(caller: Caller, name: str) -> Chain:
    """The newest published version of a chain named in the call (not in its path)."""
    if caller.call is not None:
        names, rows = await lane.fetch(*selectors.chain_query(name, None))
        if not rows:
            raise chain_not_found(name, None)
        return lane.instance(Chain, names, rows[0])
    try:
        return await db_async(selectors.chain_get)(name=name)
    except Http404:
        raise chain_not_found(name, None) from None


def _start(
    caller: Caller,
    chain: Chain,
    data: dict,
    idempotency_key: str | None,
    fingerprinted: Any,
) -> tuple[Run, bool]:
    """The run start in one hop to a worker thread (the embedded default, and any start with
    an Idempotency-Key): (run, replayed). A repeated key answers the run the first call made."""
    if not caller.counted:
        caller.counted = True
        limits.requests_admit(caller, caller.key)
    record = None
    if idempotency_key is not None:
        record, replay = idempotency_begin(
            owner=caller.key.owner,
            method="POST",
            path=caller.path,
            key=idempotency_key,
            fingerprint=fingerprint(fingerprinted, key_in_body=False),
        )
        if replay is not None:
            run = Run.objects.select_related("chain").get(pk=replay.data["run_id"])
            return run, True
    try:
        run = services.run_create(
            api_key=caller.key,
            chain=chain,
            run_input=data["input"],
            metadata=data["metadata"],
            webhook=data.get("webhook"),
            idempotency=record,
        )
    except BaseException:
        if record is not None:
            idempotency_forget(record=record)
        raise
    if record is not None:
        idempotency_store(record=record, status=202, body=run_handle(run), headers={})
    return run, False


async def run_start(
    caller: Caller, *, chain: Chain, data: dict, fingerprinted: Callable[[], Any]
) -> tuple[Run, bool]:
    """Start a run of `chain` with `data` (input, metadata, webhook as a REST create body has
    them, validated but for the input): the same limits, statement and idempotency as `POST
    /api/v1/chains/{name}/runs` (an `Idempotency-Key` header; `fingerprinted()` is what its
    fingerprint covers). Returns (run, replayed)."""
    idempotency_key = request_key(caller.headers, None)
    if caller.call is not None and idempotency_key is None and not caller.counted:
        caller.counted = True  # counted with the run start, or alone when refused before it
        run = await runs_lane.run_start(
            caller.call, key=caller.key, chain=chain, name=chain.name, data=data
        )
        return run, False
    body = fingerprinted() if idempotency_key is not None else None
    return await db_async(_start)(caller, chain, data, idempotency_key, body)


def _run_find(owner, run_id: UUID, chain_name: str | None) -> Run:
    run = selectors.run_get(owner=owner, run_id=run_id)
    if chain_name is not None and run.chain.name != chain_name:
        raise Http404
    run_seen(run_id=run.id, status=run.status, last_seen_at=run.last_seen_at)
    return run


async def run_find(caller: Caller, run_id: str, chain_name: str | None = None) -> Run:
    """A run of the caller's owner (of `chain_name`, when given), with its chain; 404 for
    any other, as `GET /api/v1/runs/{id}` answers. Marks it watched."""
    try:
        uuid = UUID(run_id)
    except ValueError:
        raise Http404 from None
    return await db_async(_run_find)(caller.key.owner, uuid, chain_name)


def _run_reload(run_id: UUID) -> Run:
    run = Run.objects.select_related("chain").get(pk=run_id)
    run_seen(run_id=run.id, status=run.status, last_seen_at=run.last_seen_at)  # waited on
    return run


run_reload = db_async(_run_reload)


async def run_wait(run: Run, timeout_s: float) -> Run:
    """The run once it has ended, or as it is when `timeout_s` has passed: woken by the hub,
    read from the database (no thread waits)."""
    deadline = time.monotonic() + timeout_s
    async with get_hub().watch_run(str(run.id)) as waiter:
        while True:
            run = await run_reload(run.id)
            remaining = deadline - time.monotonic()
            if run.is_terminal or remaining <= 0:
                return run
            await waiter.wait(remaining)


def _run_cancel(run: Run, reason: str) -> Run:
    chain = run.chain
    run = services.run_cancel(run=run, reason=reason)  # reloaded
    run.chain = chain
    return run


run_cancel = db_async(_run_cancel)


def _webhook_valid(url: str, secret: str) -> dict:
    """A run webhook as a create body's `webhook` is checked (the SSRF guard resolves the host:
    not on the event loop)."""
    body = RunWebhookInput(data={"url": url, "secret": secret})
    body.is_valid(raise_exception=True)
    return dict(body.validated_data)


webhook_valid = db_async(_webhook_valid)


def _run_webhook_set(run: Run, webhook: dict | None) -> bool:
    return services.run_webhook_set(run=run, webhook=webhook)


run_webhook_set = db_async(_run_webhook_set)


def invoke_wait_s() -> float:
    """How long a blocking call waits for its run, as invoke does without `wait_s`."""
    return min(settings.INVOKE_WAIT_DEFAULT_S, settings.INVOKE_WAIT_MAX_S)
