"""The runs API's hottest calls on the fast lane (agentsvc/lane.py): starting a run, reading
one and reading its events page. Each handler takes the steps of its DRF view, through the same
functions and statements, with the queries awaited on the lane's pool, and answers the same. It
returns None (Django answers) before counting the request when the call is not a plain one.
"""

from __future__ import annotations

from uuid import UUID

from asgiref.sync import sync_to_async
from django.http import Http404
from rest_framework.exceptions import ValidationError

from agentsvc import lane
from agentsvc.errors import ApplicationError
from agentsvc.idempotency import BODY_FIELD
from agentsvc.models import ApiKey
from runs import selectors, services
from runs.api import (
    accepted_headers,
    chain_not_found,
    create_body,
    detail_answer,
    events_answer,
    events_filter,
    events_window,
)
from runs.chains import chain_validate_input
from runs.models import ACTIVE_STATUSES, Chain, Run, RunEvent
from runs.presenters import run_handle
from runs.seen import run_seen, seen_due
from runs.wakeup import wakeups_publish

UUID_PATTERN = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


async def runs_create(call: lane.Call, name: str) -> lane.Answer | None:
    """POST /api/v1/chains/{name}/runs (RunCreateApi): three round trips, the key with the
    chain, the counters and the start (run, event, token reservation, active-run slot)."""
    body = call.json_object()
    if body is None or BODY_FIELD in body:
        return None
    try:
        data, invalid = create_body(body), None
    except ValidationError as exc:  # answered once the key authenticates
        data, invalid = {}, exc
    version = data.get("version")
    key, row = await call.key(selectors.key_chain_query(name, version))
    if key is None:
        return None
    try:
        if invalid is not None:
            raise invalid
        chain = lane.joined(row, Chain, "chain")
        if chain is None:
            raise chain_not_found(name, version)
        chain_validate_input(chain=chain, data=data["input"])
        if services.queue_depth_stale():
            _, ((depth,),) = await call.fetch(services.QUEUED_COUNT_SQL, [])
            services.queue_depth_set(depth)
        services.queue_check(adding=1)
    except (ApplicationError, ValidationError):
        await call.admit(key)  # refused before its run start: still a request
        raise
    await call.admit(key, runs=1)
    if not selectors.chain_agents_known(chain.pk):
        await sync_to_async(selectors.chain_agents)(chain.pk)  # once per version and process
    starts = services.runs_build(
        api_key=key,
        chain=chain,
        new=[services.NewRun(data["input"], data["metadata"], data.get("webhook"))],
    )
    _, ((used, written),) = await call.fetch(*services.runs_statement(starts, lane.db()))
    if written != len(starts.runs):
        await sync_to_async(services.runs_refused)(starts, used)
    wakeups_publish(services.runs_wakeups(starts))
    (run,) = starts.runs
    return lane.Answer(202, run_handle(run), accepted_headers(run))


async def _key_and_run(call: lane.Call, run_id: str) -> tuple[ApiKey | None, Run | None]:
    """The caller's key and run, with its chain, in one statement (selectors.run_get). The run
    is marked as watched (run_seen) once the request is admitted."""
    key, row = await call.key((selectors.KEY_RUN_SQL, [UUID(run_id)]))
    if key is None:
        return None, None
    run = lane.joined(row, Run, "run")
    if run is not None:
        run.chain = lane.joined(row, Chain, "chain")
    return key, run


async def _seen(run: Run | None) -> Run:
    if run is None:
        raise Http404
    if run.status in ACTIVE_STATUSES and seen_due(run.id):
        await sync_to_async(run_seen)(
            run_id=run.id, status=run.status, last_seen_at=run.last_seen_at
        )
    return run


async def runs_retrieve(call: lane.Call, run_id: str) -> lane.Answer | None:
    """GET /api/v1/runs/{id} (RunDetailApi): the key with the run and its chain, the counter."""
    key, run = await _key_and_run(call, run_id)
    if key is None:
        return None
    await call.admit(key)
    data, headers = detail_answer(await _seen(run))
    return lane.Answer(200, data, headers)


async def run_events_page(call: lane.Call, run_id: str) -> lane.Answer | None:
    """GET /api/v1/runs/{id}/events as JSON (RunEventsApi); the stream (Accept:
    text/event-stream) is Django's."""
    if "text/event-stream" in call.headers.get("accept", ""):
        return None
    key, run = await _key_and_run(call, run_id)
    if key is None:
        return None
    await call.admit(key)
    types = events_filter(call.query)
    run = await _seen(run)
    after, limit = events_window(call.query)
    names, rows = await call.fetch(*selectors.events_after_query(run.id, after, limit, types))
    events = [lane.instance(RunEvent, names, row) for row in rows]
    return lane.Answer(200, events_answer(run, events, after=after, limit=limit, types=types))


def register() -> None:
    lane.route(
        "POST",
        r"/api/v1/chains/(?P<name>[-a-zA-Z0-9_]+)/runs",
        "api/v1/chains/<slug:name>/runs",
        "POST, OPTIONS",
        runs_create,
    )
    lane.route(
        "GET",
        rf"/api/v1/runs/(?P<run_id>{UUID_PATTERN})",
        "api/v1/runs/<uuid:run_id>",
        "GET, HEAD, OPTIONS",
        runs_retrieve,
    )
    lane.route(
        "GET",
        rf"/api/v1/runs/(?P<run_id>{UUID_PATTERN})/events",
        "api/v1/runs/<uuid:run_id>/events",
        "GET, HEAD, OPTIONS",
        run_events_page,
        query=True,
    )
