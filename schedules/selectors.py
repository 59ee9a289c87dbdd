"""Reads on schedules, always scoped to an owner."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from django.db.models import Q
from django.http import Http404

from agentsvc.models import Owner
from runs.selectors import decode_cursor, encode_cursor
from schedules.models import Schedule


def schedule_get(*, owner: Owner, schedule_id: UUID) -> Schedule:
    try:
        return Schedule.objects.get(pk=schedule_id, owner=owner)
    except Schedule.DoesNotExist:
        raise Http404 from None


def schedule_list(
    *, owner: Owner, cursor: str | None, limit: int
) -> tuple[list[Schedule], str | None]:
    """A page of the owner's schedules, newest first (schedule_owner_created_idx)."""
    schedules = Schedule.objects.filter(owner=owner)
    if cursor:
        created, pk = decode_cursor(cursor, datetime.fromisoformat, UUID)
        schedules = schedules.filter(Q(created_at__lt=created) | Q(created_at=created, id__lt=pk))
    page = list(schedules.order_by("-created_at", "-id")[: limit + 1])
    if len(page) <= limit:
        return page, None
    page = page[:limit]
    return page, encode_cursor(page[-1].created_at, page[-1].id)
