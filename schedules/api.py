"""The schedules API (docs/api.md section 10): one view per operation, owner-scoped."""

from __future__ import annotations

from django.conf import settings
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from agentsvc.idempotency import IdempotentMixin
from agentsvc.openapi import IDEMPOTENCY_KEY, problems
from agentsvc.serializers import StrictCharField, StrictIntegerField, StrictSerializer
from runs.api import (
    CURSOR,
    LIMIT,
    MAX_LIMIT,
    JSONObjectField,
    MetadataField,
    _page,
    _validate_metadata,
    check_query,
    idempotency_key_field,
    int_param,
)
from schedules import selectors, services
from schedules.presenters import schedule_dict
from schedules.schemas import ScheduleOut, SchedulePage
from schedules.timing import TimingError, cron_check, zone
from webhooks.serializers import RunWebhookInput

DEFAULT_TIMEZONE = "UTC"


class ScheduleCreateInput(StrictSerializer):
    cron = StrictCharField(
        required=False,
        max_length=200,
        help_text="Five fields (minute hour day-of-month month day-of-week), as in crontab.",
    )
    timezone = StrictCharField(
        required=False,
        max_length=64,
        help_text="The IANA zone whose clock the cron follows (default UTC); only with cron.",
    )
    interval_s = StrictIntegerField(
        required=False,
        min_value=1,
        max_value=2**31 - 1,
        help_text="Seconds between ticks, at least SCHEDULE_MIN_INTERVAL_S (default 60); the "
        "first tick is one interval after creation.",
    )
    input = JSONObjectField(required=False, default=dict)
    version = StrictIntegerField(
        required=False,
        min_value=1,
        max_value=2**31 - 1,
        help_text="Pin a version; default: the newest at each tick.",
    )
    metadata = MetadataField(required=False, default=dict, validators=[_validate_metadata])
    webhook = RunWebhookInput(required=False, allow_null=True)
    idempotency_key = idempotency_key_field()

    def validate_interval_s(self, value: int) -> int:
        if value < settings.SCHEDULE_MIN_INTERVAL_S:
            raise serializers.ValidationError(
                f"Must be at least {settings.SCHEDULE_MIN_INTERVAL_S} seconds."
            )
        return value

    def validate(self, data: dict) -> dict:
        errors: dict[str, str] = {}
        cron, interval_s = data.get("cron"), data.get("interval_s")
        if cron is not None and interval_s is not None:
            errors["cron"] = errors["interval_s"] = "Give either cron or interval_s, not both."
        elif cron is None and interval_s is None:
            errors["cron"] = errors["interval_s"] = "One of cron and interval_s is required."
        tz = data.get("timezone", DEFAULT_TIMEZONE)
        if "timezone" in data and cron is None:
            errors["timezone"] = "Only with cron: an interval does not follow a clock."
        else:
            try:
                zone(tz)
            except TimingError as e:
                errors["timezone"] = str(e)
                tz = DEFAULT_TIMEZONE  # the cron is still checked
        if cron is not None and "cron" not in errors:
            try:
                data["cron"] = cron_check(cron, tz)
            except TimingError as e:
                errors["cron"] = str(e)
        if errors:
            raise serializers.ValidationError(errors)
        data["timezone"] = tz
        return data


class ScheduleCreateApi(IdempotentMixin, APIView):
    @extend_schema(
        operation_id="schedules_create",
        summary="Start a run of the chain on a cron or an interval",
        description="Each tick starts an ordinary run with the creating key (its limits apply); "
        "the input is checked against the chain's input schema now.",
        request=ScheduleCreateInput,
        parameters=[IDEMPOTENCY_KEY],
        responses={201: ScheduleOut, **problems(404, 409, 422)},
    )
    def post(self, request, name: str):
        body = ScheduleCreateInput(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        schedule = services.schedule_create(
            api_key=request.auth,
            chain_name=name,
            version=data.get("version"),
            cron=data.get("cron", ""),
            tz=data["timezone"],
            interval_s=data.get("interval_s"),
            run_input=data["input"],
            metadata=data["metadata"],
            webhook=data.get("webhook"),
        )
        return Response(
            schedule_dict(schedule),
            status=status.HTTP_201_CREATED,
            headers={"Location": f"/api/v1/schedules/{schedule.id}"},
        )


class ScheduleListApi(APIView):
    @extend_schema(
        operation_id="schedules_list",
        parameters=[LIMIT, CURSOR],
        responses={200: SchedulePage, **problems()},
    )
    def get(self, request):
        check_query(request.query_params, {"limit", "cursor"})
        schedules, next_cursor = selectors.schedule_list(
            owner=request.user,
            cursor=request.query_params.get("cursor") or None,
            limit=int_param(request.query_params, "limit", 20, 1, MAX_LIMIT),
        )
        return Response(_page([schedule_dict(s) for s in schedules], request, next_cursor))


class ScheduleDetailApi(APIView):
    """GET shows, DELETE removes one schedule (its runs stay)."""

    @extend_schema(operation_id="schedules_retrieve", responses={200: ScheduleOut, **problems(404)})
    def get(self, request, schedule_id):
        check_query(request.query_params, set())
        schedule = selectors.schedule_get(owner=request.user, schedule_id=schedule_id)
        return Response(schedule_dict(schedule))

    @extend_schema(operation_id="schedules_delete", responses={204: None, **problems(404)})
    def delete(self, request, schedule_id):
        schedule = selectors.schedule_get(owner=request.user, schedule_id=schedule_id)
        services.schedule_delete(schedule=schedule)
        return Response(status=status.HTTP_204_NO_CONTENT)


class SchedulePauseApi(IdempotentMixin, APIView):
    @extend_schema(
        operation_id="schedules_pause",
        summary="Stop the ticks until resumed",
        request=None,
        parameters=[IDEMPOTENCY_KEY],
        responses={200: ScheduleOut, **problems(404, 409, 422)},
    )
    def post(self, request, schedule_id):
        schedule = selectors.schedule_get(owner=request.user, schedule_id=schedule_id)
        return Response(schedule_dict(services.schedule_pause(schedule=schedule)))


class ScheduleResumeApi(IdempotentMixin, APIView):
    @extend_schema(
        operation_id="schedules_resume",
        summary="Tick again from now on (ticks that fell while paused are not made up)",
        request=None,
        parameters=[IDEMPOTENCY_KEY],
        responses={200: ScheduleOut, **problems(404, 409, 422)},
    )
    def post(self, request, schedule_id):
        schedule = selectors.schedule_get(owner=request.user, schedule_id=schedule_id)
        return Response(schedule_dict(services.schedule_resume(schedule=schedule)))
