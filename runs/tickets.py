"""Stream tickets: short-lived credentials for browsers, which can set no header on a WebSocket
or an EventSource (docs/api.md section 1).

A ticket is stateless: the key's id, what it opens (one run, or the key's status feed) and
when it expires, signed with SECRET_KEY under a salt of its own. Checking it reads the key
again, so a ticket of a revoked key stops working at once. It opens that run's SSE stream and
WebSocket (or the feed) any number of times until it expires, and nothing else.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from uuid import UUID

from django.conf import settings
from django.core import signing

from agentsvc import logs
from agentsvc.db import db_async
from agentsvc.models import ApiKey
from runs.models import Run

SALT = "agentsvc.runs.stream-ticket"
FEED = "feed"
# A signed ticket is about 130 characters; anything much longer is not one.
MAX_TICKET_CHARS = 512


def stream_ticket_create(
    *, api_key: ApiKey, run: Run | None, now: float | None = None
) -> tuple[str, datetime]:
    """A ticket for `run`'s stream (or the key's feed when None), and when it expires."""
    expires = int(((time.time() if now is None else now) + settings.STREAM_TICKET_TTL_S) * 1000)
    scope = str(run.id) if run is not None else FEED
    ticket = signing.dumps({"k": api_key.pk, "s": scope, "e": expires}, salt=SALT)
    return ticket, datetime.fromtimestamp(expires / 1000, UTC)


def stream_ticket_key(*, ticket: str, scope: UUID | str) -> ApiKey | None:
    """The active key of a valid, unexpired ticket for `scope` (a run id, or FEED); else None."""
    if len(ticket) > MAX_TICKET_CHARS:
        return None
    try:
        claims = signing.loads(ticket, salt=SALT)
    except signing.BadSignature:
        return None
    if not isinstance(claims, dict) or claims.get("s") != str(scope):
        return None
    expires, key_id = claims.get("e"), claims.get("k")
    if not isinstance(expires, int) or not isinstance(key_id, int):
        return None
    if expires <= time.time() * 1000:
        return None
    key = ApiKey.objects.filter(pk=key_id, revoked_at__isnull=True).first()
    if key is not None:
        logs.bind(key_prefix=key.prefix)
    return key


def ticket_and_run(ticket: str, run_id: UUID) -> tuple[ApiKey | None, Run | None]:
    """Both look-ups of a ticket stream's opening in one trip to a worker thread."""
    from runs.streams import run_visible

    key = stream_ticket_key(ticket=ticket, scope=run_id)
    return key, (run_visible(run_id, key.owner_id) if key is not None else None)


def _ticket_key(ticket: str, scope: UUID | str) -> ApiKey | None:
    return stream_ticket_key(ticket=ticket, scope=scope)


ticket_authenticate = db_async(_ticket_key)
ticket_authenticate_and_find = db_async(ticket_and_run)
