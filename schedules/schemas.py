"""Documentation-only serializers: the shapes schedules/presenters.py builds by hand."""

from __future__ import annotations

from rest_framework import serializers

from runs.schemas import WebhookOut


class TickError(serializers.Serializer):
    code = serializers.CharField(
        help_text="The problem code the run create answered (`concurrency_limit`, `not_found`, "
        "`validation_error`, `authentication_failed` for a revoked key, ...)."
    )
    message = serializers.CharField()
    at = serializers.DateTimeField()


class ScheduleOut(serializers.Serializer):
    schedule_id = serializers.UUIDField()
    chain = serializers.CharField()
    version = serializers.IntegerField(
        allow_null=True, help_text="The pinned version; null: the newest at each tick."
    )
    cron = serializers.CharField(allow_null=True, help_text="Five fields; null for an interval.")
    timezone = serializers.CharField(
        allow_null=True, help_text="The IANA zone of the cron's clock; null for an interval."
    )
    interval_s = serializers.IntegerField(allow_null=True, help_text="Null for a cron.")
    input = serializers.JSONField()
    metadata = serializers.DictField()
    webhook = WebhookOut(allow_null=True)
    paused = serializers.BooleanField()
    next_run_at = serializers.DateTimeField(allow_null=True, help_text="Null while paused.")
    last_run_at = serializers.DateTimeField(allow_null=True)
    last_run_id = serializers.UUIDField(allow_null=True)
    last_error = TickError(
        allow_null=True,
        help_text="The latest refused tick; null once a later tick started a run.",
    )
    runs_url = serializers.CharField(help_text="`GET` lists the runs its ticks started.")
    created_at = serializers.DateTimeField()


class SchedulePage(serializers.Serializer):
    results = ScheduleOut(many=True)
    next = serializers.CharField(allow_null=True)
