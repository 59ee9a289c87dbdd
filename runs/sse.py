"""Server-sent events (docs/api.md section 5): plain async views over async generators.

`GET /api/v1/runs/{id}/events` answers the JSON page (the DRF view) unless the caller accepts
`text/event-stream`; `POST /api/v1/chains/{name}/stream` creates a run and streams it. Every error
is answered as problem+json before the first byte of the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from uuid import UUID

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from rest_framework.exceptions import ParseError, ValidationError

from agentsvc import limits
from agentsvc.auth import raw_key_from_headers
from agentsvc.db import db_async
from agentsvc.errors import ApplicationError, exception_problem, problem_response
from agentsvc.idempotency import (
    HEADER,
    fingerprint,
    idempotency_begin,
    idempotency_forget,
    idempotency_store,
    request_key,
)
from agentsvc.models import ApiKey
from agentsvc.parsers import strict_loads
from agentsvc.serializers import StrictBooleanField
from runs import services
from runs.api import (
    EVENTS_JSON,
    EVENTS_SSE,
    RunCreateInput,
    RunEventsApi,
    check_query,
    events_param,
    events_representation,
    start_run,
)
from runs.models import Run
from runs.presenters import run_handle
from runs.stream_limits import StreamLease, stream_lease
from runs.streams import (
    EventRow,
    authenticate,
    authenticate_and_find,
    follow_run,
    parse_after,
    stream_has_more,
)
from runs.tickets import ticket_authenticate_and_find

logger = logging.getLogger(__name__)

_events_json = RunEventsApi.as_view()


class RunStreamInput(RunCreateInput):
    cancel_on_disconnect = StrictBooleanField(required=False, default=False)


def _frames(rows: list[EventRow]) -> bytes:
    return b"".join(r.sse for r in rows)


def _auth_problem(request: HttpRequest, raw: str | None, ticket: str | None = None) -> HttpResponse:
    if raw:
        detail = "Unknown or revoked API key."
    elif ticket is not None:
        detail = "The stream ticket is invalid, expired, revoked or for another stream."
    else:
        detail = "Send Authorization: Bearer <key> or X-API-Key: <key>."
    return problem_response(
        request, "authentication_failed", detail, headers={"WWW-Authenticate": 'Bearer realm="api"'}
    )


async def _key_or_problem(request: HttpRequest) -> ApiKey | HttpResponse:
    try:
        raw = raw_key_from_headers(request.headers)
    except ApplicationError as e:
        return exception_problem(request, e)
    key = await authenticate(raw) if raw else None
    return key if key is not None else _auth_problem(request, raw)


async def _admit_or_problem(request: HttpRequest, key: ApiKey) -> HttpResponse | None:
    """The key's requests-per-minute, as for every API call (and its RateLimit headers)."""
    try:
        await sync_to_async(limits.requests_admit, thread_sensitive=False)(request, key)
    except ApplicationError as e:
        return exception_problem(request, e)
    return None


async def _lease_or_problem(request: HttpRequest, key: ApiKey) -> StreamLease | HttpResponse:
    try:
        return await stream_lease(key.pk)
    except ApplicationError as e:
        return exception_problem(request, e)


async def _stream(
    run: Run,
    after: int,
    lease: StreamLease,
    *,
    cancel_on_disconnect: bool = False,
    events: frozenset[str] | None = None,
) -> AsyncIterator[bytes]:
    """The body: a retry line at once, then frames, pings when idle, and the end after the
    terminal event. On disconnect Django cancels us: clean up, cancel the run if asked, re-raise."""
    try:
        yield f"retry: {settings.SSE_RETRY_MS}\n\n".encode()
        async for rows in follow_run(run, after, idle_s=settings.SSE_PING_S, events=events):
            yield _frames(rows) if rows is not None else b": ping\n\n"
    except asyncio.CancelledError:
        if cancel_on_disconnect:
            try:
                await db_async(_cancel_quietly)(run)
            except Exception:
                logger.exception("run %s: cancel on disconnect failed", run.id)
        raise
    finally:
        await lease.release()


def _cancel_quietly(run: Run) -> None:
    with contextlib.suppress(ApplicationError):  # it ended on its own meanwhile
        services.run_cancel(run=run, reason="disconnect")


class _SseResponse(StreamingHttpResponse):
    """Gives the lease back on close too: if the client leaves before the body starts, Django
    closes the response without ever running the generator (so its `finally` never runs)."""

    def __init__(self, body: AsyncIterator[bytes], lease: StreamLease) -> None:
        super().__init__(body, content_type="text/event-stream")
        self.lease = lease
        self.loop = asyncio.get_running_loop()

    def close(self) -> None:
        super().close()
        if self.lease.held:  # Django calls close() from a worker thread
            self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self.lease.release()))


def _sse_response(
    body: AsyncIterator[bytes], run: Run, lease: StreamLease
) -> StreamingHttpResponse:
    response = _SseResponse(body, lease)
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    response["X-Run-Id"] = str(run.id)
    return response


async def run_events(request: HttpRequest, run_id: UUID) -> HttpResponse:
    """GET /api/v1/runs/{id}/events: the JSON page, or the stream with Accept: text/event-stream.
    A stream with nothing left to send (the run has ended and nothing, of `events` with a
    filter, is after the cursor) is a 204: the HTML standard's way of telling an EventSource
    not to reconnect."""
    representation = events_representation(request.headers.get("Accept", ""))
    if representation is None:
        return problem_response(
            request, "not_acceptable", f"The events are {EVENTS_JSON} or {EVENTS_SSE}."
        )
    if representation == EVENTS_JSON:
        return await sync_to_async(_events_json)(request, run_id=run_id)
    if request.method != "GET":
        return problem_response(request, "method_not_allowed", headers={"Allow": "GET"})
    # Key and run in one hop to a worker thread; the answers keep their order: 401, 400, 404.
    # Browsers, which cannot set a header on an EventSource, send a stream ticket instead.
    try:
        raw = raw_key_from_headers(request.headers)
    except ApplicationError as e:
        return exception_problem(request, e)
    ticket = request.GET.get("ticket") if not raw else None
    if raw:
        key, run = await authenticate_and_find(raw, run_id)
    elif ticket is not None:
        key, run = await ticket_authenticate_and_find(ticket, run_id)
    else:
        key, run = None, None
    if key is None:
        return _auth_problem(request, raw, ticket)
    if (limited := await _admit_or_problem(request, key)) is not None:
        return limited
    try:
        check_query(request.GET, {"after", "ticket", "events"})
        events = events_param(request.GET)
    except ApplicationError as e:
        return exception_problem(request, e)
    field = "Last-Event-ID" if "Last-Event-ID" in request.headers else "after"
    raw_after = request.headers.get("Last-Event-ID", request.GET.get("after"))
    after = parse_after(raw_after)
    if after is None:
        return problem_response(
            request,
            "validation_error",
            f"Invalid {field}.",
            errors=[{"field": field, "message": "Must be a whole number (an event seq)."}],
        )
    if run is None:
        return problem_response(request, "not_found", "No such run.")
    if not await stream_has_more(run, after, events):
        response = HttpResponse(status=204)
        del response["Content-Type"]
        return response
    lease = await _lease_or_problem(request, key)
    if isinstance(lease, HttpResponse):
        return lease
    return _sse_response(_stream(run, after, lease, events=events), run, lease)


def _start_or_replay(
    *, key: ApiKey, name: str, body: dict, path: str, headers
) -> tuple[Run, bool, bool]:
    """(run, cancel_on_disconnect, replayed). A repeated Idempotency-Key streams the run the
    first request started, from seq 1."""
    idem = request_key(headers, body)
    record = None
    if idem is not None:
        record, replay = idempotency_begin(
            owner=key.owner,
            method="POST",
            path=path,
            key=idem,
            fingerprint=fingerprint(body, key_in_body=HEADER not in headers),
        )
        if replay is not None:
            run = Run.objects.select_related("chain").get(pk=replay.data["run_id"])
            return run, bool(body.get("cancel_on_disconnect")), True
    try:
        run, data = start_run(
            key=key, body=body, name=name, idempotency=record, serializer_class=RunStreamInput
        )
        cancel = data["cancel_on_disconnect"]
    except BaseException:
        if record is not None:
            idempotency_forget(record=record)
        raise
    if record is not None:
        idempotency_store(record=record, status=200, body=run_handle(run), headers={})
    return run, cancel, False


@csrf_exempt
async def chain_stream(request: HttpRequest, name: str) -> HttpResponse:
    """POST /api/v1/chains/{name}/stream: create the run, then stream its events from seq 1."""
    if request.method != "POST":
        return problem_response(request, "method_not_allowed", headers={"Allow": "POST"})
    key = await _key_or_problem(request)
    if isinstance(key, HttpResponse):
        return key
    if (limited := await _admit_or_problem(request, key)) is not None:
        return limited
    try:
        check_query(request.GET, {"events"})
        events = events_param(request.GET)
    except ApplicationError as e:
        return exception_problem(request, e)
    if request.content_type != "application/json":
        return problem_response(
            request, "unsupported_media_type", "Send a JSON body (Content-Type: application/json)."
        )
    try:
        body = strict_loads(request.body or b"{}")
    except ParseError as e:
        return exception_problem(request, e)
    if not isinstance(body, dict):
        return exception_problem(request, ValidationError({"body": "Must be a JSON object."}))
    lease = await _lease_or_problem(request, key)
    if isinstance(lease, HttpResponse):
        return lease
    try:
        run, cancel, replayed = await db_async(_start_or_replay)(
            key=key, name=name, body=body, path=request.path, headers=request.headers
        )
    except Exception as e:
        await lease.release()
        return exception_problem(request, e)
    except BaseException:  # cancelled: the client left while the run was being created
        await asyncio.shield(lease.release())
        raise
    body_stream = _stream(run, 0, lease, cancel_on_disconnect=cancel, events=events)
    response = _sse_response(body_stream, run, lease)
    if replayed:
        response["Idempotent-Replayed"] = "true"
    return response
