"""Checking a webhook request is really from the service (Standard Webhooks signatures)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agentsvc_client.errors import AgentsvcError


class WebhookVerificationError(AgentsvcError):
    """Bad, missing or stale signature: answer 400 and do not act on the body."""


def verify_webhook(
    body: bytes | str, headers: Mapping[str, str], secret: str | list[str]
) -> dict[str, Any]:
    """The parsed payload ({type, id, timestamp, data}) when `webhook-signature` matches `secret`
    (or any of a list, while rotating) and `webhook-timestamp` is within 5 minutes; raises
    WebhookVerificationError otherwise. Pass the raw body bytes, exactly as received."""
    try:
        from standardwebhooks.webhooks import Webhook
        from standardwebhooks.webhooks import WebhookVerificationError as _Failed
    except ImportError as exc:  # pragma: no cover - an install without the extra
        raise ImportError("pip install 'agentsvc-client[webhooks]' to verify webhooks") from exc
    lowered = {k.lower(): v for k, v in headers.items()}
    data = body.decode() if isinstance(body, bytes) else body
    secrets = [secret] if isinstance(secret, str) else list(secret)
    failure: Exception | None = None
    for one in secrets:
        try:
            return Webhook(one).verify(data, lowered)
        except _Failed as exc:
            failure = exc
    raise WebhookVerificationError(str(failure or "no secret given"))
