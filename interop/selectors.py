"""Reads of the protocols' own shapes: a page of an owner's runs as A2A lists tasks."""

from __future__ import annotations

import contextlib
from datetime import datetime
from uuid import UUID

from django.db.models import Q
from django.db.models.functions import Coalesce

from agentsvc.models import Owner
from runs.models import Run
from runs.selectors import decode_cursor, encode_cursor


def task_page(
    *,
    owner: Owner,
    chain: str | None,
    statuses: list[str] | None,
    context_key: str,
    context: str | None,
    updated_after: datetime | None,
    cursor: str | None,
    limit: int,
) -> tuple[list[Run], str | None, int]:
    """A page of an owner's runs (of `chain`, in `statuses`, in the A2A context `context`:
    the run's metadata[context_key], or the run itself when it has none; whose last change,
    its end, start or creation, is after `updated_after`), newest first; the next page's
    cursor and the number of runs on every page (run_created_idx and the owner's runs)."""
    runs = Run.objects.filter(owner=owner).select_related("chain")
    if chain is not None:
        runs = runs.filter(chain__name=chain)
    if statuses is not None:
        runs = runs.filter(status__in=statuses)
    if context is not None:
        given = Q(**{f"metadata__{context_key}": context})
        with contextlib.suppress(ValueError):  # not a run id: only contexts clients named
            given |= Q(pk=UUID(context)) & ~Q(metadata__has_key=context_key)
        runs = runs.filter(given)
    if updated_after is not None:
        runs = runs.alias(changed=Coalesce("finished_at", "started_at", "created_at")).filter(
            changed__gt=updated_after
        )
    total = runs.count()
    if cursor:
        created_at, run_id = decode_cursor(cursor, datetime.fromisoformat, UUID)
        runs = runs.filter(Q(created_at__lt=created_at) | Q(created_at=created_at, id__lt=run_id))
    page = list(runs.order_by("-created_at", "-id")[: limit + 1])
    next_cursor = None
    if len(page) > limit:
        page = page[:limit]
        next_cursor = encode_cursor(page[-1].created_at, page[-1].id)
    return page, next_cursor, total
