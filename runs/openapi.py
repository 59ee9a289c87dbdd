"""The OpenAPI document's run event and stream operations: async views outside DRF, added by a
drf-spectacular postprocessing hook (SPECTACULAR_SETTINGS in agentsvc/settings.py)."""

from __future__ import annotations

from agentsvc.openapi import API_KEY, IDEMPOTENCY_KEY
from runs.events import EVENT_NAMES

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
        # The body is text: a sequence of server-sent events. `itemSchema` (OpenAPI 3.2, which
        # tools read in 3.1 documents too) describes each event; `schema`, the whole body, states
        # no type, so that it holds both for 3.1 readers (the body: text, what generated
        # clients hand back) and for those that read a stream as the list of its events (3.2).
        "schema": {
            "description": "Server-sent events (each one: itemSchema): `retry: <ms>`, then for "
            "each event `id: <seq>`, `event: <type>` and `data: <JSON>` lines ending with a "
            "blank line; `: ping` comments when idle. Read it with an SSE client."
        },
        "itemSchema": {
            "type": "object",
            "properties": {
                "id": {"type": "string", "pattern": "^[0-9]+$"},
                "event": {"type": "string"},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "description": "The event's JSON: its fields, run_id, seq and ts.",
                },
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
            "after the terminal event. Reconnecting to an ended run's stream with nothing left "
            "after the cursor (its terminal seq) answers 204, which stops an EventSource "
            "reconnecting. A browser's EventSource, which cannot send the key, authenticates "
            "the stream with `?ticket=` (POST /api/v1/stream-tickets). An Accept header that "
            "admits neither JSON nor the stream: 406.",
            "security": API_KEY,
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
                "204": {
                    "description": "SSE only: the run has ended and nothing (of `events`, with "
                    "a filter) is left after the cursor; do not reconnect."
                },
                **_problem_responses(result, 400, 401, 404, 406, 429, 503),
            },
        }
    }
    create = result["components"]["schemas"]["RunCreateInputRequest"]
    paths["/api/v1/chains/{name}/stream"] = {
        "post": {
            "operationId": "runs_stream",
            "summary": "Start a run and stream its events (SSE)",
            "security": API_KEY,
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
                    "schema": IDEMPOTENCY_KEY.type,
                    "description": "A repeated key streams the first request's run from seq 1 "
                    "(`Idempotent-Replayed: true`). At most 255 printable ASCII characters (257 "
                    'in the quoted form `"..."`).',
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
