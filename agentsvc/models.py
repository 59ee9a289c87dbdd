from __future__ import annotations

import hashlib
import hmac
import secrets

from django.db import models

KEY_PREFIX = "ak_"
DISPLAY_PREFIX_LEN = 8


class Owner(models.Model):
    """A tenant: every run, key and webhook endpoint belongs to one."""

    name = models.CharField(max_length=100, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name

    # DRF puts the owner in request.user; these make it behave like an authenticated user.
    is_authenticated = True
    is_anonymous = False


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


class ApiKey(models.Model):
    owner = models.ForeignKey(Owner, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100)
    # The first characters after "ak_", shown to operators to tell keys apart.
    prefix = models.CharField(max_length=DISPLAY_PREFIX_LEN)
    key_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    # Per-key limits; null means the server-wide default.
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    runs_per_minute = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_minute = models.PositiveIntegerField(null=True, blank=True)
    max_active_runs = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        verbose_name = "API key"
        indexes = [
            # Authentication looks a key up by its display prefix, then compares hashes.
            models.Index(fields=["prefix"], name="apikey_prefix_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({KEY_PREFIX}{self.prefix}…)"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None

    @staticmethod
    def generate() -> str:
        return KEY_PREFIX + secrets.token_urlsafe(32)

    def matches(self, raw: str) -> bool:
        return hmac.compare_digest(self.key_hash, hash_key(raw))
