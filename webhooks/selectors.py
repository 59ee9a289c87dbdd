"""Reads on webhooks, always scoped to an owner."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from django.db.models import Prefetch, Q
from django.http import Http404

from agentsvc.models import Owner
from runs.models import Run
from runs.selectors import decode_cursor, encode_cursor, newest_first_page
from webhooks.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint


def endpoint_get(*, owner: Owner, endpoint_id: UUID) -> WebhookEndpoint:
    try:
        return WebhookEndpoint.objects.get(pk=endpoint_id, owner=owner)
    except WebhookEndpoint.DoesNotExist:
        raise Http404 from None


def endpoint_list(
    *, owner: Owner, cursor: str | None, limit: int
) -> tuple[list[WebhookEndpoint], str | None]:
    """A page of the owner's endpoints, newest first."""
    return newest_first_page(
        WebhookEndpoint.objects.filter(owner=owner), cursor=cursor, limit=limit
    )


def _with_log(deliveries):
    return deliveries.select_related("message").prefetch_related(
        Prefetch("attempts", queryset=WebhookAttempt.objects.order_by("number"))
    )


def delivery_get(*, owner: Owner, delivery_id: UUID) -> WebhookDelivery:
    """One of the owner's deliveries: of their runs, or a test sent to their endpoint."""
    mine = Q(message__run__owner=owner) | Q(message__run__isnull=True, endpoint__owner=owner)
    try:
        return _with_log(WebhookDelivery.objects).get(mine, pk=delivery_id)
    except WebhookDelivery.DoesNotExist:
        raise Http404 from None


def run_deliveries(
    *, run: Run, cursor: str | None, limit: int
) -> tuple[list[WebhookDelivery], str | None]:
    """A page of a run's deliveries with their attempts, oldest first (three queries)."""
    deliveries = WebhookDelivery.objects.filter(message__run=run)
    if cursor:
        created, pk = decode_cursor(cursor, datetime.fromisoformat, UUID)
        deliveries = deliveries.filter(Q(created_at__gt=created) | Q(created_at=created, id__gt=pk))
    page = list(_with_log(deliveries).order_by("created_at", "id")[: limit + 1])
    if len(page) <= limit:
        return page, None
    page = page[:limit]
    return page, encode_cursor(page[-1].created_at, page[-1].id)


def owners_with_endpoints(owner_ids: set[int]) -> set[int]:
    """Owners among these with an enabled endpoint: they hear of their runs' ends."""
    return set(
        WebhookEndpoint.objects.filter(owner_id__in=owner_ids, enabled=True).values_list(
            "owner_id", flat=True
        )
    )
