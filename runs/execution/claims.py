"""What an executor process writes besides events: its claims on queued runs, its heartbeat,
and the hand-back of its runs when it stops. The database decides who runs what."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

from django.db import connection, transaction
from django.utils import timezone

from runs.events import RUN_QUEUED, RUN_STARTED
from runs.models import Agent, ChainKind, Executor, Run, RunStatus, RunStep
from runs.selectors import chain_agents
from runs.services import Append, Expect, events_write

CANDIDATES_PER_SLOT = 2  # queued runs looked at per free slot (others may be locked by peers)


@dataclass(frozen=True)
class Claimed:
    """A run this executor now holds: `attempt` is part of its claim (a retry is another)."""

    run_id: UUID
    attempt: int
    chain: str
    version: int
    agents: tuple[Agent, ...]
    input: Any
    timeout_s: int
    started_at: datetime
    seq: int  # the run's last event once claimed (its run.started)
    output_schema: dict | None = None  # the chain's: its last agent answers JSON
    # A code chain's kind and entrypoint, and the provider and model its agents default to.
    kind: str = ChainKind.AGENTS
    entrypoint: str = ""
    provider: str = ""
    model: str = ""
    # What earlier executions of the run finished (key -> result), and their usage: a resumed
    # run does none of them again. `resumed`: an earlier execution had started the run.
    steps: dict[str, Any] = field(default_factory=dict)
    resumed: bool = False
    input_tokens: int = 0
    output_tokens: int = 0
    cost: Decimal = Decimal(0)
    # For the run's log lines and its trace: its key's display prefix, and the traceparent of
    # the request that created it ("" when unknown).
    key_prefix: str = ""
    trace_parent: str = ""
    input_timeout_s: int = 86400  # the chain's: how long the run may wait for a person


def claim_condition(*, worker: str, attempt: int) -> Expect:
    """Still running, still held by this executor, and the same execution."""
    return Expect(RunStatus.RUNNING, worker, attempt)


def _fair_candidates(limit: int) -> list[UUID]:
    """The oldest queued run of every key first, then every key's second, and so on: one key's
    backlog delays another key's first run by at most one claim round."""
    run = Run._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            SELECT id FROM (
                SELECT id, created_at, ROW_NUMBER() OVER (
                    PARTITION BY api_key_id ORDER BY created_at, id
                ) AS turn
                FROM {run} WHERE status = %s
            ) AS queued
            ORDER BY turn, created_at, id
            LIMIT %s
            """,
            [RunStatus.QUEUED.value, limit],
        )
        field = Run._meta.pk
        return [field.to_python(row[0]) for row in cursor.fetchall()]


def runs_claim(
    *, worker: str, limit: int, run_id: UUID | None = None, now: datetime | None = None
) -> tuple[list[Claimed], bool]:
    """Claim up to `limit` queued runs (or the one run `run_id`) for `worker`.

    Each claim is the `queued` -> `running` transition with its `run.started` event, written
    for all claimed runs in one transaction. Rows another executor is claiming are skipped, not
    waited for. Returns the claims, and whether queued runs were skipped or left over (so the
    caller claims again soon instead of at its next poll)."""
    now = now or timezone.now()
    ids = [run_id] if run_id else _fair_candidates(limit * CANDIDATES_PER_SLOT)
    if not ids:
        return [], False
    with transaction.atomic():
        rows = list(
            Run.objects.select_for_update(skip_locked=True, of=("self",))
            .filter(pk__in=ids, status=RunStatus.QUEUED)
            .order_by()
            .values_list(
                "id",
                "attempt",
                "chain_id",
                "input",
                "chain__timeout_s",
                "chain__name",
                "chain__version",
                "chain__output_schema",
                "api_key__prefix",
                "trace_parent",
                "started_at",
                "chain__kind",
                "chain__entrypoint",
                "chain__provider",
                "chain__model",
                "chain__input_timeout_s",
            )[:limit]
        )
        if not rows:
            return [], len(ids) > 0 and run_id is None
        order = {run: i for i, run in enumerate(ids)}
        rows.sort(key=lambda r: order[r[0]])
        appends = [
            Append(
                run,
                [(RUN_STARTED, {"agents_total": len(chain_agents(chain_id))}, now)],
                {
                    "status": RunStatus.RUNNING,
                    "worker": worker,
                    "started_at": now,
                    "heartbeat_at": now,
                    "deadline_at": now + timedelta(seconds=timeout_s),
                },
                Expect(RunStatus.QUEUED),
            )
            for run, _, chain_id, _, timeout_s, *_ in rows
        ]
        written = events_write(appends=appends)
    # After the claim's commit, in a statement of its own: a transaction that holds the runs'
    # rows while it reads another table can deadlock with a TRUNCATE (and the steps of a run
    # are written only under its claim, which is now this one).
    done = _steps_done([row[0] for row in rows if row[10] is not None and written[row[0]]])
    claimed = [
        Claimed(
            run_id=run,
            attempt=attempt,
            chain=name,
            version=version,
            agents=chain_agents(chain_id),
            input=run_input,
            timeout_s=timeout_s,
            started_at=now,
            seq=written[run],
            output_schema=schema,
            key_prefix=prefix or "",
            trace_parent=parent,
            kind=kind,
            entrypoint=entrypoint,
            provider=provider,
            model=model,
            input_timeout_s=input_timeout_s,
            resumed=before is not None,
            **done.get(run, {}),
        )
        for (
            run,
            attempt,
            chain_id,
            run_input,
            timeout_s,
            name,
            version,
            schema,
            prefix,
            parent,
            before,
            kind,
            entrypoint,
            provider,
            model,
            input_timeout_s,
        ) in rows
        if written[run] is not None
    ]
    return claimed, len(ids) > len(rows)


def _steps_done(run_ids: list[UUID]) -> dict[UUID, dict[str, Any]]:
    """The finished steps of runs an earlier execution had started, and their usage summed."""
    done: dict[UUID, dict[str, Any]] = {}
    if not run_ids:
        return done
    rows = RunStep.objects.filter(run_id__in=run_ids).values_list(
        "run_id", "key", "data", "input_tokens", "output_tokens", "cost"
    )
    for run_id, key, data, input_tokens, output_tokens, cost in rows:
        run = done.setdefault(
            run_id, {"steps": {}, "input_tokens": 0, "output_tokens": 0, "cost": Decimal(0)}
        )
        run["steps"][key] = data
        run["input_tokens"] += input_tokens
        run["output_tokens"] += output_tokens
        run["cost"] += cost
    return done


def runs_last_seq(*, run_ids: list[UUID]) -> dict[UUID, int]:
    """Where the event logs of these runs stand (after a commit whose outcome is unknown)."""
    return dict(Run.objects.filter(pk__in=run_ids).values_list("id", "last_seq"))


def runs_cancel_requested(*, worker: str) -> list[tuple[UUID, int, str]]:
    """Runs of this executor that someone asked to stop: (run, attempt, reason)."""
    return list(
        Run.objects.filter(
            worker=worker, status=RunStatus.RUNNING, cancel_requested_at__isnull=False
        ).values_list("id", "attempt", "cancel_reason")
    )


def executor_heartbeat(
    *,
    worker: str,
    run_ids: list[UUID],
    host: str,
    pid: int,
    capacity: int,
    in_flight: int,
    draining: bool,
    process: bool = True,
) -> None:
    """One beat for every run the executor holds (one UPDATE for all of them), and with
    `process` for the executor itself (readiness and the dashboard see it alive). Only the
    runs it is executing: a run it lost track of must look lost to the keeper."""
    now = timezone.now()
    with transaction.atomic():
        if run_ids:
            Run.objects.filter(pk__in=run_ids, worker=worker, status=RunStatus.RUNNING).update(
                heartbeat_at=now
            )
        if not process:
            return
        state = {
            "heartbeat_at": now,
            "capacity": capacity,
            "in_flight": in_flight,
            "draining": draining,
        }
        if not Executor.objects.filter(pk=worker).update(**state):
            Executor.objects.create(id=worker, host=host, pid=pid, started_at=now, **state)


def executor_remove(*, worker: str) -> None:
    Executor.objects.filter(pk=worker).delete()


def hand_back(*, run_id: UUID, worker: str, attempt: int, chain: str, version: int) -> Append:
    """The write that gives a run back to the queue when its executor stops (SIGTERM): another
    executor starts it again at once, at its first step not finished."""
    now = timezone.now()
    return Append(
        run_id,
        [(RUN_QUEUED, {"chain": chain, "version": version, "reason": "worker_shutdown"}, now)],
        {
            "status": RunStatus.QUEUED,
            "worker": "",
            "current_agent": "",
            "deadline_at": None,
            "heartbeat_at": now,
        },
        claim_condition(worker=worker, attempt=attempt),
    )
