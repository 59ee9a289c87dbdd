"""One HTTP attempt: sign with Standard Webhooks, connect to the checked address, classify."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx
from django.conf import settings
from standardwebhooks import Webhook

from webhooks.ssrf import BlockedAddress, Target, resolve_target

EXCERPT_CHARS = 500
READ_LIMIT = 4096
USER_AGENT = "agentsvc-webhooks/1"


@dataclass
class Outcome:
    status_code: int | None
    duration_ms: int
    error: str = ""
    excerpt: str = ""
    retry_after_s: float | None = None
    # No retry will help (410, refused address, invalid URL), or the receiver asked for none.
    permanent: bool = False
    # Sent to a private address the allow-list opened (the excerpt is for operators only).
    private_target: bool = False

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300 and not self.error

    @property
    def tenant_error(self) -> str:
        return tenant_error(self.error, private_target=self.private_target)


# What a tenant is shown of any failed attempt to a private address the allow-list opened.
PRIVATE_TARGET_ERROR = "private_target_error"


def tenant_error(error: str, *, private_target: bool) -> str:
    """The error a tenant may read. Inside an allowed private network every failure is one
    class: `connection_error: ... refused`, `http_400` and `timeout` would tell the tenant which
    internal ports are open. Operators read the attempt's own error in the admin."""
    return PRIVATE_TARGET_ERROR if private_target and error else error


def body_bytes(payload: dict) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def sign(*, secrets: list[str], msg_id: str, timestamp: datetime, body: str) -> str:
    """`v1,<sig>` per active secret, space-separated (two while a rotation is in its 24 h)."""
    return " ".join(Webhook(s).sign(msg_id, timestamp, body) for s in secrets)


_lock = threading.Lock()
_clients: OrderedDict[str, httpx.Client] = OrderedDict()


def _client(target: Target) -> httpx.Client:
    """Pooled clients, keep-alive. HTTPS gets one per host name: connections are pooled by the
    address we dial, and a TLS connection verified for one name must never carry another's."""
    bundle = settings.WEBHOOK_CA_BUNDLE
    key = f"{target.host if target.scheme == 'https' else ''}|{bundle}"
    with _lock:
        client = _clients.get(key)
        if client is None:
            client = httpx.Client(
                follow_redirects=False,
                trust_env=False,  # no proxy: we connect to the address we checked
                verify=ssl.create_default_context(cafile=bundle) if bundle else True,
                timeout=settings.WEBHOOK_TIMEOUT_S,
                limits=httpx.Limits(max_connections=20, max_keepalive_connections=10),
            )
            _clients[key] = client
            if len(_clients) > 64:
                _clients.popitem(last=False)[1].close()
        else:
            _clients.move_to_end(key)
        return client


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds()
        except (TypeError, ValueError):
            return None
    return max(0.0, min(seconds, settings.WEBHOOK_RETRY_AFTER_MAX_S))


def attempt(*, url: str, msg_id: str, body: str, secrets: list[str]) -> Outcome:
    """Send once. Never raises for anything the receiver or the network does."""
    started = time.monotonic()

    def took() -> int:
        return int((time.monotonic() - started) * 1000)

    try:
        target = resolve_target(url)
    except BlockedAddress as e:
        code = "blocked_address" if e.permanent else f"dns_error: {e}"
        return Outcome(None, took(), error=code[:500], permanent=e.permanent)
    now = datetime.now(UTC)
    headers = {
        "Host": target.host_header,
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": sign(secrets=secrets, msg_id=msg_id, timestamp=now, body=body),
    }
    deadline = started + settings.WEBHOOK_TIMEOUT_S
    try:
        with _client(target).stream(
            "POST",
            target.connect_url,
            content=body.encode(),
            headers=headers,
            extensions={"sni_hostname": target.host},
        ) as response:
            raw = b""
            for chunk in response.iter_bytes():
                raw += chunk
                if len(raw) >= READ_LIMIT or time.monotonic() > deadline:
                    break
    except httpx.TimeoutException:
        return Outcome(None, took(), error="timeout", private_target=target.private)
    except httpx.HTTPError as e:
        return Outcome(
            None,
            took(),
            error=f"connection_error: {type(e).__name__}: {e}"[:500],
            private_target=target.private,
        )
    status = response.status_code
    outcome = Outcome(
        status,
        took(),
        excerpt=raw[:READ_LIMIT].decode(errors="replace")[:EXCERPT_CHARS],
        private_target=target.private,
    )
    if 300 <= status < 400:
        outcome.error = f"redirect_not_followed: {status}"
    elif status == 410:
        outcome.error = "gone"
        outcome.permanent = True
    elif not 200 <= status < 300:
        outcome.error = f"http_{status}"
        if status in (429, 503):
            outcome.retry_after_s = _retry_after(response.headers.get("retry-after"))
    if outcome.error and _delivery_control(response) == "abort-message":
        # Svix's delivery control: the receiver stops the retries of this message.
        outcome.error = f"aborted_by_receiver: {outcome.error}"
        outcome.permanent = True
    return outcome


def _delivery_control(response: httpx.Response) -> str:
    return response.headers.get("webhook-delivery", "").strip().lower()
