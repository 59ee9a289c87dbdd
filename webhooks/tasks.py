"""django-q2 entry points: take ids, call a service."""

from __future__ import annotations

from webhooks import services


def delivery_send(delivery_id: str, token: str | None = None) -> None:
    services.delivery_attempt(delivery_id=delivery_id, token=token)


def deliveries_sweep() -> int:
    return services.deliveries_sweep()
