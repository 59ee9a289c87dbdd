"""Reads on schedules, always scoped to an owner."""

from __future__ import annotations

from uuid import UUID

from django.http import Http404

from agentsvc.models import Owner
from runs.selectors import newest_first_page
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
    return newest_first_page(Schedule.objects.filter(owner=owner), cursor=cursor, limit=limit)
