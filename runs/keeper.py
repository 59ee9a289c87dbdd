"""The lifecycle keeper: ends or retries the runs nobody else will, and deletes old ones.

Every fix is one conditional write (event_append's `when`, or a filtered UPDATE) on the state
the keeper read, so any number of keepers may run at once: the second finds the condition no
longer true and does nothing. State changes go through event_append, so readers, webhooks and
token settlement see a keeper's decision exactly as they see a worker's.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from uuid import UUID

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from runs.events import RUN_TIMED_OUT, owners_watched
from runs.models import ACTIVE_STATUSES, TERMINAL_STATUSES, Chain, Executor, Run, RunStatus
from runs.services import Append, event_append, events_write, run_cancel

logger = logging.getLogger(__name__)

BATCH = 200  # runs looked at per check and pass; the next pass (a minute later) takes the rest
DELETE_BATCH = 500
DELETE_BATCHES_PER_PASS = 20
MAX_ATTEMPTS = 2  # the first execution and one retry after a lost worker


def _seconds_ago(now: datetime, seconds: float) -> datetime:
    return now - timedelta(seconds=seconds)


# The look-ups below read one table per statement (no joins): a statement holding a lock on one
# table while waiting for another could deadlock with a TRUNCATE or a migration.


def _chain_timeouts(chain_ids: set[int]) -> dict[int, int]:
    return dict(Chain.objects.filter(pk__in=chain_ids).values_list("pk", "timeout_s"))


def runs_time_out(*, now: datetime | None = None) -> int:
    """End runs still running RUN_GRACE_S past their deadline (their worker missed it)."""
    now = now or timezone.now()
    cutoff = _seconds_ago(now, settings.RUN_GRACE_S)
    rows = list(
        Run.objects.filter(status=RunStatus.RUNNING, deadline_at__lt=cutoff).values_list(
            "id", "worker", "chain_id"
        )[:BATCH]
    )
    timeouts = _chain_timeouts({chain_id for _, _, chain_id in rows})
    ended = 0
    for run_id, worker, chain_id in rows:
        timeout_s = timeouts[chain_id]
        seq = event_append(
            run_id=run_id,
            event="run.timed_out",
            data={"timeout_s": timeout_s},
            now=now,
            when=Q(status=RunStatus.RUNNING, worker=worker, deadline_at__lt=cutoff),
            status=RunStatus.TIMED_OUT,
            finished_at=now,
            current_agent="",
            error_code="chain_timed_out",
            error_message=f"The run exceeded {timeout_s} s.",
        )
        ended += seq is not None
    return ended


def runs_expire_inputs(*, now: datetime | None = None) -> int:
    """End runs whose request for input nobody answered in time (their chain's input_timeout_s):
    timed_out, reason input_timeout. A waiting run holds no slot: its end gives none back."""
    now = now or timezone.now()
    rows = list(
        Run.objects.filter(status=RunStatus.INPUT_REQUIRED, input_expires_at__lt=now)
        .order_by("input_expires_at")
        .values_list("id", "input_request")[:BATCH]
    )
    ended = 0
    for run_id, request in rows:
        asked, expired = (
            datetime.fromisoformat(request[name]) for name in ("requested_at", "expires_at")
        )
        timeout_s = round((expired - asked).total_seconds())
        message = f"Nobody answered the run's request for input within {timeout_s} s."
        written = events_write(
            appends=[
                Append(
                    run_id,
                    [(RUN_TIMED_OUT, {"timeout_s": timeout_s, "reason": "input_timeout"}, now)],
                    {
                        "status": RunStatus.TIMED_OUT,
                        "finished_at": now,
                        "current_agent": "",
                        "input_request": None,
                        "input_expires_at": None,
                        "error_code": "input_timeout",
                        "error_message": message,
                    },
                    Q(status=RunStatus.INPUT_REQUIRED, input_expires_at__lt=now),
                    holds_slot=False,
                )
            ]
        )
        ended += written[run_id] is not None
    return ended


def _requeue(run_id: UUID, attempt: int, when: Q, now: datetime) -> bool:
    """Back to queued for another executor (its `run.queued` wakes them); the old claim, which
    names the attempt, stops matching."""
    chain_id = Run.objects.values_list("chain_id", flat=True).get(pk=run_id)
    name, version = Chain.objects.values_list("name", "version").get(pk=chain_id)
    seq = event_append(
        run_id=run_id,
        event="run.queued",
        data={
            "chain": name,
            "version": version,
            "attempt": attempt + 1,
            "reason": "worker_lost",
        },
        now=now,
        when=when,
        status=RunStatus.QUEUED,
        worker="",
        attempt=attempt + 1,
        current_agent="",
        deadline_at=None,
        heartbeat_at=now,
    )
    return seq is not None


def runs_recover_lost(*, now: datetime | None = None) -> dict[str, int]:
    """Running runs with no event for WORKER_LOST_AFTER_S: retried once, then failed."""
    now = now or timezone.now()
    cutoff = _seconds_ago(now, settings.WORKER_LOST_AFTER_S)
    rows = Run.objects.filter(status=RunStatus.RUNNING, heartbeat_at__lt=cutoff).values_list(
        "id", "worker", "attempt", "cancel_reason", "cancel_requested_at"
    )[:BATCH]
    counts = {"retried": 0, "failed": 0, "cancelled": 0}
    for run_id, worker, attempt, cancel_reason, cancel_requested_at in rows:
        when = Q(status=RunStatus.RUNNING, worker=worker, heartbeat_at__lt=cutoff)
        if cancel_requested_at is not None:
            # Someone asked it to stop: finish that instead of running it again.
            done = event_append(
                run_id=run_id,
                event="run.cancelled",
                data={"reason": cancel_reason or "api"},
                now=now,
                when=when,
                status=RunStatus.CANCELLED,
                finished_at=now,
                current_agent="",
            )
            counts["cancelled"] += done is not None
        elif attempt < MAX_ATTEMPTS:
            counts["retried"] += _requeue(run_id, attempt, when, now)
        else:
            message = "The run's worker stopped answering, on the retry too."
            done = event_append(
                run_id=run_id,
                event="run.failed",
                data={"error": {"code": "worker_lost", "message": message}},
                now=now,
                when=when,
                status=RunStatus.FAILED,
                finished_at=now,
                current_agent="",
                error_code="worker_lost",
                error_message=message,
            )
            counts["failed"] += done is not None
    return counts


def runs_cancel_orphans(*, now: datetime | None = None) -> int:
    """Cancel active runs without any webhook that nobody polled or streamed for
    ORPHAN_TIMEOUT_S: nobody would ever learn the result."""
    now = now or timezone.now()
    cutoff = _seconds_ago(now, settings.ORPHAN_TIMEOUT_S)
    unwatched = Q(status__in=ACTIVE_STATUSES, webhook_url="", cancel_requested_at__isnull=True)
    candidates = (
        Run.objects.filter(unwatched)
        .alias(seen=Coalesce("last_seen_at", "created_at"))
        .filter(seen__lt=cutoff)
    )
    owners = set(candidates.values_list("owner_id", flat=True).distinct())
    # Owners who will be told about their runs (an enabled webhook endpoint): not orphans.
    candidates = candidates.exclude(owner_id__in=owners_watched(owners))
    cancelled = 0
    for run_id in candidates.values_list("id", flat=True)[:BATCH]:
        # Claim: still unwatched at this instant (a poll just now saves it), and not yet asked.
        claim = candidates.filter(pk=run_id)
        if claim.update(cancel_requested_at=now, cancel_reason="orphaned"):
            run_cancel(run=Run.objects.get(pk=run_id), reason="orphaned")
            cancelled += 1
    return cancelled


def runs_delete_expired(*, now: datetime | None = None) -> int:
    """Delete finished runs older than RUN_RETENTION_DAYS with their events and webhook
    messages, deliveries and attempts (cascade), in batches so no transaction grows large."""
    now = now or timezone.now()
    cutoff = now - timedelta(days=settings.RUN_RETENTION_DAYS)
    deleted = 0
    for _ in range(DELETE_BATCHES_PER_PASS):
        ids = list(
            Run.objects.filter(finished_at__lt=cutoff, status__in=TERMINAL_STATUSES)
            .order_by("finished_at")
            .values_list("id", flat=True)[:DELETE_BATCH]
        )
        if not ids:
            break
        with transaction.atomic():
            Run.objects.filter(pk__in=ids).delete()
        deleted += len(ids)
    return deleted


def executors_forget(*, now: datetime | None = None) -> int:
    """Forget executors silent for ten times WORKER_LOST_AFTER_S (their runs moved long ago)."""
    now = now or timezone.now()
    cutoff = _seconds_ago(now, 10 * settings.WORKER_LOST_AFTER_S)
    return Executor.objects.filter(heartbeat_at__lt=cutoff).delete()[0]


def keeper_pass(*, now: datetime | None = None) -> dict[str, int]:
    """One pass of every check (the minute schedule); returns what it did."""
    now = now or timezone.now()
    lost = runs_recover_lost(now=now)
    done = {
        "timed_out": runs_time_out(now=now),
        "input_timed_out": runs_expire_inputs(now=now),
        "worker_lost_retried": lost["retried"],
        "worker_lost_failed": lost["failed"],
        "worker_lost_cancelled": lost["cancelled"],
        "executors_forgotten": executors_forget(now=now),
        "orphaned": runs_cancel_orphans(now=now),
        "deleted": runs_delete_expired(now=now),
    }
    if any(done.values()):
        logger.info("keeper: %s", ", ".join(f"{k}={v}" for k, v in done.items() if v))
    return done
