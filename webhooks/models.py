"""Webhook endpoints, messages (one per terminal event), deliveries (message x target), attempts."""

from __future__ import annotations

import uuid

from django.db import models
from django.db.models import Q

from agentsvc.models import Owner
from runs.models import Run


class WebhookEndpoint(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(Owner, on_delete=models.CASCADE, related_name="webhook_endpoints")
    url = models.URLField(max_length=2000)
    secret = models.CharField(max_length=200)
    # After a rotation the old secret keeps signing beside the new one until it expires.
    previous_secret = models.CharField(max_length=200, blank=True)
    previous_secret_expires_at = models.DateTimeField(null=True, blank=True)
    events = models.JSONField(default=list)
    description = models.CharField(max_length=500, blank=True)
    enabled = models.BooleanField(default=True)
    disabled_reason = models.CharField(max_length=200, blank=True)
    # When it was last disabled (by a 410, failing for WEBHOOK_DISABLE_AFTER_S, the owner or an
    # operator); null while enabled.
    disabled_at = models.DateTimeField(null=True, blank=True)
    failing_since = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [
            # GET /webhook-endpoints: an owner's endpoints newest first, keyset-paginated.
            models.Index(
                fields=["owner", "-created_at", "-id"], name="whendpoint_owner_created_idx"
            ),
            # Fan-out at a terminal event: the owner's enabled endpoints.
            models.Index(
                fields=["owner"], name="whendpoint_owner_enabled_idx", condition=Q(enabled=True)
            ),
        ]

    def __str__(self) -> str:
        return self.url


WEBHOOK_TEST = "webhook.test"
# An operational event: one of the owner's endpoints was disabled automatically. Sent to the
# owner's other enabled endpoints, whatever events they subscribe to.
ENDPOINT_DISABLED = "endpoint.disabled"


class WebhookMessage(models.Model):
    """One terminal event of a run, or a message of no run (seq 0): a `webhook.test` sent to one
    endpoint, an `endpoint.disabled` sent to the owner's other endpoints. Its id is the
    `webhook-id` of every attempt and resend."""

    id = models.CharField(primary_key=True, max_length=40, editable=False)
    run = models.ForeignKey(
        Run, null=True, blank=True, on_delete=models.CASCADE, related_name="webhook_messages"
    )
    event_type = models.CharField(max_length=32)
    seq = models.PositiveIntegerField()
    payload = models.JSONField()
    created_at = models.DateTimeField()

    class Meta:
        constraints = [
            # One message per run event; also serves "the run's terminal message" lookups.
            models.UniqueConstraint(fields=["run", "seq"], name="whmessage_run_seq_uniq"),
        ]

    def __str__(self) -> str:
        return self.id

    @staticmethod
    def new_id() -> str:
        return f"msg_{uuid.uuid4().hex}"


class DeliveryStatus(models.TextChoices):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Trigger(models.TextChoices):
    AUTO = "auto"
    MANUAL = "manual"


class WebhookDelivery(models.Model):
    """A message to one target: the run's own webhook (endpoint null) or a registered endpoint."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    message = models.ForeignKey(WebhookMessage, on_delete=models.CASCADE, related_name="deliveries")
    endpoint = models.ForeignKey(
        WebhookEndpoint, null=True, blank=True, on_delete=models.CASCADE, related_name="deliveries"
    )
    url = models.URLField(max_length=2000)
    status = models.CharField(
        max_length=16, choices=DeliveryStatus.choices, default=DeliveryStatus.PENDING
    )
    # When the next attempt is due; while an attempt is under way, when its lease runs out.
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    next_trigger = models.CharField(max_length=8, choices=Trigger.choices, default=Trigger.AUTO)
    # Whoever holds the current lease; a task whose token no longer matches does nothing.
    claim_token = models.UUIDField(null=True, blank=True)
    attempt_count = models.PositiveIntegerField(default=0)
    auto_attempt_count = models.PositiveIntegerField(default=0)
    last_status_code = models.PositiveIntegerField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True)
    last_duration_ms = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name_plural = "webhook deliveries"
        indexes = [
            # The sweep: pending deliveries whose next attempt (or lease) is due.
            models.Index(
                fields=["next_attempt_at"],
                name="whdelivery_due_idx",
                condition=Q(status="pending"),
            ),
        ]
        constraints = [
            # One delivery per message and registered endpoint...
            models.UniqueConstraint(
                fields=["message", "endpoint"],
                name="whdelivery_message_endpoint_uniq",
                condition=Q(endpoint__isnull=False),
            ),
            # ...and one to the run's own webhook. (Also serves deliveries of a message.)
            models.UniqueConstraint(
                fields=["message"],
                name="whdelivery_message_own_uniq",
                condition=Q(endpoint__isnull=True),
            ),
            models.CheckConstraint(
                condition=Q(status__in=[s.value for s in DeliveryStatus]),
                name="whdelivery_status_valid",
            ),
            # A pending delivery always has a due time, so the sweep can never lose it.
            models.CheckConstraint(
                condition=~Q(status="pending") | Q(next_attempt_at__isnull=False),
                name="whdelivery_pending_has_due_time",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.message_id} -> {self.url}"


class WebhookAttempt(models.Model):
    delivery = models.ForeignKey(WebhookDelivery, on_delete=models.CASCADE, related_name="attempts")
    number = models.PositiveIntegerField()
    at = models.DateTimeField()
    status_code = models.PositiveIntegerField(null=True, blank=True)
    duration_ms = models.PositiveIntegerField()
    error = models.CharField(max_length=500, blank=True)
    response_excerpt = models.CharField(max_length=1000, blank=True)
    # Sent to a private address that WEBHOOK_ALLOWED_NETWORKS opened: the excerpt is an internal
    # service's answer, shown to operators in the admin but not to the tenant in the API.
    private_target = models.BooleanField(default=False)
    trigger = models.CharField(max_length=8, choices=Trigger.choices)

    class Meta:
        constraints = [
            # Attempts of a delivery are numbered 1..n; the index serves the delivery log.
            models.UniqueConstraint(fields=["delivery", "number"], name="whattempt_number_uniq"),
        ]
        ordering = ["delivery", "number"]

    def __str__(self) -> str:
        return f"{self.delivery_id} #{self.number}"


class AttemptTotal(models.Model):
    """Attempts by outcome for /metrics, added to as each attempt is recorded and never lowered
    (retention deletes attempts, not these)."""

    outcome = models.CharField(max_length=16, unique=True)  # the upsert's conflict target
    attempts = models.BigIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.outcome}: {self.attempts}"
