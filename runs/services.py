"""Writes on runs: create, cancel, and the event log every state change goes through."""

from __future__ import annotations

import enum
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache, partial
from typing import Any
from uuid import UUID

import psycopg
from django.conf import settings
from django.db import connection, connections, transaction
from django.db.models import F, Q, QuerySet
from django.db.models.sql import UpdateQuery
from django.utils import timezone

from agentsvc import limits, tracing
from agentsvc.errors import ApplicationError
from agentsvc.metrics import rejection
from agentsvc.models import ApiKey, IdempotencyRecord, TokenWindow
from runs import events as run_events
from runs.chains import chain_validate_input
from runs.events import (
    FEED_EVENTS,
    RUN_CANCELLED,
    RUN_INPUT_REQUIRED,
    RUN_QUEUED,
    TERMINAL_EVENTS,
    written_hooks_call,
)
from runs.models import (
    ACTIVE_STATUSES,
    TERMINAL_STATUSES,
    Agent,
    Chain,
    Run,
    RunEvent,
    RunStatus,
    RunStep,
)
from runs.seen import run_seen
from runs.selectors import chain_agents
from runs.timefmt import iso
from runs.wakeup import executors_wake_for_cancel, wakeups_publish

logger = logging.getLogger(__name__)


def _update_returning(rows: QuerySet, values: dict[str, Any], columns: tuple[str, ...]):
    """`rows.update(**values)`, returning `columns` of the (single) updated row, or None.

    Django has no UPDATE ... RETURNING; the statement is the ORM's own, with the clause added
    (PostgreSQL and SQLite 3.35+ both have it). One round trip instead of an UPDATE and a SELECT,
    on the path every event takes."""
    query = rows.query.chain(UpdateQuery)
    query.add_update_values(values)
    statement, params = query.get_compiler(rows.db).as_sql()
    db = connections[rows.db]
    returning = ", ".join(db.ops.quote_name(rows.model._meta.get_field(c).column) for c in columns)
    with db.cursor() as cursor:
        cursor.execute(f"{statement} RETURNING {returning}", params)
        return cursor.fetchone()


@dataclass(frozen=True)
class Expect:
    """What a run's row must still be for a write to apply: its status, and for an executor's
    writes the worker and attempt of its claim. Unlike any Q, writes of many runs under an
    Expect go in one statement (PostgreSQL)."""

    status: str
    worker: str | None = None
    attempt: int | None = None

    def q(self) -> Q:
        q = Q(status=self.status)
        if self.worker is not None:
            q &= Q(worker=self.worker, attempt=self.attempt)
        return q


@dataclass
class Append:
    """Events of one run to write together, and what they change on the run's row.

    `events` are (type, data, at); a terminal event (or `run.input_required`) may only come
    last. With `when`, nothing of this run is written unless its row matches (a conditional
    state transition). `steps` are the run's finished steps (key, attempt, data, usage, cost,
    at), written with the events. `holds_slot` is False for the end of a run that was waiting
    for input: it gave its key's active-run slot back when it started waiting."""

    run_id: UUID
    events: list[tuple[str, dict[str, Any], datetime]]
    fields: dict[str, Any] = field(default_factory=dict)
    when: Q | Expect | None = None
    steps: list[tuple] = field(default_factory=list)
    holds_slot: bool = True


_RETURNING = (
    "last_seq",
    "owner_id",
    "api_key_id",
    "tokens_reserved",
    "tokens_window",
    "input_tokens",
    "output_tokens",
)


def _update_one(append: Append) -> tuple | None:
    runs = Run.objects.filter(pk=append.run_id)
    when = append.when.q() if isinstance(append.when, Expect) else append.when
    if when is not None:
        runs = runs.filter(when)
    if append.events[-1][0] in TERMINAL_EVENTS:
        runs = runs.exclude(status__in=TERMINAL_STATUSES)  # a run ends once
    n = len(append.events)
    return _update_returning(runs, {"last_seq": F("last_seq") + n, **append.fields}, _RETURNING)


def _update_many(appends: list[Append]) -> dict[UUID, tuple]:
    """One UPDATE … FROM (VALUES …) RETURNING for runs whose writes share an Expect's status and
    worker and the same fields: the group commit's statement (PostgreSQL). Each row gets its own
    values and its own attempt check."""
    db = connections[Run.objects.db]
    first = appends[0]
    expect = first.when
    assert isinstance(expect, Expect)
    names = sorted(first.fields)
    fields = [Run._meta.get_field(name) for name in names]
    quote = db.ops.quote_name
    pk = Run._meta.pk
    columns = ["id", "n", "attempt", *(f.column for f in fields)]
    types = [pk.cast_db_type(db), "integer", "integer", *(f.cast_db_type(db) for f in fields)]
    row_sql = "(" + ", ".join(f"%s::{t}" for t in types) + ")"
    params: list[Any] = []
    for append in appends:
        params += [
            pk.get_db_prep_value(append.run_id, db),
            len(append.events),
            append.when.attempt,
        ]
        params += [f.get_db_prep_save(append.fields[f.name], db) for f in fields]
    sets = [
        "last_seq = r.last_seq + v.n",
        *(f"{quote(f.column)} = v.{quote(f.column)}" for f in fields),
    ]
    where = ["r.id = v.id", "r.status = %s"]
    tail: list[Any] = [expect.status]
    if expect.worker is not None:
        where += ["r.worker = %s", "r.attempt = v.attempt"]
        tail.append(expect.worker)
    returning = ", ".join(f"r.{quote(Run._meta.get_field(c).column)}" for c in _RETURNING)
    sql = (
        f"UPDATE {quote(Run._meta.db_table)} AS r SET {', '.join(sets)} "
        f"FROM (VALUES {', '.join([row_sql] * len(appends))}) "
        f"AS v({', '.join(quote(c) for c in columns)}) "
        f"WHERE {' AND '.join(where)} RETURNING r.id, {returning}"
    )
    with db.cursor() as cursor:
        cursor.execute(sql, params + tail)
        return {row[0]: row[1:] for row in cursor.fetchall()}


def _update_all(appends: list[Append]) -> dict[UUID, tuple | None]:
    """The row UPDATEs of a write: grouped into one statement per shape where the database can,
    one each otherwise. Returns each run's RETURNING row, or None where its condition failed."""
    found: dict[UUID, tuple | None] = {}
    groups: dict[tuple, list[Append]] = {}
    bulk = connections[Run.objects.db].vendor == "postgresql"
    for append in appends:
        if bulk and isinstance(append.when, Expect) and append.when.status in ACTIVE_STATUSES:
            key = (append.when.status, append.when.worker, tuple(sorted(append.fields)))
            groups.setdefault(key, []).append(append)
        else:
            found[append.run_id] = _update_one(append)
    for group in groups.values():
        rows = _update_many(group)
        for append in group:
            found[append.run_id] = rows.get(append.run_id)
    return found


def events_write(*, appends: list[Append]) -> dict[UUID, int | None]:
    """Append the events of many runs in one transaction: the group commit of an executor, and
    (with one run) every other state change.

    Per run, an UPDATE takes the run's row lock, bumps last_seq by its number of events and
    applies its fields (for an executor's runs, one statement for all of them), so concurrent
    writers are serialised and seq stays gapless; then every event goes in one INSERT. Events
    that hooks registered for also write what their hooks write (webhook messages, totals).
    Terminal events, and `run.input_required` (the run stops holding anything while it waits),
    give the keys' active-run slots back and settle the runs' token reservations to what they
    used, in the same transaction. Returns each run's new last seq, or None where its condition
    did not hold (nothing of that run was written).
    """
    written: dict[UUID, int | None] = {}
    rows: list[tuple[UUID, int, str, dict[str, Any], datetime]] = []
    wakeups: list[tuple[UUID, int | None, int, str, bool]] = []
    ended: list[tuple] = []
    waiting: list[UUID] = []
    hooked: list[tuple[UUID, str, int, datetime]] = []
    hooked_names = run_events.HOOKED_EVENTS
    released: dict[int, int] = {}
    steps: list[tuple] = []
    with transaction.atomic(savepoint=False):
        updated = _update_all(appends)
        for append in appends:
            row = updated[append.run_id]
            if row is None:
                written[append.run_id] = None
                continue
            last_seq, owner_id, key_id = row[0], row[1], row[2]
            written[append.run_id] = last_seq
            run = str(append.run_id)
            n = len(append.events)
            for i, (event, data, at) in enumerate(append.events):
                seq = last_seq - n + 1 + i
                data = {**data, "run_id": run, "seq": seq, "ts": iso(at)}
                rows.append((append.run_id, seq, event, data, at))
                if event in hooked_names:
                    hooked.append((append.run_id, event, seq, at))
            steps += [
                (
                    append.run_id,
                    key,
                    attempt,
                    data,
                    usage.input_tokens,
                    usage.output_tokens,
                    cost,
                    at,
                )
                for key, attempt, data, usage, cost, at in append.steps
            ]
            last_type = append.events[-1][0]
            feed = any(event in FEED_EVENTS for event, _, _ in append.events)
            wakeups.append((append.run_id, owner_id, last_seq, last_type, feed))
            gives_back = (last_type in TERMINAL_EVENTS and append.holds_slot) or (
                last_type == RUN_INPUT_REQUIRED
            )
            if last_type in TERMINAL_EVENTS or last_type == RUN_INPUT_REQUIRED:
                ended.append(row)
            if last_type == RUN_INPUT_REQUIRED:
                waiting.append(append.run_id)
            if gives_back and key_id is not None:
                released[key_id] = released.get(key_id, 0) + 1
        _rows_insert(RunEvent, _EVENT_COLUMNS, rows)
        _rows_insert(RunStep, _STEP_COLUMNS, steps)
        if waiting:
            # Settled below to what they used so far: that is now what they have reserved, so
            # their end settles only what they use after an answer.
            Run.objects.filter(pk__in=waiting).update(
                tokens_reserved=F("input_tokens") + F("output_tokens")
            )
        if hooked:
            written_hooks_call(events=hooked)
        for key_id in sorted(released):  # last, and in one order: they lock the keys' rows
            limits.active_runs_release(key_id=key_id, count=released[key_id])
        if wakeups:
            transaction.on_commit(lambda: wakeups_publish(wakeups))
        if ended:
            transaction.on_commit(lambda: _tokens_settle(ended))
    return written


_EVENT_COLUMNS = ("run", "seq", "type", "data", "created_at")
_STEP_COLUMNS = (
    "run",
    "key",
    "attempt",
    "data",
    "input_tokens",
    "output_tokens",
    "cost",
    "created_at",
)
_INSERT_BATCH = 1000  # rows per INSERT statement


def _rows_insert(model, columns: tuple[str, ...], rows: list[tuple]) -> None:
    """INSERT the events (or steps), a thousand rows a statement: the group commit writes
    hundreds at a time, where model instances and bulk_create cost more than the database does."""
    if not rows:
        return
    db = connections[model.objects.db]
    fields = [model._meta.get_field(name) for name in columns]
    names = ", ".join(db.ops.quote_name(f.column) for f in fields)
    prep = [partial(f.get_db_prep_save, connection=db) for f in fields]
    with db.cursor() as cursor:
        for start in range(0, len(rows), _INSERT_BATCH):
            batch = rows[start : start + _INSERT_BATCH]
            values = ", ".join(["(" + ", ".join(["%s"] * len(fields)) + ")"] * len(batch))
            params = [p(value) for row in batch for p, value in zip(prep, row, strict=True)]
            cursor.execute(
                f"INSERT INTO {db.ops.quote_name(model._meta.db_table)} ({names}) VALUES {values}",
                params,
            )


def event_append(
    *,
    run_id: UUID,
    event: str,
    data: dict[str, Any],
    when: Q | None = None,
    now: datetime | None = None,
    **fields: Any,
) -> int | None:
    """Append one event to a run and apply `fields` to it (events_write for one run); returns
    the new seq, or None when `when` did not hold."""
    now = now or timezone.now()
    return events_write(appends=[Append(run_id, [(event, data, now)], fields, when)])[run_id]


def _tokens_settle(ended: list[tuple]) -> None:
    """After terminal events (and waits) commit: settle the runs' token reservations to their
    real usage, summed per key and window (refunds) and per key (overspend), in one
    transaction."""
    refunds: dict[tuple[int, int], int] = {}
    overspent: dict[int, int] = {}
    for _, _, key_id, reserved, window, input_tokens, output_tokens in ended:
        if key_id is None or not reserved:
            continue
        delta = input_tokens + output_tokens - reserved
        if delta < 0:
            refunds[key_id, window] = refunds.get((key_id, window), 0) - delta
        elif delta > 0:
            overspent[key_id] = overspent.get(key_id, 0) + delta
    try:
        with transaction.atomic():
            for (key_id, window), refund in sorted(refunds.items()):
                limits.tokens_settle(key_id=key_id, window=window, reserved=refund, used=0)
            for key_id, extra in sorted(overspent.items()):
                limits.tokens_settle(key_id=key_id, window=0, reserved=0, used=extra)
    except Exception:  # the runs have ended whatever happens here; the windows expire
        logger.exception("token settlement failed")


_queue_depth: tuple[float, int] = (0.0, 0)


QUEUED_COUNT_SQL = f"SELECT count(*) FROM {Run._meta.db_table} WHERE status = 'queued'"


def queue_depth_cached() -> int | None:
    """This process's count of queued runs, or None when it is older than QUEUE_DEPTH_CACHE_S:
    no query, so async callers count (QUEUED_COUNT_SQL) on their own connections."""
    at, depth = _queue_depth
    return depth if time.monotonic() - at < settings.QUEUE_DEPTH_CACHE_S else None


def queue_depth_set(depth: int) -> None:
    global _queue_depth
    _queue_depth = (time.monotonic(), depth)


def queue_depth() -> int:
    """Queued runs, counted at most once per QUEUE_DEPTH_CACHE_S per process."""
    depth = queue_depth_cached()
    if depth is None:
        depth = Run.objects.filter(status=RunStatus.QUEUED).count()
        queue_depth_set(depth)
    return depth


def queue_check(*, adding: int = 1, depth: int | None = None) -> None:
    """Backpressure: 503 `queue_full` when `adding` more runs would pass QUEUE_MAX waiting.
    `depth` is the count the caller has (async callers must pass it); else queue_depth()."""
    if (queue_depth() if depth is None else depth) + adding > settings.QUEUE_MAX:
        rejection("queue_full")
        raise ApplicationError(
            "queue_full",
            f"{settings.QUEUE_MAX} runs are waiting; try again shortly.",
            headers={"Retry-After": str(settings.QUEUE_RETRY_AFTER_S)},
        )


def token_reservation(
    *, chain: Chain, run_input: Any, agents: tuple[Agent, ...] | None = None
) -> int:
    """What a run reserves of its key's token budget: its input and every agent's max_tokens (a
    code chain's own max_tokens). `agents` are the chain's (chain_agents), when the caller has
    them."""
    input_chars = len(json.dumps(run_input, separators=(",", ":"), ensure_ascii=False))
    agents = chain_agents(chain.pk) if agents is None else agents
    return math.ceil(input_chars / 4) + sum(a.max_tokens for a in agents) + chain.max_tokens


class Unset(enum.Enum):
    UNSET = 0


UNSET = Unset.UNSET  # "not given", where None means something


@dataclass(frozen=True)
class NewRun:
    """One run to create: what a create body, a batch item or a rerun says."""

    input: Any
    metadata: dict
    webhook: dict | None = None
    schedule_id: UUID | None = None  # the schedule whose tick starts it


def run_create(
    *,
    api_key: ApiKey,
    chain: Chain,
    run_input: Any,
    metadata: dict,
    webhook: dict | None = None,
    idempotency: IdempotencyRecord | None = None,
    rerun_of: Run | None = None,
    schedule_id: UUID | None = None,
) -> Run:
    """Admit and queue a run: limits first, then the run, its first event and the idempotency
    record in one transaction; the task is enqueued after commit."""
    chain_validate_input(chain=chain, data=run_input)
    (run,) = _runs_admit_and_create(
        api_key=api_key,
        chain=chain,
        new=[NewRun(run_input, metadata, webhook, schedule_id)],
        idempotency=idempotency,
        rerun_of=rerun_of,
    )
    return run


def run_rerun(
    *,
    api_key: ApiKey,
    run: Run,
    run_input: Any = None,
    metadata: dict | None = None,
    webhook: dict | Unset | None = UNSET,
    idempotency: IdempotencyRecord | None = None,
) -> Run:
    """A new run of the same chain version with the run's input, metadata and webhook (each
    replaced when given; `webhook=None` drops it), recorded as a rerun of it."""
    if webhook is UNSET:
        webhook = (
            {"url": run.webhook_url, "secret": run.webhook_secret, "events": run.webhook_events}
            if run.webhook_url
            else None
        )
    return run_create(
        api_key=api_key,
        chain=run.chain,
        run_input=run.input if run_input is None else run_input,
        metadata=run.metadata if metadata is None else metadata,
        webhook=webhook,
        idempotency=idempotency,
        rerun_of=run,
    )


def run_create_batch(
    *,
    api_key: ApiKey,
    chain: Chain,
    items: list[NewRun],
    idempotency: IdempotencyRecord | None = None,
    answer: Callable[[list[Run]], dict] | None = None,
) -> list[Run]:
    """Create every run or none: each item's input is checked first (a 400 names the item:
    `items[3].input.topic`), the limits count every run, and all of them are written in one
    transaction. With `idempotency`, `answer(runs)` is stored as the replayed answer in that
    same transaction, so a retry after a crash between commit and answer makes no second batch."""
    errors: list[dict] = []
    for i, item in enumerate(items):
        try:
            chain_validate_input(chain=chain, data=item.input)
        except ApplicationError as e:
            errors += [{**err, "field": f"items[{i}].{err['field']}"} for err in e.extra["errors"]]
    if errors:
        raise ApplicationError(
            "validation_error",
            f"Some items do not match the input schema of {chain.name}; no run was created.",
            errors=errors,
        )
    return _runs_admit_and_create(
        api_key=api_key, chain=chain, new=items, idempotency=idempotency, answer=answer
    )


def _runs_admit_and_create(
    *,
    api_key: ApiKey,
    chain: Chain,
    new: list[NewRun],
    idempotency: IdempotencyRecord | None = None,
    rerun_of: Run | None = None,
    answer: Callable[[list[Run]], dict] | None = None,
) -> list[Run]:
    """Admit and write the runs: the queue bound, the key's runs-per-minute (Redis), then its
    token budget, its active-run slots, the runs, their first events and the idempotency record,
    all or nothing (on PostgreSQL one statement, elsewhere one transaction). Executors are woken
    on commit."""
    queue_check(adding=len(new))
    limits.runs_admit(key=api_key, count=len(new))
    starts = runs_build(
        api_key=api_key,
        chain=chain,
        new=new,
        idempotency=idempotency,
        rerun_of=rerun_of,
        answer=answer,
    )
    if connection.vendor == "postgresql":
        sql, params = runs_statement(starts)
        connection.ensure_connection()
        with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
            cursor.execute(sql, params)
            used, written = cursor.fetchone()
        if written != len(starts.runs):
            runs_refused(starts, used)
    else:
        _runs_write(starts)
    wakeups = runs_wakeups(starts)
    transaction.on_commit(lambda: wakeups_publish(wakeups))
    return starts.runs


@dataclass
class Starts:
    """Runs about to start, built before any write: what every writer needs."""

    key: ApiKey
    runs: list[Run]
    events: list[RunEvent]
    window: int
    tokens: int
    what: str  # the request, as answers name it ("This run", "This batch of 20 runs")
    idempotency: IdempotencyRecord | None
    record: dict[str, Any]  # the idempotency record's fields to set with them


def runs_build(
    *,
    api_key: ApiKey,
    chain: Chain,
    new: list[NewRun],
    idempotency: IdempotencyRecord | None = None,
    rerun_of: Run | None = None,
    answer: Callable[[list[Run]], dict] | None = None,
    agents: tuple[Agent, ...] | None = None,
) -> Starts:
    """The runs and their first events, in memory (422 `run_too_large` first): no query when
    the caller passes the chain's `agents` (chain_agents)."""
    n = len(new)
    agents = chain_agents(chain.pk) if agents is None else agents
    reserved = [token_reservation(chain=chain, run_input=item.input, agents=agents) for item in new]
    what = "This run" if n == 1 else f"This batch of {n} runs"
    limits.tokens_fit(key=api_key, amount=sum(reserved), what=what)
    window = limits.token_window()
    agents_total = len(agents)
    trace_parent = tracing.traceparent()
    now = timezone.now()
    runs = []
    for item, tokens in zip(new, reserved, strict=True):
        webhook = item.webhook or {}
        runs.append(
            Run(
                owner_id=api_key.owner_id,
                api_key=api_key,
                chain=chain,
                input=item.input,
                metadata=item.metadata,
                agents_total=agents_total,
                last_seq=1,
                tokens_reserved=tokens,
                tokens_window=window,
                webhook_url=webhook.get("url", ""),
                webhook_secret=webhook.get("secret", ""),
                webhook_events=webhook.get("events", []),
                rerun_of=rerun_of,
                schedule_id=item.schedule_id,
                trace_parent=trace_parent,
                created_at=now,
            )
        )
    events = [
        RunEvent(
            run=run,
            seq=1,
            type=RUN_QUEUED,
            created_at=now,
            data={
                "chain": chain.name,
                "version": chain.version,
                "run_id": str(run.id),
                "seq": 1,
                "ts": iso(now),
            },
        )
        for run in runs
    ]
    record: dict[str, Any] = {}
    if idempotency is not None:
        # A batch has no one run: its answer is kept now, so a retry after a crash between
        # commit and answer makes no second batch.
        record = (
            {"response_status": 202, "response_body": answer(runs)}
            if answer is not None
            else {"run": runs[0]}
        )
    return Starts(api_key, runs, events, window, sum(reserved), what, idempotency, record)


def runs_wakeups(starts: Starts) -> list:
    # Executors claim them from the database; the wake-up only makes one look now.
    return [(r.id, r.owner_id, 1, RUN_QUEUED, True) for r in starts.runs]


def _runs_write(starts: Starts) -> None:
    """The runs in one transaction, step by step (SQLite, the embedded default)."""
    key, tokens = starts.key, starts.tokens
    window = limits.tokens_reserve(key=key, amount=tokens, what=starts.what)
    for run in starts.runs:
        run.tokens_window = window
    try:
        with transaction.atomic():
            Run.objects.bulk_create(starts.runs)
            RunEvent.objects.bulk_create(starts.events)
            if starts.idempotency is not None:
                IdempotencyRecord.objects.filter(pk=starts.idempotency.pk).update(**starts.record)
            limits.active_runs_take(key=key, count=len(starts.runs))  # last: locks the key's row
    except BaseException:
        limits.tokens_settle(key_id=key.pk, window=window, reserved=tokens, used=0)
        raise


def _values(fields: list, rows: int) -> str:
    """`(VALUES (...), ...) AS v(columns)`, each value cast to its column's type (a VALUES list
    does not take its types from the table)."""
    qn = connection.ops.quote_name
    row = "(" + ", ".join(f"%s::{f.cast_db_type(connection)}" for f in fields) + ")"
    return f"(VALUES {', '.join([row] * rows)}) AS v({', '.join(qn(f.column) for f in fields)})"


_RUN_FIELDS = list(Run._meta.concrete_fields)
_EVENT_FIELDS = [f for f in RunEvent._meta.concrete_fields if not f.primary_key]


@lru_cache(maxsize=64)
def _runs_write_sql(n: int, record_fields: tuple[str, ...]) -> str:
    """The statement for `n` runs (and the idempotency record's fields to set), built once."""
    qn = connection.ops.quote_name
    tokens_table = qn(TokenWindow._meta.db_table)
    record_sql = "SELECT 1"
    if record_fields:
        fields = [IdempotencyRecord._meta.get_field(name) for name in record_fields]
        sets = ", ".join(f"{qn(f.column)} = %s::{f.cast_db_type(connection)}" for f in fields)
        record_sql = (
            f"UPDATE {qn(IdempotencyRecord._meta.db_table)} SET {sets} "
            "WHERE id = %s AND EXISTS (SELECT 1 FROM new)"
        )
    return f"""
    WITH tok AS (
        INSERT INTO {tokens_table} (api_key_id, "window", used) VALUES (%s, %s, %s)
        ON CONFLICT (api_key_id, "window") DO UPDATE
            SET used = {tokens_table}.used + EXCLUDED.used
            WHERE {tokens_table}.used + EXCLUDED.used <= %s
        RETURNING used
    ), slot AS (
        UPDATE {qn(ApiKey._meta.db_table)} SET active_runs = active_runs + %s
        WHERE id = %s AND active_runs <= %s AND EXISTS (SELECT 1 FROM tok)
        RETURNING active_runs
    ), new AS (
        INSERT INTO {qn(Run._meta.db_table)} ({", ".join(qn(f.column) for f in _RUN_FIELDS)})
        SELECT * FROM {_values(_RUN_FIELDS, n)} WHERE EXISTS (SELECT 1 FROM slot)
        RETURNING id
    ), ev AS (
        INSERT INTO {qn(RunEvent._meta.db_table)} ({", ".join(qn(f.column) for f in _EVENT_FIELDS)})
        SELECT * FROM {_values(_EVENT_FIELDS, n)} WHERE EXISTS (SELECT 1 FROM new)
    ), record AS ({record_sql})
    SELECT (SELECT used FROM tok), (SELECT count(*) FROM new)
    """


def runs_statement(starts: Starts, db=connection) -> tuple[str, list]:
    """PostgreSQL: the start as one statement, one round trip; it returns (tokens used, runs
    written). Each step runs only if the one before it did: the token reservation (its window's
    row upserted), the key's active-run slots (the conditional UPDATE waits for a concurrent
    start and re-checks, so the limit holds exactly), the runs, their events, the idempotency
    record. Bound on the server: the values travel apart from the text."""
    key, n = starts.key, len(starts.runs)
    q = limits.quotas(key)
    params = [key.pk, starts.window, starts.tokens, q.tokens, n, key.pk, q.active_runs - n]
    params += [
        f.get_db_prep_save(getattr(run, f.attname), db) for run in starts.runs for f in _RUN_FIELDS
    ]
    params += [
        f.get_db_prep_save(getattr(e, f.attname), db) for e in starts.events for f in _EVENT_FIELDS
    ]
    if starts.record:
        fields = [IdempotencyRecord._meta.get_field(name) for name in starts.record]
        params += [
            f.get_db_prep_save(value.pk if f.is_relation else value, db)
            for f, value in zip(fields, starts.record.values(), strict=True)
        ] + [starts.idempotency.pk]
    return _runs_write_sql(n, tuple(starts.record)), params


def runs_refused(starts: Starts, used: int | None) -> None:
    """The statement wrote nothing: 429 for the token budget or the active runs. The one
    partial outcome, tokens reserved and no slot free, is refunded first."""
    key, window = starts.key, starts.window
    if used is None:
        used = (
            TokenWindow.objects.filter(api_key_id=key.pk, window=window)
            .values_list("used", flat=True)
            .first()
        )
        raise limits.tokens_refused(
            key=key, amount=starts.tokens, what=starts.what, used=used or 0, window=window
        )
    limits.tokens_settle(key_id=key.pk, window=window, reserved=starts.tokens, used=0)
    active = ApiKey.objects.values_list("active_runs", flat=True).get(pk=key.pk)
    raise limits.active_runs_refused(key=key, active=active, count=len(starts.runs))


def run_cancel(*, run: Run, reason: str) -> Run:
    """Cancel a queued run, or one waiting for input, at once; ask a running one to stop.
    Returns the run, reloaded.

    Each is a conditional write on the status; a run that moved between them (started, or
    stopped to wait) is tried again on its new status."""
    for _ in range(3):
        now = timezone.now()
        fields = {
            "status": RunStatus.CANCELLED,
            "finished_at": now,
            "cancel_requested_at": now,
            "cancel_reason": reason,
        }
        event = [(RUN_CANCELLED, {"reason": reason}, now)]
        queued = Append(run.id, event, fields, Q(status=RunStatus.QUEUED))
        waiting = Append(
            run.id,
            event,
            {**fields, "current_agent": "", "input_request": None, "input_expires_at": None},
            Q(status=RunStatus.INPUT_REQUIRED),
            holds_slot=False,
        )
        if any(events_write(appends=[append])[run.id] is not None for append in (queued, waiting)):
            break
        if Run.objects.filter(
            pk=run.id, status=RunStatus.RUNNING, cancel_requested_at__isnull=True
        ).update(cancel_requested_at=now, cancel_reason=reason):
            transaction.on_commit(executors_wake_for_cancel)
            break
        status = Run.objects.values_list("status", flat=True).get(pk=run.id)
        if status not in (RunStatus.QUEUED, RunStatus.INPUT_REQUIRED):
            break  # running and already asked to stop, or ended
    run.refresh_from_db()
    if run.status in TERMINAL_STATUSES and run.status != RunStatus.CANCELLED:
        raise ApplicationError(
            "run_not_cancellable", f"The run has already {run.status}.", run_id=str(run.id)
        )
    return run


def run_webhook_set(*, run: Run, webhook: dict | None) -> bool:
    """Give a run that has not ended its webhook (url, secret, events; None: none), the one its
    terminal event's message goes to. False when the run has ended: the UPDATE waits for a
    terminal event being written and then finds the run ended, so a webhook set is never
    missed by the end it was set before."""
    webhook = webhook or {}
    return bool(
        Run.objects.filter(pk=run.id, status__in=ACTIVE_STATUSES).update(
            webhook_url=webhook.get("url", ""),
            webhook_secret=webhook.get("secret", ""),
            webhook_events=webhook.get("events", []),
        )
    )


def run_wait(*, run_id: UUID, timeout_s: float) -> Run:
    """Poll until the run is terminal or waits for a person, or the time is up; returns the
    run as last read."""
    deadline = time.monotonic() + timeout_s
    interval = 0.05
    while True:
        run = Run.objects.select_related("chain").get(pk=run_id)
        run_seen(run_id=run.id, status=run.status, last_seen_at=run.last_seen_at)
        remaining = deadline - time.monotonic()
        if run.is_terminal or run.is_waiting or remaining <= 0:
            return run
        time.sleep(min(interval, remaining))
        interval = min(interval * 1.5, 0.5)
