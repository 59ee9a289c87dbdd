"""Writes on runs: create, cancel, and the event log every state change goes through."""

from __future__ import annotations

import json
import logging
import math
import time
from datetime import datetime
from typing import Any
from uuid import UUID

from django.db import connections, transaction
from django.db.models import F, Q, QuerySet
from django.db.models.sql import UpdateQuery
from django.utils import timezone

from agentsvc import limits
from agentsvc.broker import enqueue
from agentsvc.errors import ApplicationError
from agentsvc.models import ApiKey, IdempotencyRecord
from runs.chains import chain_validate_input
from runs.models import (
    ACTIVE_STATUSES,
    TERMINAL_EVENTS,
    TERMINAL_STATUSES,
    Chain,
    Run,
    RunEvent,
    RunStatus,
)
from runs.seen import run_seen
from runs.selectors import chain_agents
from runs.timefmt import iso
from runs.wakeup import wakeup_publish
from webhooks.services import messages_create_for_event

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


def event_append(
    *,
    run_id: UUID,
    event: str,
    data: dict[str, Any],
    when: Q | None = None,
    now: datetime | None = None,
    **fields: Any,
) -> int | None:
    """Append the next event of a run and apply `fields` to it, in one transaction.

    The UPDATE takes the run's row lock and bumps last_seq, so concurrent appenders are
    serialised and seq stays gapless. With `when`, nothing happens unless the run matches it
    (a conditional state transition); returns the new seq, or None.
    """
    now = now or timezone.now()
    with transaction.atomic():
        runs = Run.objects.filter(pk=run_id)
        if when is not None:
            runs = runs.filter(when)
        if event in TERMINAL_EVENTS:
            runs = runs.filter(status__in=ACTIVE_STATUSES)  # a run ends once
        row = _update_returning(
            runs, {"last_seq": F("last_seq") + 1, **fields}, ("last_seq", "owner_id", "api_key_id")
        )
        if row is None:
            return None
        seq, owner_id, key_id = row
        RunEvent.objects.create(
            run_id=run_id,
            seq=seq,
            type=event,
            created_at=now,
            data={**data, "run_id": str(run_id), "seq": seq, "ts": iso(now)},
        )
        transaction.on_commit(
            lambda: wakeup_publish(run_id=run_id, owner_id=owner_id, seq=seq, event=event)
        )
        if event in TERMINAL_EVENTS:
            # Webhook messages are written with the terminal event, delivered on commit.
            messages_create_for_event(run_id=run_id, event=event, seq=seq, now=now)
            transaction.on_commit(lambda: run_ended(run_id=run_id))
            if key_id is not None:
                limits.active_runs_release(key_id=key_id)  # last: it locks the key's row
    return seq


def _enqueue(run_id: UUID) -> None:
    """Hand a committed run to the queue. The run is accepted whatever happens here, so a
    broker failure is logged, not raised: raised, it would turn the 202 into a 503 and the
    caller would start the run again. The keeper enqueues a run left queued again after
    QUEUED_REENQUEUE_AFTER_S."""
    try:
        enqueue("runs.tasks.run_execute", str(run_id), task_name=f"run-{run_id}")
    except Exception as e:
        logger.warning("run %s: not enqueued (%s); the keeper will enqueue it again", run_id, e)


def token_reservation(*, chain: Chain, run_input: Any) -> int:
    """What a run reserves of its key's token budget: its input and every agent's max_tokens."""
    input_chars = len(json.dumps(run_input, separators=(",", ":"), ensure_ascii=False))
    return math.ceil(input_chars / 4) + sum(a.max_tokens for a in chain_agents(chain.pk))


def run_create(
    *,
    api_key: ApiKey,
    chain: Chain,
    run_input: Any,
    metadata: dict,
    webhook: dict | None = None,
    idempotency: IdempotencyRecord | None = None,
) -> Run:
    """Admit and queue a run: limits first, then the run, its first event and the idempotency
    record in one transaction; the task is enqueued after commit."""
    chain_validate_input(chain=chain, data=run_input)
    limits.queue_check()
    limits.runs_admit(key=api_key)
    reserved = token_reservation(chain=chain, run_input=run_input)
    window = limits.tokens_reserve(key=api_key, amount=reserved)
    try:
        with transaction.atomic():
            run = Run.objects.create(
                owner_id=api_key.owner_id,
                api_key=api_key,
                chain=chain,
                input=run_input,
                metadata=metadata,
                agents_total=len(chain_agents(chain.pk)),
                last_seq=1,
                tokens_reserved=reserved,
                tokens_window=window,
                webhook_url=(webhook or {}).get("url", ""),
                webhook_secret=(webhook or {}).get("secret", ""),
                webhook_events=(webhook or {}).get("events", []),
            )
            RunEvent.objects.create(
                run=run,
                seq=1,
                type="run.queued",
                created_at=run.created_at,
                data={
                    "chain": chain.name,
                    "version": chain.version,
                    "run_id": str(run.id),
                    "seq": 1,
                    "ts": iso(run.created_at),
                },
            )
            if idempotency is not None:
                IdempotencyRecord.objects.filter(pk=idempotency.pk).update(run=run)
            limits.active_runs_take(key=api_key)  # last: it locks the key's row until commit
            transaction.on_commit(lambda: _enqueue(run.id))
            transaction.on_commit(
                lambda: wakeup_publish(
                    run_id=run.id, owner_id=run.owner_id, seq=1, event="run.queued"
                )
            )
    except BaseException:
        limits.tokens_settle(key_id=api_key.pk, window=window, reserved=reserved, used=0)
        raise
    return run


def run_ended(*, run_id: UUID) -> None:
    """After a run's terminal event commits: settle its token reservation to real usage."""
    run = (
        Run.objects.filter(pk=run_id)
        .values("api_key_id", "tokens_window", "tokens_reserved", "input_tokens", "output_tokens")
        .first()
    )
    if run and run["api_key_id"] and run["tokens_reserved"]:
        limits.tokens_settle(
            key_id=run["api_key_id"],
            window=run["tokens_window"],
            reserved=run["tokens_reserved"],
            used=run["input_tokens"] + run["output_tokens"],
        )


def run_cancel(*, run: Run, reason: str) -> Run:
    """Cancel a queued run at once; ask a running one to stop. Returns the run, reloaded."""
    now = timezone.now()
    cancelled = event_append(
        run_id=run.id,
        event="run.cancelled",
        data={"reason": reason},
        now=now,
        when=Q(status=RunStatus.QUEUED),
        status=RunStatus.CANCELLED,
        finished_at=now,
        cancel_requested_at=now,
        cancel_reason=reason,
    )
    if not cancelled:
        Run.objects.filter(
            pk=run.id, status=RunStatus.RUNNING, cancel_requested_at__isnull=True
        ).update(cancel_requested_at=now, cancel_reason=reason)
    run.refresh_from_db()
    if run.status in TERMINAL_STATUSES and run.status != RunStatus.CANCELLED:
        raise ApplicationError(
            "run_not_cancellable", f"The run has already {run.status}.", run_id=str(run.id)
        )
    return run


def run_wait(*, run_id: UUID, timeout_s: float) -> Run:
    """Poll until the run is terminal or the time is up; returns the run as last read."""
    deadline = time.monotonic() + timeout_s
    interval = 0.05
    while True:
        run = Run.objects.select_related("chain").get(pk=run_id)
        run_seen(run_id=run.id, status=run.status, last_seen_at=run.last_seen_at)
        remaining = deadline - time.monotonic()
        if run.is_terminal or remaining <= 0:
            return run
        time.sleep(min(interval, remaining))
        interval = min(interval * 1.5, 0.5)
