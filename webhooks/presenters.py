"""Webhook objects as the API shows them: hand-built dicts. Secrets only when just made."""

from __future__ import annotations

from typing import Any

from runs.timefmt import iso
from webhooks.models import WebhookDelivery, WebhookEndpoint


def endpoint_dict(endpoint: WebhookEndpoint, *, with_secret: bool = False) -> dict[str, Any]:
    body = {
        "id": str(endpoint.id),
        "url": endpoint.url,
        "events": endpoint.events,
        "description": endpoint.description,
        "enabled": endpoint.enabled,
        "disabled_reason": endpoint.disabled_reason or None,
        "disabled_at": iso(endpoint.disabled_at),
        "failing_since": iso(endpoint.failing_since),
        "last_error": endpoint.last_error or None,
        "created_at": iso(endpoint.created_at),
        "updated_at": iso(endpoint.updated_at),
    }
    if with_secret:
        body["secret"] = endpoint.secret
    return body


def delivery_dict(delivery: WebhookDelivery) -> dict[str, Any]:
    return {
        "id": str(delivery.id),
        "webhook_id": delivery.message_id,
        "endpoint_id": str(delivery.endpoint_id) if delivery.endpoint_id else None,
        "url": delivery.url,
        "event": delivery.message.event_type,
        "status": delivery.status,
        "attempts": [
            {
                "number": a.number,
                "at": iso(a.at),
                "status_code": a.status_code,
                "duration_ms": a.duration_ms,
                "error": a.error or None,
                # An internal service's answer stays with the operators (the admin shows it).
                "response_excerpt": "" if a.private_target else a.response_excerpt,
                "trigger": a.trigger,
            }
            for a in delivery.attempts.all()
        ],
        "next_attempt_at": iso(delivery.next_attempt_at),
        "created_at": iso(delivery.created_at),
    }
