"""The runs API's hottest calls on the fast lane (agentsvc/lane.py): starting a run, reading
one and reading its events page. Each handler takes the steps of its DRF view, through the same
functions and statements, with the queries awaited on the lane's pool, and answers the same. It
returns None (Django answers) before counting the request when the call is not a plain one.
"""

from __future__ import annotations

import asyncio
import dataclasses
from uuid import UUID

from asgiref.sync import sync_to_async
from django.http import Http404
from rest_framework.exceptions import ValidationError

from agentsvc import lane, limits, metrics
from agentsvc.errors import ApplicationError
from agentsvc.idempotency import BODY_FIELD
from agentsvc.models import ApiKey
from runs import selectors, services
from runs.api import (
    EVENTS_JSON,
    accepted_headers,
    chain_not_found,
    create_body,
    detail_answer,
    events_answer,
    events_filter,
    events_representation,
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
        data, invalid = await _create_body(body), None
    except ValidationError as exc:  # answered once the key authenticates
        data, invalid = {}, exc
    version = data.get("version")
    key, chain = await key_and_chain(call, name, version)
    if key is None:
        return None
    run = await run_start(call, key=key, chain=chain, name=name, data=data, invalid=invalid)
    return lane.Answer(202, run_handle(run), accepted_headers(run))


async def key_and_chain(
    call: lane.Call, name: str, version: int | None = None
) -> tuple[ApiKey | None, Chain | None]:
    """The caller's key and the chain version a start asks for, in one statement; (None, None)
    when the credentials do not authenticate."""
    key, row = await call.key(selectors.key_chain_query(name, version))
    if key is None:
        return None, None
    return key, lane.joined(row, Chain, "chain")


async def run_start(
    call: lane.Call,
    *,
    key: ApiKey,
    chain: Chain | None,
    name: str,
    data: dict,
    invalid: Exception | None = None,
) -> Run:
    """Start a run of a request not counted yet (the REST create, A2A, MCP): the checks, the
    request and the run start counted in one round trip, the start statement (grouped). A
    request refused before its run start still counts as a request."""
    version = data.get("version")
    try:
        if invalid is not None:
            raise invalid
        if chain is None:
            raise chain_not_found(name, version)
        chain_validate_input(chain=chain, data=data["input"])
        depth = services.queue_depth_cached()
        if depth is None:
            _, ((depth,),) = await call.fetch(services.QUEUED_COUNT_SQL, [])
            services.queue_depth_set(depth)
        services.queue_check(adding=1, depth=depth)
    except (ApplicationError, ValidationError):
        await call.admit(key)  # refused before its run start: still a request
        raise
    await call.admit(key, runs=1)
    agents = selectors.chain_agents_cached(chain.pk)
    if agents is None:  # once per version and process
        agents = await sync_to_async(selectors.chain_agents)(chain.pk)
    starts = services.runs_build(
        api_key=key,
        chain=chain,
        new=[services.NewRun(data["input"], data["metadata"], data.get("webhook"))],
        agents=agents,
    )
    await call.release()  # the start waits on a connection of its own
    used, written = await _starts.write(starts)
    if written != len(starts.runs):
        await sync_to_async(services.runs_refused)(starts, used)
    wakeups_publish(services.runs_wakeups(starts))
    (run,) = starts.runs
    return run


async def _create_body(body: dict) -> dict:
    """create_body; in a thread when the body names a webhook, whose URL's host is resolved
    (webhooks/ssrf.py): a DNS answer may take seconds, and the loop serves every other call."""
    if "webhook" not in body:
        return create_body(body)
    return await sync_to_async(create_body, thread_sensitive=False)(body)


class _GroupStarts:
    """Group commit for run starts. While one key's start statement is out, that key's next
    starts wait, then go together as one statement (one round trip, one commit, one lock of the
    key's row) on a connection of the lane's pool. The statement is all or nothing: a group it
    refuses (the key's token budget or active runs cannot take all of it) is retried start by
    start, so each limit still admits exactly what fits. A caller that leaves while waiting is
    left out of its group."""

    MAX = 32  # starts per statement (each size is a statement of its own, prepared once)

    def __init__(self) -> None:
        # (key, token window): the starts waiting while that group's statement is out
        self._waiting: dict[tuple[int, int], list[tuple[services.Starts, asyncio.Future]]] = {}
        self._busy: set[tuple[int, int]] = set()
        self._tasks: set[asyncio.Task] = set()

    async def write(self, starts: services.Starts) -> tuple[int | None, int]:
        """(tokens used, runs written) for `starts`, as runs_statement's statement returns them."""
        group = (starts.key.pk, starts.window)
        future = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(group, []).append((starts, future))
        if group not in self._busy:
            self._busy.add(group)
            self._next(group)
        outcome = await future
        if outcome is _ALONE:
            return await self._statement(starts)
        return outcome

    def _next(self, group: tuple[int, int]) -> None:
        waiting = [w for w in self._waiting.pop(group, []) if not w[1].done()]
        if not waiting:
            self._busy.discard(group)
            return
        if len(waiting) > self.MAX:
            self._waiting[group] = waiting[self.MAX :]
        task = asyncio.ensure_future(self._flush(group, waiting[: self.MAX]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush(self, group: tuple[int, int], batch: list) -> None:
        try:
            merged = batch[0][0]
            if len(batch) > 1:
                merged = dataclasses.replace(
                    merged,
                    runs=[run for starts, _ in batch for run in starts.runs],
                    events=[event for starts, _ in batch for event in starts.events],
                    tokens=sum(starts.tokens for starts, _ in batch),
                )
            try:
                used, written = await self._statement(merged)
                if written == len(merged.runs):
                    metrics.lane_starts(count=len(batch))
                elif len(batch) > 1 and used is not None:  # the group's tokens, reserved: refund
                    await sync_to_async(limits.tokens_settle)(
                        key_id=merged.key.pk, window=merged.window, reserved=merged.tokens, used=0
                    )
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                return
            for starts, future in batch:
                if future.done():
                    continue
                if written == len(merged.runs):
                    future.set_result((used, len(starts.runs)))
                else:  # refused: alone, the same answer; in a group, each tries alone
                    future.set_result((used, written) if len(batch) == 1 else _ALONE)
        finally:
            self._next(group)

    @staticmethod
    async def _statement(starts: services.Starts) -> tuple[int | None, int]:
        _, ((used, written),) = await lane.fetch(*services.runs_statement(starts, lane.db()))
        return used, written


_ALONE = object()
_starts = _GroupStarts()


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
    text/event-stream) and the 406 are Django's."""
    if events_representation(call.headers.get("accept", "")) != EVENTS_JSON:
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
