"""Following a run's events: replay from the database after a cursor, then live until the end.

Shared by SSE (`runs/sse.py`) and WebSocket (`runs/consumers.py`). The reader subscribes to the hub
before it reads, so an event committed between its read and its wait still rings it: each event
is read exactly once, in order, from the database, whatever happens to the wake-ups.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any, NamedTuple
from uuid import UUID

from agentsvc.db import db_async
from agentsvc.models import ApiKey
from agentsvc.services import api_key_authenticate
from runs.events import TERMINAL_EVENTS
from runs.hub import get_hub
from runs.models import ACTIVE_STATUSES, Run, RunEvent
from runs.seen import run_seen, seen_due
from runs.timefmt import iso

BATCH = 500
MAX_SEQ = 2**31 - 1


class EventRow(NamedTuple):
    seq: int
    event: str
    data: dict[str, Any]
    ts: str
    sse: bytes  # the SSE frame, encoded once however many readers send it


def parse_after(raw: str | None) -> int | None:
    """A resume cursor (`?after=`, `Last-Event-ID`): a whole number, or None when invalid."""
    if raw is None or raw == "":
        return 0
    raw = raw.strip()
    # isascii: str.isdigit() is also true of digits int() cannot read, such as "²".
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 10 or int(raw) > MAX_SEQ:
        return None
    return int(raw)


def _events_after(run_id: UUID, after: int) -> list[EventRow]:
    rows = (
        RunEvent.objects.filter(run_id=run_id, seq__gt=after)
        .order_by("seq")
        .values_list("seq", "type", "data", "created_at")[:BATCH]
    )
    return [
        EventRow(seq, event, data, iso(created), _sse_frame(seq, event, data))
        for seq, event, data, created in rows
    ]


def _events_remain(run_id: UUID, after: int, events: frozenset[str]) -> bool:
    return RunEvent.objects.filter(run_id=run_id, seq__gt=after, type__in=events).exists()


events_remain = db_async(_events_remain)


async def stream_has_more(run: Run, after: int, events: frozenset[str] | None) -> bool:
    """Whether following `run` after `after` can send anything: no once it has ended and
    nothing (of `events`, with a filter) is left after the cursor."""
    if not run.is_terminal:
        return True
    if after >= run.last_seq:
        return False
    return events is None or await events_remain(run.id, after, events)


def _sse_frame(seq: int, event: str, data: dict[str, Any]) -> bytes:
    body = json.dumps(data, separators=(",", ":"))
    return f"id: {seq}\nevent: {event}\ndata: {body}\n\n".encode()


_events_after_async = db_async(_events_after)


async def events_after(run_id: UUID, after: int) -> list[EventRow]:
    """One query per (run, cursor) at a time: a thousand readers woken by the same event share
    the read of whoever asked first (single flight), instead of a thousand identical queries."""
    inflight = get_hub().reads
    key = (run_id, after)
    future = inflight.get(key)
    if future is None:
        future = inflight[key] = asyncio.ensure_future(_events_after_async(run_id, after))
        future.add_done_callback(lambda _: inflight.pop(key, None))
    return await asyncio.shield(future)  # one reader leaving must not cancel the others' read


def _seen(run_id: UUID, status: str) -> None:
    run_seen(run_id=run_id, status=status)


_seen_async = db_async(_seen)


async def _mark_seen(run: Run) -> None:
    """A followed run is watched, so not orphaned (at most one write per run, process and 5 s)."""
    if run.status in ACTIVE_STATUSES and seen_due(run.id):
        await _seen_async(run.id, run.status)


async def follow_run(
    run: Run, after: int, *, idle_s: float, events: frozenset[str] | None = None
) -> AsyncIterator[list[EventRow] | None]:
    """Batches of events with seq > after, in order, ending with the batch holding the terminal
    event; None when nothing happened for `idle_s` (time for a keep-alive).

    With `events`, only events of those types are yielded, each with its own seq (so resuming
    works as before); the stream still ends after the run's terminal event, shown or not.
    `run` as the caller read it: if it had ended by then, no event will follow its last_seq."""
    run_id = run.id
    async with get_hub().watch_run(str(run_id)) as waiter:
        if run.is_terminal and after >= run.last_seq:
            return  # already ended, and the caller has seen everything
        last_sent = time.monotonic()
        while True:
            await _mark_seen(run)
            rows = await events_after(run_id, after)
            if rows:
                after = rows[-1].seq
                shown = rows if events is None else [r for r in rows if r.event in events]
                if shown:
                    last_sent = time.monotonic()
                    yield shown
                if rows[-1].event in TERMINAL_EVENTS:
                    return
                if len(rows) == BATCH:
                    continue
            while True:
                remaining = idle_s - (time.monotonic() - last_sent)
                if remaining <= 0:
                    last_sent = time.monotonic()
                    yield None
                    await _mark_seen(run)
                    continue
                # The hub re-checks the database on its own timer, so a dropped wake-up only
                # delays; a reader never polls on its own.
                if await waiter.wait(remaining):
                    break


def key_authenticate(raw: str) -> ApiKey | None:
    return api_key_authenticate(raw=raw)


def run_visible(run_id: UUID, owner_id: int | None) -> Run | None:
    """The run if this owner may see it (owner_id None: staff, any run)."""
    # Only what a stream needs: thousands of open streams each hold their run.
    runs = Run.objects.only("id", "owner_id", "status", "last_seq").filter(pk=run_id)
    if owner_id is not None:
        runs = runs.filter(owner_id=owner_id)
    return runs.first()


def key_and_run(raw: str, run_id: UUID) -> tuple[ApiKey | None, Run | None]:
    """Both look-ups of a stream's opening in one trip to a worker thread."""
    key = key_authenticate(raw)
    return key, (run_visible(run_id, key.owner_id) if key is not None else None)


authenticate = db_async(key_authenticate)
authenticate_and_find = db_async(key_and_run)
visible_run = db_async(run_visible)
