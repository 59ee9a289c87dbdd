"""Documentation-only serializers: the shapes webhooks/presenters.py builds by hand."""

from __future__ import annotations

from rest_framework import serializers

from runs.events import SUBSCRIBABLE_EVENTS
from webhooks.models import ENDPOINT_DISABLED, WEBHOOK_TEST, DeliveryStatus, Trigger


class EndpointOut(serializers.Serializer):
    id = serializers.UUIDField()
    url = serializers.URLField()
    events = serializers.ListField(child=serializers.ChoiceField(SUBSCRIBABLE_EVENTS))
    description = serializers.CharField()
    enabled = serializers.BooleanField()
    disabled_reason = serializers.CharField(allow_null=True)
    disabled_at = serializers.DateTimeField(
        allow_null=True, help_text="When it was disabled; null while enabled."
    )
    failing_since = serializers.DateTimeField(allow_null=True)
    last_error = serializers.CharField(allow_null=True)
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()


class EndpointWithSecretOut(EndpointOut):
    secret = serializers.CharField(help_text="Shown only in this answer.")


class EndpointPage(serializers.Serializer):
    results = EndpointOut(many=True)
    next = serializers.CharField(allow_null=True)


class AttemptOut(serializers.Serializer):
    number = serializers.IntegerField()
    at = serializers.DateTimeField()
    status_code = serializers.IntegerField(allow_null=True)
    duration_ms = serializers.IntegerField(allow_null=True)
    error = serializers.CharField(allow_null=True)
    response_excerpt = serializers.CharField(allow_blank=True)
    trigger = serializers.ChoiceField(Trigger.choices)


class DeliveryOut(serializers.Serializer):
    id = serializers.UUIDField()
    webhook_id = serializers.CharField()
    endpoint_id = serializers.UUIDField(allow_null=True)
    url = serializers.URLField()
    event = serializers.ChoiceField(
        [*SUBSCRIBABLE_EVENTS, WEBHOOK_TEST, ENDPOINT_DISABLED],
        help_text="webhook.test: a test of an endpoint; endpoint.disabled: another endpoint of "
        "the owner was disabled.",
    )
    status = serializers.ChoiceField(DeliveryStatus.choices)
    attempts = AttemptOut(many=True)
    next_attempt_at = serializers.DateTimeField(allow_null=True)
    created_at = serializers.DateTimeField()


class DeliveryPage(serializers.Serializer):
    results = DeliveryOut(many=True)
    next = serializers.CharField(allow_null=True)


class ResentOut(serializers.Serializer):
    id = serializers.UUIDField()
    url = serializers.URLField()
    status = serializers.ChoiceField(DeliveryStatus.choices)


class ResentPage(serializers.Serializer):
    results = ResentOut(many=True)


class TestSentOut(serializers.Serializer):
    delivery_id = serializers.UUIDField()
    webhook_id = serializers.CharField(help_text="The `webhook-id` the receiver sees.")


class RecoveredOut(serializers.Serializer):
    count = serializers.IntegerField(help_text="How many failed deliveries are sent again.")
    delivery_ids = serializers.ListField(child=serializers.UUIDField())
