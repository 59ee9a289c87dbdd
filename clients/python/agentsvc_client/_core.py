"""What the sync and async clients share: settings, the retry policy, events and SSE parsing."""

from __future__ import annotations

import json
import os
import random
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx

from agentsvc_client.errors import AgentsvcError, error_from_response, retry_after_of


class _Auto:
    def __repr__(self) -> str:
        return "AUTO"


AUTO: Any = _Auto()
"""A fresh uuid4 Idempotency-Key per logical call, reused across its retries."""


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


KEEP: Any = _Keep()
"""For a rerun's `webhook`: keep the original run's (None drops it)."""

TERMINAL_EVENTS = frozenset({"run.completed", "run.failed", "run.cancelled", "run.timed_out"})
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled", "timed_out"})
INPUT_REQUIRED = "input_required"
"""The status of a run waiting for a person's answer (its `input_request` says what to send)."""
SSE_HEADERS = {"Accept": "text/event-stream"}


@dataclass(frozen=True)
class Event:
    """One run event (docs/api.md section 5): `type` is e.g. "agent.output", `data` its members."""

    seq: int
    type: str
    data: dict[str, Any]

    @property
    def run_id(self) -> str | None:
        return self.data.get("run_id")

    @property
    def ts(self) -> str | None:
        return self.data.get("ts")

    @property
    def chunk(self) -> str:
        """The token text of an agent.output event ("" for other types)."""
        return self.data.get("chunk", "") if self.type == "agent.output" else ""

    @property
    def is_terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS

    @property
    def is_input_required(self) -> bool:
        """The run stopped to wait for a person (`data` is the request): the stream stays open
        until someone answers and the run ends."""
        return self.type == "run.input_required"


@dataclass
class Settings:
    base_url: str
    api_key: str
    timeout: float = 30.0
    max_attempts: int = 5
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    headers: dict[str, str] = field(default_factory=dict)


def settings_from(base_url: str | None, api_key: str | None, **kw: Any) -> Settings:
    """Arguments first, then AGENTSVC_URL / AGENTSVC_API_KEY."""
    url = base_url or os.environ.get("AGENTSVC_URL") or ""
    key = api_key or os.environ.get("AGENTSVC_API_KEY") or ""
    if not url:
        raise AgentsvcError("no base URL: pass base_url or set AGENTSVC_URL")
    if not key:
        raise AgentsvcError("no API key: pass api_key or set AGENTSVC_API_KEY")
    return Settings(base_url=url.rstrip("/"), api_key=key, **kw)


def client_headers(settings: Settings) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {settings.api_key}",
        "User-Agent": "agentsvc-client-python/0.1",
        **settings.headers,
    }


def request_headers(method: str, idempotency_key: Any, extra: dict | None) -> dict[str, str]:
    """Headers of one logical call; the Idempotency-Key is chosen once, before any attempt."""
    headers = dict(extra or {})
    if method == "POST" and idempotency_key is not None:
        headers["Idempotency-Key"] = (
            str(uuid.uuid4()) if idempotency_key is AUTO else str(idempotency_key)
        )
    return headers


def is_retryable(response: httpx.Response, body: bytes | None = None) -> bool:
    """429, 503 and 409 idempotency_request_in_progress are worth another attempt."""
    if response.status_code in (429, 503):
        return True
    if response.status_code == 409:
        return error_from_response(response, body).code == "idempotency_request_in_progress"
    return False


def backoff(settings: Settings, attempt: int, retry_after: float | None) -> float:
    """Capped exponential backoff with full jitter; Retry-After, when given, is the floor."""
    exp = min(settings.backoff_cap, settings.backoff_base * 2 ** (attempt - 1))
    delay = random.uniform(exp / 2, exp)
    if retry_after is not None:
        delay = max(min(retry_after, settings.backoff_cap), 0) + random.uniform(0, 0.1)
    return delay


def response_delay(settings: Settings, attempt: int, response: httpx.Response) -> float:
    return backoff(settings, attempt, retry_after_of(response))


def decode(response: httpx.Response) -> Any:
    if response.status_code == 204 or not response.content:
        return None
    return response.json()


def create_body(
    input: dict, version: int | None, metadata: dict | None, webhook: dict | None, **more: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {"input": input}
    for name, value in (("version", version), ("metadata", metadata), ("webhook", webhook)):
        if value is not None:
            body[name] = value
    body.update({k: v for k, v in more.items() if v is not None})
    return body


def events_param(events: Iterable[str] | None) -> dict[str, str]:
    """`?events=a,b` of an event filter (None: every event)."""
    if events is None:
        return {}
    names = [events] if isinstance(events, str) else list(events)
    return {"events": ",".join(names)}


def respond_body(request_id: str, approve: bool | None, input: dict | None) -> dict[str, Any]:
    """The answer to a request: `approve` (an approval) or `input` (an input), not both."""
    if (approve is None) == (input is None):
        raise ValueError("pass either approve=True/False or input={...}")
    body: dict[str, Any] = {"request_id": request_id}
    if approve is not None:
        body["approve"] = approve
    else:
        body["input"] = input
    return body


def rerun_body(input: dict | None, metadata: dict | None, webhook: Any) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if input is not None:
        body["input"] = input
    if metadata is not None:
        body["metadata"] = metadata
    if webhook is not KEEP:
        body["webhook"] = webhook
    return body


def batch_body(items: Iterable[dict], version: int | None) -> dict[str, Any]:
    """Items are `{"input": ...}` (with `metadata`, `webhook`), or bare inputs."""
    listed = [item if "input" in item else {"input": item} for item in items]
    body: dict[str, Any] = {"items": listed}
    if version is not None:
        body["version"] = version
    return body


class SSEParser:
    """Feed lines, get events: the `id:`/`event:`/`data:` blocks of the SSE wire format."""

    def __init__(self) -> None:
        self._id: int | None = None
        self._event: str | None = None
        self._data: list[str] = []

    def feed(self, line: str) -> Event | None:
        if line == "":
            event = None
            if self._event is not None and self._id is not None:
                data = json.loads("\n".join(self._data)) if self._data else {}
                event = Event(seq=self._id, type=self._event, data=data)
            self._id, self._event, self._data = None, None, []
            return event
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "id":
            self._id = int(value)
        elif name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None

    def feed_all(self, lines: Iterable[str]) -> list[Event]:
        return [e for e in map(self.feed, lines) if e is not None]
