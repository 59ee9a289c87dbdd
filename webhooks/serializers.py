"""Input validation for webhook targets, shared by run creation and endpoint registration."""

from __future__ import annotations

import base64
import binascii

from django.core.validators import RegexValidator
from rest_framework import serializers

from agentsvc.serializers import (
    RFC3339Field,
    StrictBooleanField,
    StrictCharField,
    StrictSerializer,
)
from runs.events import SUBSCRIBABLE_EVENTS, TERMINAL_EVENTS
from webhooks.ssrf import BlockedAddress, check_url


def validate_target_url(value: str) -> str:
    try:
        check_url(value)
    except BlockedAddress as e:
        raise serializers.ValidationError(str(e)) from None
    return value


def validate_secret(value: str) -> str:
    if not value.startswith("whsec_"):
        raise serializers.ValidationError("Must start with 'whsec_'.")
    try:
        raw = base64.b64decode(value[len("whsec_") :], validate=True)
    except (binascii.Error, ValueError):
        raise serializers.ValidationError("Must be 'whsec_' followed by base64.") from None
    if not 24 <= len(raw) <= 64:
        raise serializers.ValidationError("Must encode 24 to 64 bytes.")
    return value


def _events_field(**kwargs) -> serializers.ListField:
    # DRF's own message repeats the value whole; this one names the choices instead.
    choice = serializers.ChoiceField(
        choices=SUBSCRIBABLE_EVENTS,
        error_messages={"invalid_choice": f"Must be one of {', '.join(SUBSCRIBABLE_EVENTS)}."},
    )
    return serializers.ListField(child=choice, allow_empty=False, **kwargs)


def _dedupe(events: list[str]) -> list[str]:
    return [e for e in SUBSCRIBABLE_EVENTS if e in events]


class RunWebhookInput(StrictSerializer):
    """`webhook` of a run's create body."""

    url = serializers.URLField(max_length=2000, validators=[validate_target_url])
    secret = StrictCharField(max_length=200, validators=[validate_secret])
    events = _events_field(required=False, default=list(TERMINAL_EVENTS))

    def validate_events(self, value):
        return _dedupe(value)


class EndpointCreateInput(StrictSerializer):
    url = serializers.URLField(max_length=2000, validators=[validate_target_url])
    events = _events_field(required=False, default=list(TERMINAL_EVENTS))
    description = StrictCharField(max_length=500, required=False, allow_blank=True)

    def validate_events(self, value):
        return _dedupe(value)


class EndpointUpdateInput(EndpointCreateInput):
    url = serializers.URLField(max_length=2000, validators=[validate_target_url], required=False)
    events = _events_field(required=False)
    enabled = StrictBooleanField(required=False)


class RecoverInput(StrictSerializer):
    since = RFC3339Field(help_text="RFC 3339 with a zone: failed deliveries created since then.")
    until = RFC3339Field(required=False, help_text="Default: now.")
    idempotency_key = StrictCharField(
        required=False,
        trim_whitespace=False,
        validators=[
            RegexValidator(r"^[\x20-\x7e]{1,255}$", "1 to 255 printable ASCII characters.")
        ],
    )
