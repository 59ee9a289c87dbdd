"""The runs and chains API (docs/api.md sections 3 and 4): one view per operation."""

from __future__ import annotations

import re
from datetime import datetime
from uuid import UUID

from django.conf import settings
from django.core.validators import MaxLengthValidator, MinLengthValidator, RegexValidator
from django.http import Http404
from django.http.request import MediaType
from django.utils import timezone
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    PolymorphicProxySerializer,
    extend_schema,
    extend_schema_field,
)
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from agentsvc.errors import ApplicationError, echo
from agentsvc.idempotency import IdempotentMixin
from agentsvc.openapi import IDEMPOTENCY_KEY, problems
from agentsvc.serializers import (
    RFC3339_MESSAGE,
    StrictBooleanField,
    StrictCharField,
    StrictFloatField,
    StrictIntegerField,
    StrictSerializer,
    rfc3339_utc,
)
from runs import inputs, selectors, services
from runs.events import event_filter_parse
from runs.models import TERMINAL_STATUSES, RunStatus
from runs.presenters import chain_dict, event_dict, run_dict, run_handle
from runs.schemas import (
    ChainOut,
    ChainPage,
    RunBatchOut,
    RunHandle,
    RunOut,
    RunPage,
    StreamTicketOut,
)
from runs.seen import run_seen
from runs.tickets import stream_ticket_create
from runs.timefmt import after_ms, iso
from webhooks.serializers import RunWebhookInput

MAX_LIMIT = 100
_UUID = re.compile(r"[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")


def check_query(params, allowed: set[str]) -> None:
    """400 naming the query parameters not in `allowed` (the views and the streams)."""
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ApplicationError(
            "validation_error",
            "Unknown query parameters.",
            errors=[{"field": name, "message": "Unknown query parameter."} for name in unknown],
        )


def int_param(params, name: str, default: int, lo: int, hi: int) -> int:
    """The integer query parameter `name` from lo to hi, `default` when absent; else 400."""
    raw = params.get(name)
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


def rfc3339(raw: str, field: str) -> datetime:
    """An RFC 3339 timestamp with a zone, as UTC (rfc3339_utc), or a 400 naming `field`."""
    try:
        return rfc3339_utc(raw)
    except ValueError:
        raise ApplicationError(
            "validation_error",
            f"Invalid {field}.",
            errors=[{"field": field, "message": RFC3339_MESSAGE}],
        ) from None


def _page(results: list, request, next_cursor: str | None) -> dict:
    next_url = None
    if next_cursor:
        params = request.query_params.copy()
        params["cursor"] = next_cursor
        next_url = f"{request.path}?{params.urlencode()}"
    return {"results": results, "next": next_url}


@extend_schema_field({"type": "object", "additionalProperties": True})
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


@extend_schema_field(
    {
        "type": "object",
        "maxProperties": 50,
        "propertyNames": {"maxLength": 40},
        "additionalProperties": {
            "oneOf": [
                {"type": "string", "maxLength": 500},
                {"type": "number"},
                {"type": "boolean"},
                {"type": "null"},
            ]
        },
    }
)
class MetadataField(JSONObjectField):
    """Up to 50 keys of at most 40 characters; values strings (≤ 500), numbers or booleans."""


def idempotency_key_field() -> StrictCharField:
    """The body's `idempotency_key`, for POSTs that send no Idempotency-Key header."""
    return StrictCharField(
        required=False,
        trim_whitespace=False,
        validators=[
            RegexValidator(r"^[\x20-\x7e]{1,255}$", "1 to 255 printable ASCII characters.")
        ],
    )


class RunCreateInput(StrictSerializer):
    input = JSONObjectField(required=False, default=dict)
    version = StrictIntegerField(required=False, min_value=1, max_value=2**31 - 1)
    metadata = MetadataField(required=False, default=dict, validators=[_validate_metadata])
    webhook = RunWebhookInput(required=False, allow_null=True)
    idempotency_key = idempotency_key_field()


def create_body(body, serializer_class=None) -> dict:
    """A create body's validated data. The plain body most calls send ({"input": {...}} and
    perhaps flat metadata) is taken as the serializer would take it, without building one
    (DRF copies every declared field, the webhook's nested serializer too, per instance);
    anything else, invalid bodies included, goes through the serializer and its messages."""
    serializer_class = serializer_class or RunCreateInput
    if serializer_class is RunCreateInput and isinstance(body, dict) and set(body) <= _PLAIN:
        run_input, metadata = body.get("input", {}), body.get("metadata", {})
        if isinstance(run_input, dict) and isinstance(metadata, dict):
            try:
                return {"input": run_input, "metadata": _validate_metadata(metadata)}
            except serializers.ValidationError:
                pass
    valid = serializer_class(data=body)
    valid.is_valid(raise_exception=True)
    return valid.validated_data


_PLAIN = frozenset({"input", "metadata"})


class RunRerunInput(StrictSerializer):
    """What a rerun may change; anything left out is the original run's."""

    input = JSONObjectField(required=False, help_text="Default: the original run's input.")
    metadata = MetadataField(
        required=False,
        validators=[_validate_metadata],
        help_text="Default: the original run's metadata.",
    )
    webhook = RunWebhookInput(
        required=False,
        allow_null=True,
        help_text="Default: the original run's webhook (its secret too); null for none.",
    )
    idempotency_key = idempotency_key_field()


MAX_BATCH = 100


class RunBatchItemInput(StrictSerializer):
    input = JSONObjectField(required=False, default=dict)
    metadata = MetadataField(required=False, default=dict, validators=[_validate_metadata])
    webhook = RunWebhookInput(required=False, allow_null=True)


class RunBatchInput(StrictSerializer):
    items = serializers.ListSerializer(
        child=RunBatchItemInput(),
        allow_empty=False,
        max_length=MAX_BATCH,
        # Never reached (allow_empty and max_length answer first); they state the bounds in the
        # OpenAPI document, as minItems and maxItems.
        validators=[MinLengthValidator(1), MaxLengthValidator(MAX_BATCH)],
    )
    version = StrictIntegerField(required=False, min_value=1, max_value=2**31 - 1)
    idempotency_key = idempotency_key_field()


class RunInvokeInput(RunCreateInput):
    wait_s = StrictFloatField(required=False, min_value=0)


def chain_not_found(name: str, version: int | None) -> ApplicationError:
    detail = (
        f"Chain {echo(name)!r} has no version {version}."
        if version is not None
        else f"No chain named {echo(name)!r}."
    )
    return ApplicationError("not_found", detail)


def _chain_or_404(name: str, version: int | None):
    try:
        return selectors.chain_get(name=name, version=version)
    except Http404:
        raise chain_not_found(name, version) from None


def start_run(*, key, body, name: str, idempotency=None, serializer_class=RunCreateInput):
    """Create, invoke and the stream's create: validate the body, find the chain, start the
    run."""
    data = create_body(body, serializer_class)
    chain = _chain_or_404(name, data.get("version"))
    run = services.run_create(
        api_key=key,
        chain=chain,
        run_input=data["input"],
        metadata=data["metadata"],
        webhook=data.get("webhook"),
        idempotency=idempotency,
    )
    return run, data


def accepted_headers(run) -> dict[str, str]:
    return {"Location": f"/api/v1/runs/{run.id}"}


def _accepted(run) -> Response:
    return Response(run_handle(run), status=status.HTTP_202_ACCEPTED, headers=accepted_headers(run))


class RunCreateApi(IdempotentMixin, APIView):
    @extend_schema(
        operation_id="runs_create",
        summary="Start a run (async)",
        request=RunCreateInput,
        parameters=[IDEMPOTENCY_KEY],
        responses={202: RunHandle, **problems(404, 409, 422)},
    )
    def post(self, request, name: str):
        run, _ = start_run(
            key=request.auth, body=request.data, name=name, idempotency=self.idempotency
        )
        return _accepted(run)


class RunInvokeApi(IdempotentMixin, APIView):
    @extend_schema(
        operation_id="runs_invoke",
        summary="Run and wait up to wait_s",
        request=RunInvokeInput,
        parameters=[IDEMPOTENCY_KEY],
        responses={
            200: OpenApiResponse(RunOut, description="The run ended in time."),
            202: OpenApiResponse(
                PolymorphicProxySerializer(
                    component_name="RunInvokeAccepted",
                    serializers=[RunHandle, RunOut],
                    resource_type_field_name=None,
                ),
                description="Still going: the handle, poll it. Waiting for a person "
                "(status input_required): the run, with its `input_request`.",
            ),
            **problems(404, 409, 422, 502, 504),
        },
    )
    def post(self, request, name: str):
        run, data = start_run(
            key=request.auth,
            body=request.data,
            name=name,
            idempotency=self.idempotency,
            serializer_class=RunInvokeInput,
        )
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
        if run.is_waiting:  # nothing to wait for until a person answers: what it asks
            return Response(
                run_dict(run), status=status.HTTP_202_ACCEPTED, headers=accepted_headers(run)
            )
        return _accepted(run)


class RunBatchCreateApi(IdempotentMixin, APIView):
    @extend_schema(
        operation_id="runs_create_batch",
        summary="Start up to 100 runs of one chain at once (all or nothing)",
        description="Every item is checked first: one invalid item is a 400 naming it "
        "(`items[3].input.topic`) and no run is created. Limits count every run: a batch over "
        "the runs-per-minute, token or active-run limit is refused whole (429, or 422 "
        "`run_too_large` when it exceeds the whole token budget). More than 100 items: 400.",
        request=RunBatchInput,
        parameters=[IDEMPOTENCY_KEY],
        responses={202: RunBatchOut, **problems(404, 409, 422)},
    )
    def post(self, request, name: str):
        body = RunBatchInput(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        chain = _chain_or_404(name, data.get("version"))
        runs = services.run_create_batch(
            api_key=request.auth,
            chain=chain,
            items=[
                services.NewRun(item["input"], item["metadata"], item.get("webhook"))
                for item in data["items"]
            ],
            idempotency=self.idempotency,
            answer=_batch_answer,
        )
        return Response(_batch_answer(runs), status=status.HTTP_202_ACCEPTED)


def _batch_answer(runs) -> dict:
    return {"results": [run_handle(run) for run in runs]}


LIMIT = OpenApiParameter(
    "limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}, description="Page size."
)
CURSOR = OpenApiParameter("cursor", str, description="The `next` cursor of the previous page.")


class ChainListApi(APIView):
    @extend_schema(
        operation_id="chains_list",
        parameters=[LIMIT, CURSOR],
        responses={200: ChainPage, **problems()},
    )
    def get(self, request):
        check_query(request.query_params, {"limit", "cursor"})
        page, next_cursor = selectors.chain_page(
            cursor=request.query_params.get("cursor") or None,
            limit=int_param(request.query_params, "limit", MAX_LIMIT, 1, MAX_LIMIT),
        )
        return Response(_page([chain_dict(c) for c in page], request, next_cursor))


class ChainDetailApi(APIView):
    @extend_schema(
        operation_id="chains_retrieve",
        parameters=[
            OpenApiParameter(
                "version",
                {"type": "integer", "minimum": 1, "maximum": 2**31 - 1},
                description="A version; default latest.",
            )
        ],
        responses={200: ChainOut, **problems(404)},
    )
    def get(self, request, name: str):
        check_query(request.query_params, {"version"})
        version = None
        if "version" in request.query_params:
            version = int_param(request.query_params, "version", 1, 1, 2**31 - 1)
        return Response(chain_dict(selectors.chain_get(name=name, version=version)))


class RunListApi(APIView):
    @extend_schema(
        operation_id="runs_list",
        parameters=[
            OpenApiParameter("status", str, description="Comma-separated statuses."),
            OpenApiParameter("chain", str, description="A chain name."),
            OpenApiParameter(
                "schedule",
                {"type": "string", "format": "uuid"},
                description="A schedule id: the runs its ticks started (also once it is deleted).",
            ),
            OpenApiParameter(
                "created_after",
                {"type": "string", "format": "date-time"},
                description="RFC 3339 timestamp with zone. Runs whose `created_at`, as shown "
                "(to the millisecond), is later: a run's own `created_at` excludes that run.",
            ),
            LIMIT,
            CURSOR,
        ],
        responses={200: RunPage, **problems()},
    )
    def get(self, request):
        check_query(
            request.query_params,
            {"status", "chain", "schedule", "created_after", "limit", "cursor"},
        )
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
                            "message": f"{echo(bad[0])!r} is not one of "
                            f"{', '.join(RunStatus.values)}.",
                        }
                    ],
                )
        created_after = None
        if "created_after" in params:  # given empty: a 400 too, as the document says
            # Shown to the millisecond, stored to the microsecond: "after" the millisecond named.
            created_after = rfc3339(params["created_after"], "created_after")
            try:
                created_after = after_ms(created_after)
            except OverflowError:  # 9999-12-31T23:59:59.999Z: nothing can be later
                return Response(_page([], request, None))
        chain = params.get("chain") or None
        if chain is not None and not selectors.chain_exists(name=chain):
            raise ApplicationError(
                "validation_error",
                "Unknown chain.",
                errors=[{"field": "chain", "message": f"No chain {echo(chain)!r}."}],
            )
        schedule = None
        if "schedule" in params:
            if not _UUID.fullmatch(params["schedule"]):
                raise ApplicationError(
                    "validation_error",
                    "Invalid schedule.",
                    errors=[{"field": "schedule", "message": "Must be a schedule id (a UUID)."}],
                )
            schedule = UUID(params["schedule"])
        runs, next_cursor = selectors.run_list(
            owner=request.user,
            status=statuses,
            chain=chain,
            schedule=schedule,
            created_after=created_after,
            cursor=params.get("cursor") or None,
            limit=int_param(request.query_params, "limit", 20, 1, MAX_LIMIT),
        )
        return Response(_page([run_dict(r) for r in runs], request, next_cursor))


def _poll_after(run) -> str:
    """Retry-After for a run still going: 2 s in its first 30 s, then 5 s."""
    return "2" if (timezone.now() - run.created_at).total_seconds() < 30 else "5"


class RunDetailApi(APIView):
    @extend_schema(operation_id="runs_retrieve", responses={200: RunOut, **problems(404)})
    def get(self, request, run_id):
        check_query(request.query_params, set())
        data, headers = run_detail(owner=request.user, run_id=run_id)
        return Response(data, headers=headers)


def run_detail(*, owner, run_id) -> tuple[dict, dict[str, str]]:
    run = selectors.run_get(owner=owner, run_id=run_id)
    run_seen(run_id=run.id, status=run.status, last_seen_at=run.last_seen_at)
    return detail_answer(run)


def detail_answer(run) -> tuple[dict, dict[str, str]]:
    """GET /runs/{id} (the DRF view and the lane): the run, and Retry-After while it goes."""
    return run_dict(run), ({} if run.is_terminal else {"Retry-After": _poll_after(run)})


class RunCancelApi(IdempotentMixin, APIView):
    @extend_schema(
        operation_id="runs_cancel",
        request=None,
        parameters=[IDEMPOTENCY_KEY],
        responses={
            200: OpenApiResponse(RunOut, description="Cancelled (now or before)."),
            202: OpenApiResponse(RunOut, description="Running; asked to stop."),
            **problems(404, 409, 422),
        },
    )
    def post(self, request, run_id):
        run = selectors.run_get(owner=request.user, run_id=run_id)
        run = services.run_cancel(run=run, reason="api")
        code = status.HTTP_200_OK if run.is_terminal else status.HTTP_202_ACCEPTED
        return Response(run_dict(run), status=code)


class RunInputInput(StrictSerializer):
    request_id = StrictCharField(max_length=100, help_text="The `input_request`'s request_id.")
    approve = StrictBooleanField(required=False, help_text="The answer to an approval.")
    input = JSONObjectField(
        required=False, help_text="The answer to an input request: valid against its schema."
    )
    idempotency_key = idempotency_key_field()


class RunInputApi(IdempotentMixin, APIView):
    @extend_schema(
        operation_id="runs_input",
        summary="Answer a run that waits for input (approve, refuse, or give the input)",
        description="The answer is recorded with the key that sent it and the run is queued "
        "again (it resumes where it asked). A request answered before: 409 "
        "`input_already_received`; a request id the run does not wait on: 404; a run waiting "
        "on nothing: 409 `run_not_waiting`; an input its schema refuses: 400 naming the field. "
        "Taking the run's active-run slot again may be refused (429 `concurrency_limit`).",
        request=RunInputInput,
        parameters=[IDEMPOTENCY_KEY],
        responses={202: RunOut, **problems(404, 409, 422)},
    )
    def post(self, request, run_id):
        run = selectors.run_get(owner=request.user, run_id=run_id)
        body = RunInputInput(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        run = inputs.run_respond(
            run=run,
            request_id=data["request_id"],
            by=inputs.answerer_of_key(request.auth),
            approve=data.get("approve"),
            answer=data.get("input"),
            key=request.auth,
        )
        return Response(run_dict(run), status=status.HTTP_202_ACCEPTED)


class RunRerunApi(IdempotentMixin, APIView):
    @extend_schema(
        operation_id="runs_rerun",
        summary="Start a new run of the same chain version, input and metadata",
        description="The new run carries `rerun_of`. The body may replace `input`, `metadata` "
        "and `webhook`. Limits apply as on create.",
        request=RunRerunInput,
        parameters=[IDEMPOTENCY_KEY],
        responses={202: RunHandle, **problems(404, 409, 422)},
    )
    def post(self, request, run_id):
        original = selectors.run_get(owner=request.user, run_id=run_id)
        body = RunRerunInput(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        run = services.run_rerun(
            api_key=request.auth,
            run=original,
            run_input=data.get("input"),
            metadata=data.get("metadata"),
            webhook=data.get("webhook", services.UNSET),
            idempotency=self.idempotency,
        )
        return _accepted(run)


class StrictUUIDField(serializers.UUIDField):
    """A UUID string only (DRF also reads an integer as a UUID)."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid", value=data)
        return super().to_internal_value(data)


class StreamTicketInput(StrictSerializer):
    run_id = StrictUUIDField(required=False, help_text="A run of yours; leave out for the feed.")
    idempotency_key = idempotency_key_field()


class StreamTicketCreateApi(IdempotentMixin, APIView):
    """A ticket for a browser: `?ticket=` opens one run's SSE stream and WebSocket (or, without
    run_id, the key's status feed) until it expires, and nothing else."""

    @extend_schema(
        operation_id="stream_tickets_create",
        summary="A stream ticket for a browser",
        request=StreamTicketInput,
        parameters=[IDEMPOTENCY_KEY],
        responses={201: StreamTicketOut, **problems(404, 409, 422)},
    )
    def post(self, request):
        body = StreamTicketInput(data=request.data)
        body.is_valid(raise_exception=True)
        run_id = body.validated_data.get("run_id")
        run = selectors.run_get(owner=request.user, run_id=run_id) if run_id else None
        ticket, expires_at = stream_ticket_create(api_key=request.auth, run=run)
        return Response(
            {"ticket": ticket, "expires_at": iso(expires_at)}, status=status.HTTP_201_CREATED
        )


class RunEventsApi(APIView):
    """The JSON page of GET /runs/{id}/events (runs.sse.run_events routes here by Accept;
    documented with the stream in agentsvc.openapi)."""

    def get(self, request, run_id):
        types = events_filter(request.query_params)
        run = selectors.run_get(owner=request.user, run_id=run_id)
        run_seen(run_id=run.id, status=run.status, last_seen_at=run.last_seen_at)
        after, limit = events_window(request.query_params)
        events = selectors.run_events_after(run=run, after=after, limit=limit, types=types)
        return Response(events_answer(run, events, after=after, limit=limit, types=types))


EVENTS_JSON, EVENTS_SSE = "application/json", "text/event-stream"


def events_representation(accept: str) -> str | None:
    """GET /runs/{id}/events answers the JSON page or the stream, as the Accept header asks
    (the DRF view, the stream's view and the lane): EVENTS_SSE when it names the stream, else
    EVENTS_JSON when it admits JSON (no header, `*/*`, `application/*`), else None (406)."""
    if EVENTS_SSE in accept:
        return EVENTS_SSE
    if not accept.strip():
        return EVENTS_JSON
    for token in accept.split(","):
        media = MediaType(token.strip())
        if media.quality and (media.main_type, media.sub_type) in _JSON_RANGES:
            return EVENTS_JSON
    return None


_JSON_RANGES = {("*", "*"), ("application", "*"), ("application", "json")}


def events_filter(params) -> frozenset[str] | None:
    """The events page (the DRF view and the lane): the query's names, then `events`."""
    check_query(params, {"after", "limit", "events"})
    return events_param(params)


def events_param(params) -> frozenset[str] | None:
    """`?events=` (the events page and the streams): the event names to keep, None for all."""
    try:
        return event_filter_parse(params.get("events"))
    except ValueError as e:
        raise ApplicationError(
            "validation_error",
            "Invalid events.",
            errors=[{"field": "events", "message": str(e)}],
        ) from None


def events_window(params) -> tuple[int, int]:
    return int_param(params, "after", 0, 0, 2**31 - 1), int_param(params, "limit", 100, 1, 1000)


def events_answer(run, events, *, after: int, limit: int, types) -> dict:
    next_after = events[-1].seq if events else after
    if types is not None and len(events) < limit:
        # Every event up to the run's last_seq (read before the page) was looked at: the
        # next page starts there, not back at the last one shown.
        next_after = max(next_after, run.last_seq)
    return {"results": [event_dict(e) for e in events], "next_after": next_after}
