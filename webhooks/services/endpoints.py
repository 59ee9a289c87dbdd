"""Writes on registered webhook endpoints."""

from __future__ import annotations

import base64
import secrets as pysecrets
from datetime import timedelta
from typing import Any

from django.utils import timezone

from agentsvc.models import Owner
from webhooks.models import WebhookEndpoint

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
    if changes.get("enabled") is True and not endpoint.enabled:
        changes.update(disabled_reason="", failing_since=None)
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
    endpoint.delete()
