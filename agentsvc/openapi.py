"""OpenAPI pieces shared by every endpoint: the API key scheme, problem+json, common headers."""

from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse
from rest_framework import serializers

from agentsvc.idempotency import HEADER, STORED_STATUSES


class ApiKeyScheme(OpenApiAuthenticationExtension):
    """The key, in either header: two schemes, either of which authenticates a call."""

    target_class = "agentsvc.auth.ApiKeyAuthentication"
    name = ["apiKey", "apiKeyHeader"]

    def get_security_definition(self, auto_schema):
        return [
            {"type": "http", "scheme": "bearer", "description": "`Authorization: Bearer ak_...`"},
            {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "`ak_...`"},
        ]

    def get_security_requirement(self, auto_schema):
        return API_KEY


# The security requirement of every call that needs the key (either scheme).
API_KEY = [{"apiKey": []}, {"apiKeyHeader": []}]


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


# The policies a 429 names (agentsvc/limits.py, and the streams' cap in runs/sse.py).
VIOLATED_POLICIES = ("requests", "runs", "tokens", "active_runs", "streams")
# A member whose name is no Python name: declared beside the others.
ProblemSerializer._declared_fields["violated-policies"] = serializers.ListField(
    child=serializers.ChoiceField(VIOLATED_POLICIES),
    required=False,
    help_text="On 429: the limits the request went over (docs/api.md section 7).",
)


def problems(*statuses: int) -> dict[int, OpenApiResponse]:
    """Problem+json responses for the given statuses, plus those every API call may answer."""
    every = (400, 401, 413, 415, 429, 503)
    return {
        status: OpenApiResponse(ProblemSerializer, description="application/problem+json")
        for status in sorted({*statuses, *every})
    }


IDEMPOTENCY_KEY = OpenApiParameter(
    "Idempotency-Key",
    {"type": "string", "minLength": 1, "maxLength": 257, "pattern": "^[\\u0020-\\u007e]+$"},
    OpenApiParameter.HEADER,
    required=False,
    description="Retries with the same key and body get the first answer again "
    "(`Idempotent-Replayed: true`) and cause no second side effect. At most 255 printable ASCII "
    'characters (257 in the quoted form `"..."`).',
)

_HEADERS = {
    "RateLimit-Policy": 'The key\'s quotas, e.g. `"requests";q=600;w=60, "tokens";q=200000;w=60`.',
    "RateLimit": "What is left of the request quota and seconds until it resets: "
    '`"requests";r=512;t=41`.',
}


# (operation, status) -> what its Location header names.
_LOCATIONS = {
    ("runs_create", "202"): "The run: `/api/v1/runs/{id}`.",
    ("runs_invoke", "202"): "The run: `/api/v1/runs/{id}`.",
    ("runs_rerun", "202"): "The new run: `/api/v1/runs/{id}`.",
    ("webhook_endpoints_create", "201"): "The endpoint: `/api/v1/webhook-endpoints/{id}`.",
    ("schedules_create", "201"): "The schedule: `/api/v1/schedules/{id}`.",
}
_REPLAYED = {
    "schema": {"type": "string", "enum": ["true"]},
    "description": "`true` when this is the first answer to the same Idempotency-Key again.",
}


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
            idempotent = any(p.get("name") == HEADER for p in operation.get("parameters", []))
            for status, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                if status.startswith(("4", "5")) and "application/json" in content:
                    content["application/problem+json"] = content.pop("application/json")
                headers = response.setdefault("headers", {})
                for name, text in _HEADERS.items():
                    headers[name] = {"schema": {"type": "string"}, "description": text}
                location = _LOCATIONS.get((operation.get("operationId"), status))
                if location:
                    headers["Location"] = {"schema": {"type": "string"}, "description": location}
                if idempotent and (status.startswith("2") or int(status) in STORED_STATUSES):
                    headers["Idempotent-Replayed"] = _REPLAYED
                if status in ("409", "429", "503") or (status == "200" and "runs/{run_id}" in path):
                    headers["Retry-After"] = {
                        "schema": {"type": "integer"},
                        "description": "Seconds to wait before retrying "
                        "(on a run: before polling again).",
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
    "runs_input",
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
    ("runs_input", "202"): _RUN_LINKS,
    ("runs_retrieve", "200"): _RUN_LINKS,
    ("webhook_endpoints_create", "201"): _links(
        "endpoint_id",
        "/id",
        "webhook_endpoints_retrieve",
        "webhook_endpoints_update",
        "webhook_endpoints_rotate_secret",
        "webhook_endpoints_delete",
    ),
    ("schedules_create", "201"): _links(
        "schedule_id",
        "/schedule_id",
        "schedules_retrieve",
        "schedules_pause",
        "schedules_resume",
        "schedules_delete",
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


# The API's parts, one client module each (openapi-python-client, ...): by operation id.
TAGS = {
    "chains": "Published chains.",
    "runs": "Starting, reading, streaming and cancelling runs.",
    "webhooks": "Webhook endpoints and deliveries.",
    "streams": "Stream tickets for browsers.",
    "schedules": "Runs started on a cron or an interval.",
}
_TAG_OF = {
    "chains_": "chains",
    "runs_": "runs",
    "webhook_endpoints_": "webhooks",
    "deliveries_": "webhooks",
    "stream_tickets_": "streams",
    "schedules_": "schedules",
}


def add_tags(result, generator, request, public):
    """One tag per part of the API, whatever the path says (a run is started under
    /chains/{name}/, yet it is the runs' call)."""
    for item in result.get("paths", {}).values():
        for operation in item.values():
            op = operation.get("operationId", "")
            tag = next((t for prefix, t in _TAG_OF.items() if op.startswith(prefix)), None)
            if tag is not None:
                operation["tags"] = [tag]
    result["tags"] = [{"name": name, "description": text} for name, text in TAGS.items()]
    return result
