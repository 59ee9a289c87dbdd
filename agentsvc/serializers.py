from __future__ import annotations

from datetime import UTC, datetime

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers


class StrictSerializer(serializers.Serializer):
    """Unknown fields are a 400, not silently dropped (a typo would otherwise be ignored)."""

    def to_internal_value(self, data):
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError({name: "Unknown field." for name in unknown})
        return super().to_internal_value(data)


class StrictCharField(serializers.CharField):
    """A string field that refuses numbers and booleans instead of turning them into text."""

    default_error_messages = {"not_a_string": "Must be a string."}

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("not_a_string")
        return super().to_internal_value(data)


class StrictIntegerField(serializers.IntegerField):
    """An integer field that refuses strings and booleans (DRF reads "3" as 3); a JSON number
    with no fraction (3.0) is an integer, as in JSON Schema."""

    default_error_messages = {"not_an_integer": "Must be an integer."}

    def to_internal_value(self, data):
        integral = isinstance(data, int) or (isinstance(data, float) and data.is_integer())
        if isinstance(data, bool) or not integral:
            self.fail("not_an_integer")
        return super().to_internal_value(data)


class StrictFloatField(serializers.FloatField):
    """A number field that refuses strings and booleans (DRF reads false as 0.0)."""

    default_error_messages = {"not_a_number": "Must be a number."}

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int | float):
            self.fail("not_a_number")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    """true or false only (DRF also reads "yes", "on", 1 and 0)."""

    default_error_messages = {"not_a_boolean": "Must be true or false."}

    def to_internal_value(self, data):
        if not isinstance(data, bool):
            self.fail("not_a_boolean")
        return data


RFC3339_MESSAGE = "Must be an RFC 3339 timestamp with a time zone."


def rfc3339_utc(text: str) -> datetime:
    """An RFC 3339 timestamp with a zone, as UTC; ValueError for anything else. As UTC: RFC 3339
    (and fromisoformat) take offsets up to ±23:59, PostgreSQL only up to ±15:59 (a 500)."""
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        raise ValueError("no time zone")
    try:
        return value.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+01:00 is before year 1 in UTC
        raise ValueError("out of range") from None


@extend_schema_field({"type": "string", "format": "date-time"})
class RFC3339Field(StrictCharField):
    """An RFC 3339 timestamp with a zone (DRF's DateTimeField takes a naive one as local)."""

    default_error_messages = {"not_rfc3339": RFC3339_MESSAGE}

    def to_internal_value(self, data):
        text = super().to_internal_value(data)
        try:
            return rfc3339_utc(text)
        except ValueError:
            self.fail("not_rfc3339")
