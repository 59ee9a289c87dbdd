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
    # This key's runs now queued or running. A run start takes a slot and the run's terminal event
    # gives it back, each in the run's own transaction (agentsvc.limits.active_runs_take).
    active_runs = models.PositiveIntegerField(default=0, editable=False)

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


class IdempotencyRecord(models.Model):
    """The first answer to a POST with an Idempotency-Key, replayed for retries of it."""

    owner = models.ForeignKey(Owner, on_delete=models.CASCADE)
    key = models.CharField(max_length=255)
    method = models.CharField(max_length=8)
    path = models.CharField(max_length=500)
    fingerprint = models.CharField(max_length=64)  # SHA-256 of the canonical JSON body
    # Set in the transaction that creates the run, so a crash before the answer is stored
    # still leaves the run findable.
    run = models.ForeignKey("runs.Run", on_delete=models.SET_NULL, null=True, blank=True)
    response_status = models.PositiveSmallIntegerField(null=True, blank=True)
    response_body = models.JSONField(null=True, blank=True)
    response_headers = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()

    class Meta:
        constraints = [
            # The one decision point when parallel requests carry the same key.
            models.UniqueConstraint(
                fields=["owner", "method", "path", "key"], name="idempotency_scope_uniq"
            ),
        ]
        indexes = [
            # The purge task deletes expired records.
            models.Index(fields=["expires_at"], name="idempotency_expires_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.method} {self.path} [{self.key}]"

    @property
    def completed(self) -> bool:
        return self.response_status is not None


class TokenWindow(models.Model):
    """Tokens a key has reserved or used in one minute (the start of the minute, Unix seconds)."""

    api_key = models.ForeignKey(ApiKey, on_delete=models.CASCADE)
    window = models.BigIntegerField()
    used = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            # Reservations update this one row under its lock: the budget check is exact.
            models.UniqueConstraint(fields=["api_key", "window"], name="tokenwindow_key_uniq"),
        ]
        indexes = [
            # The purge task deletes old windows.
            models.Index(fields=["window"], name="tokenwindow_window_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.api_key_id}@{self.window}: {self.used}"
