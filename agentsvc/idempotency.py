"""Idempotency keys (IETF httpapi idempotency-key-header, with Stripe's semantics).

The unique constraint on (owner, method, path, key) decides between parallel requests: one
inserts the record and does the work; the others see it and answer 409 while it is in progress,
422 if their body differs, or the stored answer once it is there.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import http_sf
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone
from rest_framework.response import Response

from agentsvc.errors import ApplicationError
from agentsvc.models import IdempotencyRecord, Owner

BODY_FIELD = "idempotency_key"
HEADER = "Idempotency-Key"
# Answers worth replaying: success, and the ends of runs that did happen (invoke's 502/504).
# Anything else (validation, limits, conflicts) is forgotten, so the client may retry the key.
STORED_STATUSES = frozenset({502, 504})
REPLAYED_HEADERS = ("Location", "Retry-After")


def _invalid(message: str) -> ApplicationError:
    return ApplicationError(
        "validation_error",
        "Invalid idempotency key.",
        errors=[{"field": HEADER, "message": message}],
    )


def parse_key(raw: str) -> str:
    """A key from the header: an RFC 8941 sf-string ("...") or, leniently, a bare value."""
    value = raw.strip()
    if value.startswith('"'):
        try:
            value, _params = http_sf.parse(value.encode(), tltype="item")
        except ValueError:
            raise _invalid("Not a valid quoted string.") from None
        if not isinstance(value, str):
            raise _invalid("Not a valid quoted string.")
    if not 1 <= len(value) <= 255:
        raise _invalid("Must be 1 to 255 characters.")
    if any(not 0x20 <= ord(ch) <= 0x7E for ch in value):
        raise _invalid("Must be printable ASCII.")
    return value


def request_key(headers, data: Any) -> str | None:
    """The key of a request: the header, or else the body field."""
    if HEADER in headers:
        return parse_key(headers[HEADER])
    if isinstance(data, dict) and BODY_FIELD in data:
        value = data[BODY_FIELD]
        if not isinstance(value, str):
            raise ApplicationError(
                "validation_error",
                "Invalid idempotency key.",
                errors=[{"field": BODY_FIELD, "message": "Must be a string."}],
            )
        return parse_key(value)
    return None


def fingerprint(data: Any, *, key_in_body: bool) -> str:
    """SHA-256 of the canonical JSON body; the key itself is left out when it came in the body."""
    if key_in_body and isinstance(data, dict):
        data = {k: v for k, v in data.items() if k != BODY_FIELD}
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


# What a retry is answered when the first request created its resource and died before
# answering: (body, Location). Registered by the app that owns the resource (runs: the run's
# handle).
_abandoned_answer: Callable[[IdempotencyRecord], tuple[dict, str]]


def abandoned_answer_register(answer: Callable[[IdempotencyRecord], tuple[dict, str]]) -> None:
    global _abandoned_answer
    _abandoned_answer = answer


def _replay(record: IdempotencyRecord) -> Response:
    if record.completed:
        headers = dict(record.response_headers)
        response = Response(
            record.response_body,
            status=record.response_status,
            content_type=headers.pop("Content-Type", None),
        )
        for name, value in headers.items():
            response[name] = value
    else:
        # Abandoned after creating its run (the process died before answering): point at the run.
        body, location = _abandoned_answer(record)
        response = Response(body, status=202)
        response["Location"] = location
    response["Idempotent-Replayed"] = "true"
    return response


def idempotency_begin(
    *, owner: Owner, method: str, path: str, key: str, fingerprint: str
) -> tuple[IdempotencyRecord | None, Response | None]:
    """(record to complete, None) for a new request; (None, replay) for a repeated one."""
    now = timezone.now()
    for _ in range(3):
        try:
            with transaction.atomic():
                record = IdempotencyRecord.objects.create(
                    owner=owner,
                    method=method,
                    path=path,
                    key=key,
                    fingerprint=fingerprint,
                    expires_at=now + timedelta(seconds=settings.IDEMPOTENCY_TTL_S),
                )
            return record, None
        except IntegrityError:
            pass
        record = (
            IdempotencyRecord.objects.select_related("run__chain")
            .filter(owner=owner, method=method, path=path, key=key)
            .first()
        )
        if record is None:
            continue  # deleted meanwhile: try to insert again
        if record.expires_at <= now:
            IdempotencyRecord.objects.filter(pk=record.pk).delete()
            continue
        if record.fingerprint != fingerprint:
            raise ApplicationError(
                "idempotency_key_reused",
                "This Idempotency-Key was used with a different request body.",
            )
        if record.completed:
            return None, _replay(record)
        abandoned = record.created_at < now - timedelta(seconds=settings.IDEMPOTENCY_LOCK_S)
        if abandoned and record.run_id is not None:
            return None, _replay(record)
        if abandoned:
            IdempotencyRecord.objects.filter(pk=record.pk, response_status=None).delete()
            continue
        raise ApplicationError(
            "idempotency_request_in_progress",
            "A request with this Idempotency-Key is still being answered.",
            headers={"Retry-After": "1"},
        )
    raise ApplicationError(
        "idempotency_request_in_progress",
        "A request with this Idempotency-Key is still being answered.",
        headers={"Retry-After": "1"},
    )


def idempotency_finish(*, record: IdempotencyRecord, response) -> None:
    """Store the answer for replay, or forget the key when the answer is not worth keeping."""
    status = response.status_code
    if status >= 400 and status not in STORED_STATUSES:
        idempotency_forget(record=record)
        return
    headers = {name: response[name] for name in REPLAYED_HEADERS if response.has_header(name)}
    if hasattr(response, "data"):  # a DRF Response, rendered as JSON later
        body = response.data
    else:  # a problem+json answer, already rendered
        body = json.loads(response.content)
        headers["Content-Type"] = response["Content-Type"]
    idempotency_store(record=record, status=status, body=body, headers=headers)


def idempotency_store(
    *, record: IdempotencyRecord, status: int, body: Any, headers: dict[str, str]
) -> None:
    IdempotencyRecord.objects.filter(pk=record.pk).update(
        response_status=status, response_body=body, response_headers=headers
    )


def idempotency_forget(*, record: IdempotencyRecord) -> None:
    """The request changed nothing: the key may be used again."""
    IdempotencyRecord.objects.filter(pk=record.pk).delete()


def idempotency_purge() -> int:
    return IdempotencyRecord.objects.filter(expires_at__lte=timezone.now()).delete()[0]


class _Replay(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


class IdempotentMixin:
    """For POST views: the first answer to a key is kept and replayed (docs/api.md section 8)."""

    idempotency: IdempotencyRecord | None = None

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)
        self.idempotency = None
        if request.method != "POST":
            return
        key = request_key(request.headers, request.data)
        if key is None:
            return
        record, replay = idempotency_begin(
            owner=request.user,
            method=request.method,
            path=request.path,
            key=key,
            fingerprint=fingerprint(request.data, key_in_body=HEADER not in request.headers),
        )
        if replay is not None:
            raise _Replay(replay)
        self.idempotency = record

    def handle_exception(self, exc):
        if isinstance(exc, _Replay):
            return exc.response
        return super().handle_exception(exc)

    def finalize_response(self, request, response, *args, **kwargs):
        response = super().finalize_response(request, response, *args, **kwargs)
        if self.idempotency is not None:
            idempotency_finish(record=self.idempotency, response=response)
            self.idempotency = None
        return response
