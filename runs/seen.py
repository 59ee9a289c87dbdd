"""Marking a run as watched (polled, paged, streamed, waited on), for the orphan check.

Cheap by design: terminal runs (most reads) never write; an active run is written at most once
per SEEN_RESOLUTION per process, decided first from a process-local clock (no query), then from
the value the caller already loaded, and finally by a conditional UPDATE of one unindexed
column (a HOT update: no index churn). A few seconds of resolution is plenty against an orphan
timeout of minutes, and keeps a thousand streams on one run from writing a thousand times.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from uuid import UUID

from django.db.models import Q
from django.utils import timezone

from runs.models import ACTIVE_STATUSES, Run

SEEN_RESOLUTION = timedelta(seconds=5)
_touched: dict[UUID, float] = {}  # run id -> monotonic time this process last wrote it


def seen_due(run_id: UUID) -> bool:
    """Whether this process may need to write (no query): lets async callers skip the hop to
    a worker thread."""
    return time.monotonic() - _touched.get(run_id, -1e9) >= SEEN_RESOLUTION.total_seconds()


def run_seen(*, run_id: UUID, status: str, last_seen_at: datetime | None = None) -> bool:
    """Record that a client is watching this run; returns whether a write was made."""
    if status not in ACTIVE_STATUSES:
        _touched.pop(run_id, None)
        return False
    if not seen_due(run_id):
        return False
    clock = time.monotonic()
    now = timezone.now()
    if last_seen_at is not None and now - last_seen_at < SEEN_RESOLUTION:
        return False
    _touched[run_id] = clock
    if len(_touched) > 10_000:  # a bound, not a cache policy: old entries only skip a write
        _touched.clear()
    stale = Q(last_seen_at__isnull=True) | Q(last_seen_at__lt=now - SEEN_RESOLUTION)
    return bool(
        Run.objects.filter(stale, pk=run_id, status__in=ACTIVE_STATUSES).update(last_seen_at=now)
    )
