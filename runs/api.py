"""The runs and chains API (API.md sections 3 and 4): one view per operation."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime

from django.conf import settings
from django.http import Http404
from django.utils import timezone
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from agentsvc.errors import ApplicationError
from runs import selectors, services
from runs.models import TERMINAL_STATUSES, RunStatus
from runs.presenters import chain_dict, event_dict, run_dict, run_handle
from webhooks.serializers import RunWebhookInput

MAX_LIMIT = 100


def _check_query(request, allowed: set[str]) -> None:
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        raise ApplicationError(
            "validation_error",
            "Unknown query parameters.",
            errors=[{"field": name, "message": "Unknown query parameter."} for name in unknown],
        )


def _int_param(request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = lo - 1
    if not lo <= value <= hi:
        raise ApplicationError(
            "validation_error",
            f"Invalid {name}.",
            errors=[{"field": name, "message": f"Must be an integer from {lo} to {hi}."}],
        )
    return value


def _page(results: list, request, next_cursor: str | None) -> dict:
    next_url = None
    if next_cursor:
        params = request.query_params.copy()
        params["cursor"] = next_cursor
        next_url = f"{request.path}?{params.urlencode()}"
    return {"results": results, "next": next_url}


class StrictSerializer(serializers.Serializer):
    """Rejects fields it does not know, so a typo is a 400 rather than silently ignored."""

    def validate(self, attrs):
        if isinstance(self.initial_data, dict):
            unknown = sorted(set(self.initial_data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError({name: "Unknown field." for name in unknown})
        return attrs


class JSONObjectField(serializers.JSONField):
    default_error_messages = {"not_object": "Must be a JSON object."}

    def to_internal_value(self, data):
        if not isinstance(data, dict):
            self.fail("not_object")
        return super().to_internal_value(data)


def _validate_metadata(value: dict) -> dict:
    if len(value) > 50:
        raise serializers.ValidationError("At most 50 keys.")
    for key, item in value.items():
        if len(key) > 40:
            raise serializers.ValidationError(f"Key {key[:40]!r}… is longer than 40 characters.")
        if not isinstance(item, str | int | float | bool) and item is not None:
            raise serializers.ValidationError(
                f"Value of {key!r} must be a string, number or boolean."
            )
        if isinstance(item, str) and len(item) > 500:
            raise serializers.ValidationError(f"Value of {key!r} is longer than 500 characters.")
    return value


class RunCreateInput(StrictSerializer):
    input = JSONObjectField(required=False, default=dict)
    version = serializers.IntegerField(required=False, min_value=1, max_value=2**31 - 1)
    metadata = JSONObjectField(required=False, default=dict, validators=[_validate_metadata])
    webhook = RunWebhookInput(required=False, allow_null=True)


class RunInvokeInput(RunCreateInput):
    wait_s = serializers.FloatField(required=False, min_value=0)


def _start_run(request, name: str, serializer_class=RunCreateInput):
    body = serializer_class(data=request.data)
    body.is_valid(raise_exception=True)
    data = body.validated_data
    try:
        chain = selectors.chain_get(name=name, version=data.get("version"))
    except Http404:
        detail = (
            f"Chain {name!r} has no version {data['version']}."
            if "version" in data
            else f"No chain named {name!r}."
        )
        raise ApplicationError("not_found", detail) from None
    run = services.run_create(
        api_key=request.auth,
        chain=chain,
        run_input=data["input"],
        metadata=data["metadata"],
        webhook=data.get("webhook"),
    )
    return run, data


def _accepted(run) -> Response:
    return Response(
        run_handle(run),
        status=status.HTTP_202_ACCEPTED,
        headers={"Location": f"/api/v1/runs/{run.id}"},
    )


class RunCreateApi(APIView):
    def post(self, request, name: str):
        run, _ = _start_run(request, name)
        return _accepted(run)


class RunInvokeApi(APIView):
    def post(self, request, name: str):
        run, data = _start_run(request, name, RunInvokeInput)
        wait_s = min(data.get("wait_s", settings.INVOKE_WAIT_DEFAULT_S), settings.INVOKE_WAIT_MAX_S)
        run = services.run_wait(run_id=run.id, timeout_s=wait_s)
        if run.status == RunStatus.FAILED:
            raise ApplicationError(
                "chain_failed",
                run.error_message,
                run_id=str(run.id),
                error={"code": run.error_code, "message": run.error_message},
            )
        if run.status == RunStatus.TIMED_OUT:
            raise ApplicationError("chain_timed_out", run.error_message, run_id=str(run.id))
        if run.status in TERMINAL_STATUSES:
            return Response(run_dict(run))
        return _accepted(run)


class ChainListApi(APIView):
    def get(self, request):
        _check_query(request, {"limit", "cursor"})
        limit = _int_param(request, "limit", MAX_LIMIT, 1, MAX_LIMIT)
        chains = selectors.chain_latest_list()
        cursor = request.query_params.get("cursor")
        if cursor:
            try:
                after = base64.urlsafe_b64decode(cursor.encode()).decode()
            except (ValueError, binascii.Error, UnicodeError):
                raise ApplicationError(
                    "validation_error",
                    "Invalid cursor.",
                    errors=[{"field": "cursor", "message": "Not a valid cursor."}],
                ) from None
            chains = [c for c in chains if c.name > after]
        page = chains[:limit]
        next_cursor = (
            base64.urlsafe_b64encode(page[-1].name.encode()).decode()
            if len(chains) > limit
            else None
        )
        return Response(_page([chain_dict(c) for c in page], request, next_cursor))


class ChainDetailApi(APIView):
    def get(self, request, name: str):
        _check_query(request, {"version"})
        version = None
        if "version" in request.query_params:
            version = _int_param(request, "version", 1, 1, 2**31 - 1)
        return Response(chain_dict(selectors.chain_get(name=name, version=version)))


class RunListApi(APIView):
    def get(self, request):
        _check_query(request, {"status", "chain", "created_after", "limit", "cursor"})
        params = request.query_params
        statuses = None
        if params.get("status"):
            statuses = params["status"].split(",")
            bad = [s for s in statuses if s not in RunStatus.values]
            if bad:
                raise ApplicationError(
                    "validation_error",
                    "Unknown status.",
                    errors=[
                        {
                            "field": "status",
                            "message": f"{bad[0]!r} is not one of {', '.join(RunStatus.values)}.",
                        }
                    ],
                )
        created_after = None
        if params.get("created_after"):
            try:
                created_after = datetime.fromisoformat(params["created_after"])
                if created_after.tzinfo is None:
                    raise ValueError
            except ValueError:
                raise ApplicationError(
                    "validation_error",
                    "Invalid created_after.",
                    errors=[
                        {
                            "field": "created_after",
                            "message": "Must be an RFC 3339 timestamp with a time zone.",
                        }
                    ],
                ) from None
        chain = params.get("chain") or None
        if chain is not None and not selectors.chain_exists(name=chain):
            raise ApplicationError(
                "validation_error",
                "Unknown chain.",
                errors=[{"field": "chain", "message": f"No chain {chain!r}."}],
            )
        runs, next_cursor = selectors.run_list(
            owner=request.user,
            status=statuses,
            chain=chain,
            created_after=created_after,
            cursor=params.get("cursor") or None,
            limit=_int_param(request, "limit", 20, 1, MAX_LIMIT),
        )
        return Response(_page([run_dict(r) for r in runs], request, next_cursor))


def _poll_after(run) -> str:
    """Retry-After for a run still going: 2 s in its first 30 s, then 5 s."""
    return "2" if (timezone.now() - run.created_at).total_seconds() < 30 else "5"


class RunDetailApi(APIView):
    def get(self, request, run_id):
        _check_query(request, set())
        run = selectors.run_get(owner=request.user, run_id=run_id)
        headers = {} if run.is_terminal else {"Retry-After": _poll_after(run)}
        return Response(run_dict(run), headers=headers)


class RunCancelApi(APIView):
    def post(self, request, run_id):
        run = selectors.run_get(owner=request.user, run_id=run_id)
        run = services.run_cancel(run=run, reason="api")
        code = status.HTTP_200_OK if run.is_terminal else status.HTTP_202_ACCEPTED
        return Response(run_dict(run), status=code)


class RunEventsApi(APIView):
    def get(self, request, run_id):
        _check_query(request, {"after", "limit"})
        run = selectors.run_get(owner=request.user, run_id=run_id)
        after = _int_param(request, "after", 0, 0, 2**31 - 1)
        events = selectors.run_events_after(
            run=run, after=after, limit=_int_param(request, "limit", 100, 1, 1000)
        )
        return Response(
            {
                "results": [event_dict(e) for e in events],
                "next_after": events[-1].seq if events else after,
            }
        )
