"""Writes on webhooks (services write, selectors read)."""

from webhooks.services.deliveries import (
    deliveries_claim_due,
    delivery_attempt,
    delivery_resend,
    endpoint_recover,
    endpoint_test,
    messages_create_for_events,
    run_webhooks_resend,
)
from webhooks.services.endpoints import (
    endpoint_create,
    endpoint_delete,
    endpoint_rotate_secret,
    endpoint_update,
    secret_generate,
)

__all__ = [
    "deliveries_claim_due",
    "delivery_attempt",
    "delivery_resend",
    "endpoint_create",
    "endpoint_delete",
    "endpoint_recover",
    "endpoint_rotate_secret",
    "endpoint_test",
    "endpoint_update",
    "messages_create_for_events",
    "run_webhooks_resend",
    "secret_generate",
]
