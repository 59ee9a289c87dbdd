"""Webhook objects as the API shows them: hand-built dicts. Secrets only when just made."""

from __future__ import annotations

from typing import Any

from runs.timefmt import iso
from webhooks.delivery import tenant_error
from webhooks.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint


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
        "attempts": [attempt_dict(a) for a in delivery.attempts.all()],
        "next_attempt_at": iso(delivery.next_attempt_at),
        "created_at": iso(delivery.created_at),
    }


def attempt_dict(attempt: WebhookAttempt) -> dict[str, Any]:
    """An attempt as its tenant sees it. What an internal service answers stays with the
    operators (the admin shows it): its excerpt always, and of a failure also its status code
    and duration, and one error class instead of its error (webhooks.delivery.tenant_error), so
    the log cannot be used to map which ports inside an allowed network are open."""
    hidden = attempt.private_target and bool(attempt.error)
    return {
        "number": attempt.number,
        "at": iso(attempt.at),
        "status_code": None if hidden else attempt.status_code,
        "duration_ms": None if hidden else attempt.duration_ms,
        "error": tenant_error(attempt.error, private_target=attempt.private_target) or None,
        "response_excerpt": "" if attempt.private_target else attempt.response_excerpt,
        "trigger": attempt.trigger,
    }
