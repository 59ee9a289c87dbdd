"""Writes on registered webhook endpoints."""

from __future__ import annotations

import base64
import secrets as pysecrets
from datetime import timedelta
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from agentsvc.models import Owner
from webhooks.models import WebhookDelivery, WebhookEndpoint, WebhookMessage

ROTATION_OVERLAP = timedelta(hours=24)


def secret_generate() -> str:
    return "whsec_" + base64.b64encode(pysecrets.token_bytes(32)).decode()


def endpoint_create(
    *, owner: Owner, url: str, events: list[str], description: str = ""
) -> WebhookEndpoint:
    return WebhookEndpoint.objects.create(
        owner=owner, url=url, events=events, description=description, secret=secret_generate()
    )


def endpoint_update(*, endpoint: WebhookEndpoint, **changes: Any) -> WebhookEndpoint:
    """Change an endpoint; re-enabling clears why and since when it was disabled and failing."""
    if changes.get("enabled") is True and not endpoint.enabled:
        changes.update(disabled_reason="", disabled_at=None, failing_since=None)
    elif changes.get("enabled") is False and endpoint.enabled:
        changes.setdefault("disabled_at", timezone.now())
    for name, value in changes.items():
        setattr(endpoint, name, value)
    endpoint.save()
    return endpoint


def endpoint_rotate_secret(*, endpoint: WebhookEndpoint) -> WebhookEndpoint:
    """A new secret; the old one keeps signing beside it for 24 h."""
    endpoint.previous_secret = endpoint.secret
    endpoint.previous_secret_expires_at = timezone.now() + ROTATION_OVERLAP
    endpoint.secret = secret_generate()
    endpoint.save()
    return endpoint


def endpoint_delete(*, endpoint: WebhookEndpoint) -> None:
    """Delete the endpoint with its deliveries and their attempts.

    The deliveries are locked first. A worker records an attempt in one statement that updates
    the delivery and inserts the attempt; without the lock, one committed between the cascade's
    read of the attempts and its delete would be left behind, and the commit would fail on the
    attempt's foreign key. With it, the cascade waits for that worker and sees its attempt, and a
    worker that comes later finds its delivery gone (its lease is lost).

    A run that ends meanwhile may still add a delivery to the endpoint (its fan-out read the
    endpoint before): the delete then fails on that delivery's foreign key, and is tried again,
    which sees it."""
    # By id: a failed attempt's delete has already cleared the instance's pk.
    endpoint_id = endpoint.pk
    for attempt in range(3):
        try:
            with transaction.atomic():
                _endpoint_delete(endpoint_id)
            return
        except IntegrityError:
            if attempt == 2:
                raise


def _endpoint_delete(endpoint_id) -> None:
    deliveries = WebhookDelivery.objects.select_for_update().filter(endpoint_id=endpoint_id)
    list(deliveries.values_list("pk"))
    # Messages of no run (its tests, `endpoint.disabled` events it was sent) go with their last
    # delivery rather than linger without any; one also sent to other endpoints stays for them.
    runless = list(
        WebhookMessage.objects.filter(
            run__isnull=True, deliveries__endpoint_id=endpoint_id
        ).values_list("pk", flat=True)
    )
    WebhookEndpoint.objects.filter(pk=endpoint_id).delete()
    WebhookMessage.objects.filter(pk__in=runless, deliveries__isnull=True).delete()
