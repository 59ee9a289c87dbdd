"""Writes on runs: create, cancel, and the event log every state change goes through."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any
from uuid import UUID

from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone
from django_q.tasks import async_task

from agentsvc.errors import ApplicationError
from agentsvc.models import ApiKey
from runs.chains import chain_validate_input
from runs.models import TERMINAL_STATUSES, Chain, Run, RunEvent, RunStatus
from runs.timefmt import iso
from runs.wakeup import wakeup_publish


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
        if not runs.update(last_seq=F("last_seq") + 1, **fields):
            return None
        seq, owner_id = Run.objects.filter(pk=run_id).values_list("last_seq", "owner_id").get()
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
    return seq


def _enqueue(run_id: UUID) -> None:
    async_task("runs.tasks.run_execute", str(run_id), task_name=f"run-{run_id}", save=False)


def run_create(
    *, api_key: ApiKey, chain: Chain, run_input: Any, metadata: dict, webhook: dict | None = None
) -> Run:
    chain_validate_input(chain=chain, data=run_input)
    agents_total = chain.agents.count()
    with transaction.atomic():
        run = Run.objects.create(
            owner_id=api_key.owner_id,
            api_key=api_key,
            chain=chain,
            input=run_input,
            metadata=metadata,
            agents_total=agents_total,
            last_seq=1,
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
        transaction.on_commit(lambda: _enqueue(run.id))
        transaction.on_commit(
            lambda: wakeup_publish(run_id=run.id, owner_id=run.owner_id, seq=1, event="run.queued")
        )
    return run


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
        remaining = deadline - time.monotonic()
        if run.is_terminal or remaining <= 0:
            return run
        time.sleep(min(interval, remaining))
        interval = min(interval * 1.5, 0.5)
