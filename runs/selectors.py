"""Reads on chains and runs, always scoped to an owner where runs are concerned."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db.models import (
    Count,
    DateTimeField,
    DurationField,
    ExpressionWrapper,
    F,
    Max,
    Min,
    Q,
    QuerySet,
    Sum,
    Value,
)
from django.db.models.functions import Coalesce, TruncMinute
from django.http import Http404
from django.utils import timezone

from agentsvc.errors import ApplicationError
from agentsvc.models import ApiKey, Owner
from agentsvc.services import key_query
from runs.models import ACTIVE_STATUSES, Agent, Chain, Executor, Run, RunEvent, RunStatus
from runs.timefmt import iso


def chain_latest_list() -> list[Chain]:
    """The newest published version of every chain."""
    latest = (
        Chain.objects.filter(published=True)
        .values("name")
        .annotate(v=Max("version"))
        .values_list("name", "v")
    )
    wanted = Q()
    for name, version in latest:
        wanted |= Q(name=name, version=version)
    if not wanted:
        return []
    return list(Chain.objects.filter(wanted).prefetch_related("agents").order_by("name"))


CHAIN_LATEST_SQL = (
    f"SELECT * FROM {Chain._meta.db_table} WHERE name = %s AND published "
    "ORDER BY version DESC LIMIT 1"
)
CHAIN_VERSION_SQL = (
    f"SELECT * FROM {Chain._meta.db_table} WHERE name = %s AND version = %s AND published"
)


def chain_query(name: str, version: int | None) -> tuple[str, list]:
    if version is None:
        return CHAIN_LATEST_SQL, [name]
    return CHAIN_VERSION_SQL, [name, version]


def chain_get(*, name: str, version: int | None = None) -> Chain:
    """A published version of a chain (the newest by default). Written out: every run start
    reads it."""
    sql, params = chain_query(name, version)
    chains = Chain.objects.raw(sql, params)
    chain = next(iter(chains), None)
    if chain is None:
        raise Http404
    return chain


_agents: dict[int, tuple[Agent, ...]] = {}


def chain_agents(chain_id: int) -> tuple[Agent, ...]:
    """A version's agents in order, read once per process: a version never changes (its runs
    refer to it; the admin shows agents read-only and publishing makes a new version)."""
    agents = _agents.get(chain_id)
    if agents is None:
        if len(_agents) >= 4096:
            _agents.clear()
        agents = _agents[chain_id] = tuple(
            Agent.objects.filter(chain_id=chain_id).order_by("position")
        )
    return agents


def chain_agents_cached(chain_id: int) -> tuple[Agent, ...] | None:
    """What chain_agents answers without a query, or None (async callers then read them in a
    thread, and pass what they have on: the cache may be emptied meanwhile)."""
    return _agents.get(chain_id)


_R, _C = f'"{Run._meta.db_table}"', f'"{Chain._meta.db_table}"'
_K = f'"{ApiKey._meta.db_table}"'


def _aliased(model, alias: str) -> str:
    return "".join(
        f', "{alias}"."{f.column}" AS "{alias}__{f.column}"' for f in model._meta.concrete_fields
    )


# The fast lane's hot paths read the caller's key and what the call needs in one statement
# (agentsvc.services.key_query): the columns of a joined row are prefixed with its alias
# (`chain__`, `run__`) and NULL when there is no such row.
KEY_CHAIN_LATEST_SQL = key_query(
    _aliased(Chain, "chain"), f' LEFT JOIN ({CHAIN_LATEST_SQL}) AS "chain" ON true'
)
KEY_CHAIN_VERSION_SQL = key_query(
    _aliased(Chain, "chain"), f' LEFT JOIN ({CHAIN_VERSION_SQL}) AS "chain" ON true'
)
# A run of the key's owner, with its chain: the status poll's one statement.
KEY_RUN_SQL = key_query(
    _aliased(Run, "run") + _aliased(Chain, "chain"),
    f' LEFT JOIN {_R} AS "run" ON "run"."id" = %s AND "run"."owner_id" = {_K}."owner_id"'
    f' LEFT JOIN {_C} AS "chain" ON "chain"."id" = "run"."chain_id"',
)


def key_chain_query(name: str, version: int | None) -> tuple[str, list]:
    """The key with the chain version a run start asks for (chain_query)."""
    if version is None:
        return KEY_CHAIN_LATEST_SQL, [name]
    return KEY_CHAIN_VERSION_SQL, [name, version]


def run_get(*, owner: Owner, run_id: UUID) -> Run:
    try:
        return Run.objects.select_related("chain").get(pk=run_id, owner=owner)
    except Run.DoesNotExist:
        raise Http404 from None


_CURSOR_FORMAT = re.compile(r"[A-Za-z0-9_-]+={0,2}")


def encode_cursor(*parts: object) -> str:
    """An opaque cursor: the sort key of the last item of a page."""
    return base64.urlsafe_b64encode("|".join(map(str, parts)).encode()).decode()


def decode_cursor(cursor: str, *parsers: Callable[[str], Any]) -> list[Any]:
    """The parts of a cursor, each read by its parser; anything else is a 400."""
    try:
        # The decoder skips characters outside the alphabet; a cursor with any is not ours.
        if not _CURSOR_FORMAT.fullmatch(cursor):
            raise ValueError
        parts = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
        if len(parts) != len(parsers):
            raise ValueError
        return [parse(part) for parse, part in zip(parsers, parts, strict=True)]
    except (ValueError, binascii.Error, UnicodeError):
        raise ApplicationError(
            "validation_error",
            "Invalid cursor.",
            errors=[{"field": "cursor", "message": "Not a valid cursor."}],
        ) from None


def newest_first_page(rows: QuerySet, *, cursor: str | None, limit: int) -> tuple[list, str | None]:
    """A page of `rows` (UUID keys) newest first, keyset-paginated on (created_at, id), and the
    cursor of the next page or None."""
    if cursor:
        created, pk = decode_cursor(cursor, datetime.fromisoformat, UUID)
        rows = rows.filter(Q(created_at__lt=created) | Q(created_at=created, id__lt=pk))
    page = list(rows.order_by("-created_at", "-id")[: limit + 1])
    if len(page) <= limit:
        return page, None
    page = page[:limit]
    return page, encode_cursor(page[-1].created_at, page[-1].id)


def chain_page(*, cursor: str | None, limit: int) -> tuple[list[Chain], str | None]:
    """A page of the latest chains by name, and the cursor of the next page (or None)."""
    chains = chain_latest_list()
    if cursor:
        (after,) = decode_cursor(cursor, str)
        chains = [c for c in chains if c.name > after]
    if len(chains) <= limit:
        return chains, None
    return chains[:limit], encode_cursor(chains[limit - 1].name)


def run_list(
    *,
    owner: Owner,
    status: list[str] | None = None,
    chain: str | None = None,
    schedule: UUID | None = None,
    created_after: datetime | None = None,
    cursor: str | None = None,
    limit: int = 20,
) -> tuple[list[Run], str | None]:
    """A page of an owner's runs, newest first, and the cursor of the next page (or None).
    `created_after` is inclusive: the API passes the first instant after the millisecond asked.
    `schedule`: the runs its ticks started (run_owner_schedule_idx)."""
    runs: QuerySet[Run] = Run.objects.filter(owner=owner).select_related("chain")
    if status:
        runs = runs.filter(status__in=status)
    if chain:
        runs = runs.filter(chain__name=chain)
    if schedule:
        runs = runs.filter(schedule_id=schedule)
    if created_after:
        runs = runs.filter(created_at__gte=created_after)
    if cursor:
        created_at, run_id = decode_cursor(cursor, datetime.fromisoformat, UUID)
        runs = runs.filter(Q(created_at__lt=created_at) | Q(created_at=created_at, id__lt=run_id))
    page = list(runs.order_by("-created_at", "-id")[: limit + 1])
    next_cursor = None
    if len(page) > limit:
        page = page[:limit]
        next_cursor = encode_cursor(page[-1].created_at, page[-1].id)
    return page, next_cursor


_E = f'"{RunEvent._meta.db_table}"'
# run_events_after written out (the events page on the fast lane): all events, or some types.
EVENTS_AFTER_SQL = f'SELECT * FROM {_E} WHERE "run_id" = %s AND "seq" > %s ORDER BY "seq" LIMIT %s'
EVENTS_AFTER_TYPES_SQL = (
    f'SELECT * FROM {_E} WHERE "run_id" = %s AND "seq" > %s AND "type" = ANY(%s) '
    'ORDER BY "seq" LIMIT %s'
)


def events_after_query(run_id, after: int, limit: int, types) -> tuple[str, list]:
    if types is None:
        return EVENTS_AFTER_SQL, [run_id, after, limit]
    return EVENTS_AFTER_TYPES_SQL, [run_id, after, sorted(types), limit]


def run_events_after(
    *, run: Run, after: int, limit: int = 100, types: frozenset[str] | None = None
) -> list[RunEvent]:
    """Events with seq > after, in order; with `types`, only those (runevent_run_seq_uniq)."""
    events = RunEvent.objects.filter(run=run, seq__gt=after)
    if types is not None:
        events = events.filter(type__in=sorted(types))
    return list(events.order_by("seq")[:limit])


def chain_exists(*, name: str) -> bool:
    return Chain.objects.filter(name=name).exists()


def run_recent_list(*, limit: int = 50) -> list[Run]:
    """Every owner's newest runs (the dashboard's first rows); run_created_idx serves it."""
    runs = Run.objects.select_related("chain", "owner").defer(
        "input", "output", "metadata", "error_message", "webhook_secret"
    )
    return list(runs.order_by("-created_at")[:limit])


def run_waiting_list(*, limit: int = 50) -> list[Run]:
    """Every owner's runs waiting for a person, soonest to expire first (run_input_waiting_idx
    serves it)."""
    runs = Run.objects.filter(status=RunStatus.INPUT_REQUIRED).select_related("chain", "owner")
    runs = runs.defer("input", "output", "metadata", "error_message", "webhook_secret")
    return list(runs.order_by("input_expires_at")[:limit])


def run_counts(*, now: datetime) -> dict[str, int]:
    """Active (running), queued, waiting for input, and failed in the hour before `now`, over
    every owner.

    Three queries on partial indexes: run_active_idx for the live ones, run_input_waiting_idx
    for the waiting ones, run_finished_idx for the failures (a failed run always has
    finished_at).
    """
    live = dict(
        Run.objects.filter(status__in=ACTIVE_STATUSES)
        .values("status")
        .annotate(n=Count("pk"))
        .values_list("status", "n")
    )
    failed = Run.objects.filter(
        finished_at__gte=now - timedelta(hours=1), status=RunStatus.FAILED
    ).count()
    return {
        "active": live.get(RunStatus.RUNNING, 0),
        "queued": live.get(RunStatus.QUEUED, 0),
        "waiting": Run.objects.filter(status=RunStatus.INPUT_REQUIRED).count(),
        "failed_last_hour": failed,
    }


def run_series(*, now: datetime, minutes: int = 60) -> dict[str, Any]:
    """The dashboard's charts, per minute over the last `minutes` (the last one is the current,
    partial minute): runs created by their status now, and the longest queue wait of the runs
    created in that minute (until they started or ended; still queued: until now). Also the
    current queue age, the oldest queued run's.

    Two queries: one aggregate over the range of run_created_idx, one MIN on run_active_idx.
    """
    end = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    start = end - timedelta(minutes=minutes)
    waited = ExpressionWrapper(
        Coalesce("started_at", "finished_at", Value(now, output_field=DateTimeField()))
        - F("created_at"),
        output_field=DurationField(),
    )
    rows = (
        Run.objects.filter(created_at__gte=start, created_at__lt=end)
        .annotate(minute=TruncMinute("created_at"))
        .values("minute", "status")
        .annotate(n=Count("pk"), wait=Max(waited))
        .order_by()
    )
    runs = {status: [0] * minutes for status in RunStatus.values}
    wait: list[float | None] = [None] * minutes
    for row in rows:
        i = int((row["minute"] - start).total_seconds() // 60)
        runs[row["status"]][i] += row["n"]
        seconds = max(row["wait"].total_seconds(), 0.0)
        wait[i] = max(wait[i] or 0.0, seconds)
    oldest = Run.objects.filter(status=RunStatus.QUEUED).aggregate(t=Min("created_at"))["t"]
    return {
        "start": iso(start),
        "minutes": minutes,
        "runs": runs,
        "queue_wait_s": [None if w is None else round(w, 3) for w in wait],
        "queue_age_s": round(max((now - oldest).total_seconds(), 0.0), 3) if oldest else 0.0,
    }


def executors_alive() -> str:
    """Readiness: executors whose heartbeat is fresh, and the runs they hold."""
    cutoff = timezone.now() - timedelta(seconds=settings.WORKER_LOST_AFTER_S)
    alive = Executor.objects.filter(heartbeat_at__gte=cutoff, draining=False).aggregate(
        n=Count("pk"), capacity=Sum("capacity"), in_flight=Sum("in_flight")
    )
    if not alive["n"]:
        raise RuntimeError("no executor is alive")
    return f"{alive['n']} executor(s), {alive['in_flight']} of {alive['capacity']} runs in flight"
