"""django-q2 entry points: take ids, call a service."""

from __future__ import annotations

from webhooks import services


def deliveries_send(delivery_ids: list[str], token: str | None = None) -> None:
    services.deliveries_attempt_many(delivery_ids=delivery_ids, token=token)
    services.deliveries_sweep_soon()


def deliveries_sweep() -> int:
    return services.deliveries_sweep()
