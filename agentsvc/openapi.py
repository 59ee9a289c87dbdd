"""OpenAPI pieces shared by every endpoint: the API key scheme, problem+json, common headers."""

from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse
from rest_framework import serializers


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "agentsvc.auth.ApiKeyAuthentication"
    name = "apiKey"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "`Authorization: Bearer ak_...` (or `X-API-Key: ak_...`).",
        }


class FieldErrorSerializer(serializers.Serializer):
    field = serializers.CharField()
    message = serializers.CharField()


class ProblemSerializer(serializers.Serializer):
    """RFC 9457 problem details."""

    type = serializers.CharField()
    title = serializers.CharField()
    status = serializers.IntegerField()
    detail = serializers.CharField()
    code = serializers.CharField()
    instance = serializers.CharField()
    errors = FieldErrorSerializer(many=True, required=False)
    run_id = serializers.UUIDField(required=False)


def problems(*statuses: int) -> dict[int, OpenApiResponse]:
    """Problem+json responses for the given statuses, plus those every API call may answer."""
    every = (400, 401, 413, 415, 429, 503)
    return {
        status: OpenApiResponse(ProblemSerializer, description="application/problem+json")
        for status in sorted({*statuses, *every})
    }


IDEMPOTENCY_KEY = OpenApiParameter(
    "Idempotency-Key",
    {"type": "string", "minLength": 1, "maxLength": 257, "pattern": "^[\\x20-\\x7e]+$"},
    OpenApiParameter.HEADER,
    required=False,
    description="Retries with the same key and body get the first answer again "
    "(`Idempotent-Replayed: true`) and cause no second side effect. At most 255 characters "
    '(257 in the quoted form `"..."`).',
)

_HEADERS = {
    "RateLimit-Policy": 'The key\'s quotas, e.g. `"requests";q=600;w=60, "tokens";q=200000;w=60`.',
    "RateLimit": 'What is left of each quota and seconds until it resets: `"requests";r=512;t=41`.',
}


# Operations whose 202 is one new run's handle, with its Location.
_STARTS_ONE_RUN = frozenset({"runs_create", "runs_invoke", "runs_rerun"})


def add_common_headers(result, generator, request, public):
    """Document problem+json media types, the rate-limit headers, Location and Retry-After;
    request bodies refuse unknown fields."""
    for name, schema in result.get("components", {}).get("schemas", {}).items():
        if name.endswith("Request") and schema.get("type") == "object":
            schema["additionalProperties"] = False
    for path, item in result.get("paths", {}).items():
        if not path.startswith("/api/v1/"):
            continue
        for operation in item.values():
            for status, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                if status.startswith(("4", "5")) and "application/json" in content:
                    content["application/problem+json"] = content.pop("application/json")
                headers = response.setdefault("headers", {})
                for name, text in _HEADERS.items():
                    headers[name] = {"schema": {"type": "string"}, "description": text}
                if status == "202" and operation.get("operationId") in _STARTS_ONE_RUN:
                    headers["Location"] = {
                        "schema": {"type": "string"},
                        "description": "The run: `/api/v1/runs/{id}`.",
                    }
                if status in ("409", "429", "503") or (status == "200" and "runs/{run_id}" in path):
                    headers["Retry-After"] = {
                        "schema": {"type": "integer"},
                        "description": "Seconds to wait before retrying "
                        "(on a run: before polling again).",
                    }
    return result


_EVENT = {
    "type": "object",
    "required": ["seq", "event", "data", "ts"],
    "properties": {
        "seq": {"type": "integer", "minimum": 1},
        "event": {"type": "string"},
        "data": {"type": "object", "additionalProperties": True},
        "ts": {"type": "string", "format": "date-time"},
    },
}
_SSE = {
    "text/event-stream": {
        # One server-sent event (as OpenAPI 3.2 describes them): `data` is the event's JSON
        # (its fields plus run_id, seq and ts); the leading `retry:` block carries no event.
        "schema": {
            "type": "object",
            "properties": {
                "id": {"type": "string", "pattern": "^[0-9]+$"},
                "event": {"type": "string"},
                "data": {"type": "string", "contentMediaType": "application/json"},
                "retry": {"type": "integer"},
            },
        },
        "example": 'retry: 2000\n\nid: 1\nevent: run.queued\ndata: {"chain": "demo", ...}\n\n',
    }
}


def _problem_responses(result, *statuses: int) -> dict:
    ref = {"$ref": "#/components/schemas/Problem"}
    return {
        str(s): {
            "description": "application/problem+json",
            "content": {"application/problem+json": {"schema": ref}},
        }
        for s in statuses
    }


def _events_filter() -> dict:
    from runs.events import EVENT_NAMES

    return {
        "name": "events",
        "in": "query",
        "description": "Comma-separated event names (" + ", ".join(EVENT_NAMES) + "): only these "
        "are sent, each with its own `seq`, so `after` and `Last-Event-ID` resume as without "
        "the filter. A stream still ends after the run's terminal event, even one filtered "
        "out. An unknown name is a 400 `validation_error`.",
        "schema": {"type": "string", "pattern": r"^[a-z_.]+(,[a-z_.]+)*$"},
    }


def add_stream_operations(result, generator, request, public):
    """The event and stream endpoints are async views outside DRF: document them here."""
    paths = result.setdefault("paths", {})
    run_id = {
        "name": "run_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "format": "uuid"},
    }
    paths["/api/v1/runs/{run_id}/events"] = {
        "get": {
            "operationId": "runs_events",
            "summary": "A run's events: a JSON page, or live SSE with Accept: text/event-stream",
            "description": "With `Accept: text/event-stream`: every stored event with seq > "
            "`after` (or `Last-Event-ID`), then live ones; `: ping` when idle; the stream ends "
            "after the terminal event. A browser's EventSource, which cannot send the key, "
            "authenticates the stream with `?ticket=` (POST /api/v1/stream-tickets).",
            "tags": ["runs"],
            "security": [{"apiKey": []}],
            "parameters": [
                run_id,
                {
                    "name": "after",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
                },
                {
                    "name": "limit",
                    "in": "query",
                    "description": "JSON page size.",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                },
                _events_filter(),
                {
                    "name": "ticket",
                    "in": "query",
                    "description": "A stream ticket for this run, instead of the key (SSE only; "
                    "the JSON page needs the key).",
                    "schema": {"type": "string"},
                },
                {
                    "name": "Last-Event-ID",
                    "in": "header",
                    "description": "SSE resume cursor (a seq); the JSON page ignores it.",
                    "schema": {"type": "string"},
                },
            ],
            "responses": {
                "200": {
                    "description": "The events.",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["results", "next_after"],
                                "properties": {
                                    "results": {"type": "array", "items": _EVENT},
                                    "next_after": {"type": "integer"},
                                },
                            }
                        },
                        **_SSE,
                    },
                },
                **_problem_responses(result, 400, 401, 404, 429, 503),
            },
        }
    }
    create = result["components"]["schemas"]["RunCreateInputRequest"]
    paths["/api/v1/chains/{name}/stream"] = {
        "post": {
            "operationId": "runs_stream",
            "summary": "Start a run and stream its events (SSE)",
            "tags": ["chains"],
            "security": [{"apiKey": []}],
            "parameters": [
                {
                    "name": "name",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "pattern": "^[-a-zA-Z0-9_]+$"},
                },
                _events_filter(),
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "minLength": 1, "maxLength": 257},
                    "description": "A repeated key streams the first request's run from seq 1.",
                },
            ],
            "requestBody": {
                "required": False,
                "content": {
                    "application/json": {
                        "schema": {
                            **create,
                            "properties": {
                                **create["properties"],
                                "cancel_on_disconnect": {"type": "boolean"},
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": {"description": "The run's events from seq 1.", "content": _SSE},
                **_problem_responses(result, 400, 401, 404, 409, 413, 415, 422, 429, 503),
            },
        }
    }
    return result


def _links(parameter: str, source: str, *operations: str) -> dict:
    return {
        op: {"operationId": op, "parameters": {parameter: f"$response.body#{source}"}}
        for op in operations
    }


_RUN_LINKS = _links(
    "run_id",
    "/run_id",
    "runs_retrieve",
    "runs_cancel",
    "runs_rerun",
    "runs_events",
    "runs_deliveries",
    "runs_webhooks_resend",
)
_LINKS = {
    ("runs_create", "202"): _RUN_LINKS,
    ("runs_rerun", "202"): _RUN_LINKS,
    ("runs_create_batch", "202"): _links(
        "run_id", "/results/0/run_id", "runs_retrieve", "runs_cancel", "runs_events"
    ),
    ("runs_invoke", "200"): _RUN_LINKS,
    ("runs_invoke", "202"): _RUN_LINKS,
    ("runs_cancel", "200"): _RUN_LINKS,
    ("runs_retrieve", "200"): _RUN_LINKS,
    ("webhook_endpoints_create", "201"): _links(
        "endpoint_id",
        "/id",
        "webhook_endpoints_retrieve",
        "webhook_endpoints_update",
        "webhook_endpoints_rotate_secret",
        "webhook_endpoints_delete",
    ),
    ("runs_deliveries", "200"): _links("delivery_id", "/results/0/id", "deliveries_resend"),
    ("runs_webhooks_resend", "202"): _links("delivery_id", "/results/0/id", "deliveries_resend"),
}


def add_links(result, generator, request, public):
    """OpenAPI links from what an answer holds to the calls it enables (a new run to its
    poll, cancel, events and deliveries; a new endpoint to its own calls): client generators
    and stateful testing follow them."""
    for item in result.get("paths", {}).values():
        for operation in item.values():
            for status, response in operation.get("responses", {}).items():
                links = _LINKS.get((operation.get("operationId"), status))
                if links:
                    response["links"] = links
    return result
