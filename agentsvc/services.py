from __future__ import annotations

import re
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from agentsvc import logs
from agentsvc.models import DISPLAY_PREFIX_LEN, KEY_PREFIX, ApiKey, Owner, hash_key

LAST_USED_RESOLUTION = timedelta(minutes=1)


@transaction.atomic
def api_key_create(*, owner_name: str, name: str, **limits: int | None) -> tuple[ApiKey, str]:
    """Create a key; the raw key is returned once and never stored."""
    owner, _ = Owner.objects.get_or_create(name=owner_name)
    raw = ApiKey.generate()
    key = ApiKey.objects.create(
        owner=owner,
        name=name,
        prefix=raw[len(KEY_PREFIX) : len(KEY_PREFIX) + DISPLAY_PREFIX_LEN],
        key_hash=hash_key(raw),
        **{k: v for k, v in limits.items() if v is not None},
    )
    return key, raw


# What `ApiKey.generate` makes: the prefix and URL-safe base64.
_KEY_FORMAT = re.compile(rf"{KEY_PREFIX}[A-Za-z0-9_-]{{32,197}}")


def api_key_authenticate(*, raw: str) -> ApiKey | None:
    """The active key for a raw key, or None. Anything not shaped like a key is refused before
    the database sees it (PostgreSQL refuses a NUL in a query parameter with an error)."""
    if not _KEY_FORMAT.fullmatch(raw):
        return None
    prefix = raw[len(KEY_PREFIX) : len(KEY_PREFIX) + DISPLAY_PREFIX_LEN]
    for key in ApiKey.objects.select_related("owner").filter(prefix=prefix):
        if key.matches(raw):
            if not key.is_active:
                return None
            _touch(key)
            logs.bind(key_prefix=key.prefix)  # this request's or connection's log lines
            return key
    return None


def _touch(key: ApiKey) -> None:
    """Record use at most once a minute, so authentication is not a write per request."""
    now = timezone.now()
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        key.last_used_at = now


def api_key_revoke(*, key: ApiKey) -> None:
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
