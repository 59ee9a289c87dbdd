"""Python client of the agentsvc HTTP API: runs, streaming with resume, webhooks, typed errors."""

from agentsvc_client._core import (
    AUTO,
    INPUT_REQUIRED,
    KEEP,
    TERMINAL_EVENTS,
    TERMINAL_STATUSES,
    Event,
)
from agentsvc_client.aio import AsyncClient
from agentsvc_client.client import Client
from agentsvc_client.errors import (
    AgentsvcError,
    APIConnectionError,
    APIError,
    AuthenticationError,
    ChainFailedError,
    ChainTimedOutError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
    ValidationError,
    WaitTimeout,
)
from agentsvc_client.webhooks import WebhookVerificationError, verify_webhook

__all__ = [
    "AUTO",
    "INPUT_REQUIRED",
    "KEEP",
    "TERMINAL_EVENTS",
    "TERMINAL_STATUSES",
    "APIConnectionError",
    "APIError",
    "AgentsvcError",
    "AsyncClient",
    "AuthenticationError",
    "ChainFailedError",
    "ChainTimedOutError",
    "Client",
    "ConflictError",
    "Event",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServerError",
    "ServiceUnavailableError",
    "ValidationError",
    "WaitTimeout",
    "WebhookVerificationError",
    "verify_webhook",
]
