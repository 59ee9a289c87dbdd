"""WebSocket streams (docs/api.md section 5): one run's events, and the status feed.

The socket is accepted, then closed with 4401 / 4404 / 4429 before any frame when the caller may
not have it (browsers only see close codes after an accept). The caller is a key from the
Authorization header, a stream ticket (`?ticket=`, for browsers: runs/tickets.py) for this very
socket, or a staff session (the operator dashboard). A key in the URL (`?api_key=`) is refused:
it would end up in access logs and browser history.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from urllib.parse import parse_qs

from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from agentsvc.auth import Headers, raw_key_from_headers
from agentsvc.db import db_async
from agentsvc.errors import ApplicationError
from runs.events import FEED_EVENTS, event_filter_parse
from runs.hub import get_hub
from runs.models import RunEvent
from runs.presenters import run_dict
from runs.stream_limits import StreamLease, StreamLimitExceeded
from runs.streams import authenticate, follow_run, parse_after, visible_run
from runs.tickets import FEED, ticket_authenticate
from runs.timefmt import iso

CLOSE_AUTH, CLOSE_NOT_FOUND, CLOSE_LIMIT, CLOSE_BAD_REQUEST = 4401, 4404, 4429, 4400

_STATUS_OF = {
    "run.queued": "queued",
    "run.started": "running",
    "agent.started": "running",
    "agent.completed": "running",
    "run.input_required": "input_required",
    "run.completed": "completed",
    "run.failed": "failed",
    "run.cancelled": "cancelled",
    "run.timed_out": "timed_out",
}


class _StreamConsumer(AsyncWebsocketConsumer):
    """Authentication, the lease and the background task shared by both sockets."""

    lease: StreamLease | None = None
    task: asyncio.Task | None = None

    def query(self, name: str) -> str | None:
        values = parse_qs(
            self.scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True
        ).get(name)
        return values[-1] if values else None

    async def _viewer(self, scope: str) -> tuple[int | None, int | None, int | None]:
        """(close code, or None when allowed; owner_id or None for staff; key id or None).
        `scope` is what a ticket must open: this run's id, or FEED."""
        if self.query("api_key") is not None:
            return CLOSE_AUTH, None, None
        try:
            raw = raw_key_from_headers(Headers.from_scope(self.scope))
        except ApplicationError:  # ambiguous_credentials
            return CLOSE_BAD_REQUEST, None, None
        ticket = self.query("ticket")
        if raw or ticket is not None:
            key = await (authenticate(raw) if raw else ticket_authenticate(ticket, scope))
            return (None, key.owner_id, key.pk) if key else (CLOSE_AUTH, None, None)
        user = self.scope.get("user")
        if user is not None and user.is_authenticated and user.is_staff and user.is_active:
            return None, None, None
        return CLOSE_AUTH, None, None

    async def _open(self, key_id: int | None) -> bool:
        try:
            self.lease = await StreamLease(key_id).acquire()
        except StreamLimitExceeded:
            await self.close(CLOSE_LIMIT)
            return False
        return True

    async def _run_then_close(self, coro) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            await self.close(1011)
            raise

    async def disconnect(self, code: int) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        if self.lease is not None:
            await self.lease.release()

    async def receive(self, text_data=None, bytes_data=None) -> None:
        pass  # the client only listens


class RunEventsConsumer(_StreamConsumer):
    """/ws/v1/runs/{id}?after=N&events=a,b: frames {seq, event, data, ts}; 1000 after the run's
    terminal event (sent or filtered out); 4400 for a bad `after` or an unknown event name."""

    async def connect(self) -> None:
        await self.accept()
        run_id = self.scope["url_route"]["kwargs"]["run_id"]
        refused, owner_id, key_id = await self._viewer(str(run_id))
        if refused is not None:
            await self.close(refused)
            return
        after = parse_after(self.query("after"))
        run = await visible_run(run_id, owner_id)
        if run is None:
            await self.close(CLOSE_NOT_FOUND)
            return
        try:
            events = event_filter_parse(self.query("events"))
        except ValueError:
            events = None
            after = None
        if after is None:
            await self.close(CLOSE_BAD_REQUEST)
            return
        if await self._open(key_id):
            self.task = asyncio.create_task(self._run_then_close(self._follow(run, after, events)))

    async def _follow(self, run, after: int, events: frozenset[str] | None) -> None:
        async for rows in follow_run(run, after, idle_s=settings.SSE_PING_S, events=events):
            for row in rows or ():
                await self.send(
                    json.dumps(
                        {"seq": row.seq, "event": row.event, "data": row.data, "ts": row.ts},
                        separators=(",", ":"),
                    )
                )
        await self.close(1000)


# Event ids are taken at insert, but transactions commit in any order: an id below the highest
# one seen may still appear. The feed re-looks this many ids back and skips what it has sent.
FEED_LAG_IDS = 500
FEED_BATCH = 200


class FeedCursor:
    """Which feed events a viewer has been sent: everything up to `floor`, plus `recent`."""

    def __init__(self, owner_id: int | None) -> None:
        self.owner_id = owner_id
        self.top = 0
        self.recent: set[int] = set()

    def _events(self):
        events = RunEvent.objects.filter(pk__gt=self.top - FEED_LAG_IDS, type__in=FEED_EVENTS)
        if self.owner_id is not None:
            events = events.filter(run__owner_id=self.owner_id)
        return events

    def start(self) -> None:
        """From now on: what exists already counts as sent."""
        self.top = RunEvent.objects.order_by("-pk").values_list("pk", flat=True).first() or 0
        self.recent = set(self._events().values_list("pk", flat=True))

    def next_frames(self) -> list[dict]:
        pks = self._events().order_by("pk").values_list("pk", flat=True)
        new = [pk for pk in pks if pk not in self.recent][:FEED_BATCH]
        if not new:
            return []
        frames = []
        rows = RunEvent.objects.filter(pk__in=new).select_related("run", "run__chain")
        for event in rows.order_by("pk"):
            data = {k: v for k, v in run_dict(event.run).items() if k not in ("input", "metadata")}
            data["status"] = _STATUS_OF[event.type]
            frames.append({"event": "run.status", "data": data, "ts": iso(event.created_at)})
        self.recent.update(new)
        self.top = max(self.top, *new)
        self.recent = {pk for pk in self.recent if pk > self.top - FEED_LAG_IDS}
        return frames


class RunFeedConsumer(_StreamConsumer):
    """/ws/v1/runs: `run.status` for every status or progress change the viewer may see."""

    async def connect(self) -> None:
        await self.accept()
        refused, owner_id, key_id = await self._viewer(FEED)
        if refused is not None:
            await self.close(refused)
            return
        if await self._open(key_id):
            self.task = asyncio.create_task(self._run_then_close(self._follow(owner_id)))

    async def _follow(self, owner_id: int | None) -> None:
        cursor = FeedCursor(owner_id)
        next_frames = db_async(cursor.next_frames)
        async with get_hub().watch_feed(owner_id) as waiter:
            await db_async(cursor.start)()
            last_sent = time.monotonic()
            while True:
                frames = await next_frames()
                for frame in frames:
                    await self.send(json.dumps(frame, separators=(",", ":")))
                if frames:
                    last_sent = time.monotonic()
                    if len(frames) == FEED_BATCH:
                        continue
                await waiter.wait(max(0.0, settings.SSE_PING_S - (time.monotonic() - last_sent)))
