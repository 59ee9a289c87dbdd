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


# By the public prefix only: the lookup's timing says nothing about the secret part, and the
# hashes are compared in constant time (ApiKey.matches).
_K, _O = f'"{ApiKey._meta.db_table}"', f'"{Owner._meta.db_table}"'


def key_query(columns: str = "", joins: str = "") -> str:
    """The key lookup, with more `columns` from more `joins` for a hot path that reads what it
    needs in the same statement (the joins' parameters come before the prefix)."""
    return (
        f'SELECT {_K}.*, {_O}."name" AS owner_name{columns} FROM {_K} '
        f'JOIN {_O} ON {_O}."id" = {_K}."owner_id"{joins} WHERE {_K}."prefix" = %s'
    )


KEY_QUERY = key_query()


def key_prefix(raw: str) -> str | None:
    """The display prefix of a raw key, or None for anything not shaped like a key (refused
    before the database sees it: PostgreSQL refuses a NUL in a query parameter)."""
    if not _KEY_FORMAT.fullmatch(raw):
        return None
    return raw[len(KEY_PREFIX) : len(KEY_PREFIX) + DISPLAY_PREFIX_LEN]


def key_matching(raw: str, candidates) -> ApiKey | None:
    """The active key among `candidates` (rows of KEY_QUERY) whose hash matches, with its owner."""
    for key in candidates:
        if key.matches(raw):
            if not key.is_active:
                return None
            key.owner = Owner(id=key.owner_id, name=key.owner_name)
            logs.bind(key_prefix=key.prefix)  # this request's or connection's log lines
            return key
    return None


def api_key_authenticate(*, raw: str) -> ApiKey | None:
    """The active key (with its owner) for a raw key, or None: one indexed statement, written
    out (no query building) as it runs on every API call."""
    prefix = key_prefix(raw)
    if prefix is None:
        return None
    key = key_matching(raw, ApiKey.objects.raw(KEY_QUERY, [prefix]))
    if key is not None and touch_due(key):
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=key.last_used_at)
    return key


def touch_due(key: ApiKey) -> bool:
    """Whether to record the key's use now (at most once a minute, so authentication is not a
    write per request); sets `last_used_at` for the caller to write."""
    now = timezone.now()
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
        key.last_used_at = now
        return True
    return False


def api_key_revoke(*, key: ApiKey) -> None:
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
