"""Writes on deliveries: messages at a run's end, attempts, sweeps, resends."""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from agentsvc import logs, tracing
from agentsvc.errors import ApplicationError
from runs.events import RUN_INPUT_REQUIRED
from runs.models import TERMINAL_EVENTS, Run
from runs.presenters import input_request_dict, run_output
from runs.timefmt import iso
from webhooks import delivery as http
from webhooks.models import (
    ENDPOINT_DISABLED,
    WEBHOOK_TEST,
    DeliveryStatus,
    Trigger,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookMessage,
)
from webhooks.recording import attempt_record
from webhooks.ssrf import BlockedAddress, check_url

logger = logging.getLogger(__name__)


def _lease_s() -> float:
    """How long a claimed attempt may take before the sweep hands it to someone else."""
    return 3 * settings.WEBHOOK_TIMEOUT_S + 60


# Set by the delivery pump of this process (webhooks/pump.py), if it runs one: new deliveries
# written here are attempted at once rather than at the pump's next poll.
_wake: Callable[[], None] | None = None


def deliveries_wake() -> None:
    """After commit of new or resent deliveries: wake this process's pump (others poll)."""
    if _wake is not None:
        _wake()


def pump_register(wake: Callable[[], None] | None) -> None:
    global _wake
    _wake = wake


# --- Messages ---------------------------------------------------------------------------------


def _payload(*, run: Run, event: str, seq: int, msg_id: str, now: datetime) -> dict[str, Any]:
    duration_ms = None
    if run.started_at and run.finished_at:
        duration_ms = int((run.finished_at - run.started_at).total_seconds() * 1000)
    # A request for input tells its subscriber what to answer (POST /runs/{id}/input).
    request = {"input_request": input_request_dict(run)} if event == RUN_INPUT_REQUIRED else {}
    return {
        "type": event,
        "id": msg_id,
        "timestamp": iso(now),
        "data": {
            "run_id": str(run.id),
            "chain": run.chain.name,
            "version": run.chain.version,
            "status": run.status,
            "output": run_output(run),
            "error": (
                {"code": run.error_code, "message": run.error_message} if run.error_code else None
            ),
            "usage": {
                "input_tokens": run.input_tokens,
                "output_tokens": run.output_tokens,
                "total_tokens": run.input_tokens + run.output_tokens,
            },
            "cost": f"{run.cost:.6f}",
            "duration_ms": duration_ms,
            "started_at": iso(run.started_at),
            "finished_at": iso(run.finished_at),
            "metadata": run.metadata,
            "seq": seq,
            **request,
        },
    }


def _targets(
    *, run: Run, event: str, endpoints: list[WebhookEndpoint] | None = None
) -> list[tuple[WebhookEndpoint | None, str]]:
    """The run's own webhook and every enabled endpoint of the owner subscribed to `event`
    (`endpoints`: the owner's enabled endpoints, when the caller has them already)."""
    targets: list[tuple[WebhookEndpoint | None, str]] = []
    if run.webhook_url and event in (run.webhook_events or TERMINAL_EVENTS):
        targets.append((None, run.webhook_url))
    if endpoints is None:
        endpoints = list(WebhookEndpoint.objects.filter(owner_id=run.owner_id, enabled=True))
    for endpoint in endpoints:
        if event in endpoint.events:
            targets.append((endpoint, endpoint.url))
    return targets


def messages_create_for_events(*, events: list[tuple[UUID, str, int, datetime]]) -> None:
    """Called by `runs.services.events_write` inside the transaction of the events a webhook may
    subscribe to (run, event, seq, time), so a message exists if and only if its event does;
    this process's delivery pump is woken on commit. Three queries and two inserts for any
    number of runs."""
    runs = Run.objects.select_related("chain").in_bulk([run_id for run_id, _, _, _ in events])
    endpoints: dict[int, list[WebhookEndpoint]] = {}
    owners = {run.owner_id for run in runs.values()}
    for endpoint in WebhookEndpoint.objects.filter(owner_id__in=owners, enabled=True):
        endpoints.setdefault(endpoint.owner_id, []).append(endpoint)
    messages: list[WebhookMessage] = []
    deliveries: list[WebhookDelivery] = []
    for run_id, event, seq, now in events:
        run = runs[run_id]
        targets = _targets(run=run, event=event, endpoints=endpoints.get(run.owner_id, []))
        if not targets:
            continue
        msg_id = WebhookMessage.new_id()
        message = WebhookMessage(
            id=msg_id,
            run=run,
            event_type=event,
            seq=seq,
            payload=_payload(run=run, event=event, seq=seq, msg_id=msg_id, now=now),
            created_at=now,
        )
        messages.append(message)
        deliveries += [
            WebhookDelivery(message=message, endpoint=endpoint, url=url, next_attempt_at=now)
            for endpoint, url in targets
        ]
    if not messages:
        return
    WebhookMessage.objects.bulk_create(messages)
    WebhookDelivery.objects.bulk_create(deliveries)
    transaction.on_commit(deliveries_wake)


# --- Attempts ---------------------------------------------------------------------------------


def _claim(*, delivery_id: UUID | str, token: UUID | str | None) -> UUID | None:
    """Take the lease on a due delivery (or renew the sweep's); exactly one caller wins."""
    now = timezone.now()
    new_token = uuid.uuid4()
    rows = WebhookDelivery.objects.filter(pk=delivery_id, status=DeliveryStatus.PENDING)
    rows = rows.filter(claim_token=token) if token else rows.filter(next_attempt_at__lte=now)
    updated = rows.update(
        next_attempt_at=now + timedelta(seconds=_lease_s()), claim_token=new_token
    )
    return new_token if updated else None


def _secrets(delivery: WebhookDelivery, now: datetime) -> list[str]:
    endpoint = delivery.endpoint
    if endpoint is None:
        return [delivery.message.run.webhook_secret]
    found = [endpoint.secret]
    expires = endpoint.previous_secret_expires_at
    if endpoint.previous_secret and expires and expires > now:
        found.append(endpoint.previous_secret)
    return found


def _next_delay(auto_attempts: int, retry_after_s: float | None) -> float | None:
    """Seconds until the next automatic attempt, or None when the schedule is spent."""
    schedule = settings.WEBHOOK_RETRY_SCHEDULE_S
    if auto_attempts > len(schedule):
        return None
    if retry_after_s is not None:
        return retry_after_s
    base = schedule[max(auto_attempts, 1) - 1]
    return base * random.uniform(0.8, 1.2)


def _endpoint_after(endpoint: WebhookEndpoint, outcome: http.Outcome, now: datetime) -> None:
    """The endpoint's health: last error, failing since, disabled on 410 or after failing for
    WEBHOOK_DISABLE_AFTER_S without a success."""
    endpoints = WebhookEndpoint.objects.filter(pk=endpoint.pk)
    if outcome.ok:
        if endpoint.failing_since or endpoint.last_error:
            endpoints.update(failing_since=None, last_error="")
        return
    endpoints.update(last_error=outcome.tenant_error[:500])  # the API shows it to the tenant
    endpoints.filter(failing_since__isnull=True).update(failing_since=now)
    if outcome.status_code == 410:
        endpoint_disable_automatically(
            endpoint_id=endpoint.pk, reason="The receiver answered 410 Gone.", now=now
        )
    else:
        cutoff = now - timedelta(seconds=settings.WEBHOOK_DISABLE_AFTER_S)
        endpoint_disable_automatically(
            endpoint_id=endpoint.pk,
            reason="Failing for too long without a success.",
            now=now,
            failing_before=cutoff,
        )


def endpoint_disable_automatically(
    *, endpoint_id: UUID, reason: str, now: datetime, failing_before: datetime | None = None
) -> bool:
    """Disable an enabled endpoint (failing since before `failing_before`, when given) and, in
    the same transaction, send `endpoint.disabled` to the owner's other enabled endpoints. The
    conditional UPDATE decides: of two attempts that fail at once, one disables and tells."""
    rows = WebhookEndpoint.objects.filter(pk=endpoint_id, enabled=True)
    if failing_before is not None:
        rows = rows.filter(failing_since__lte=failing_before)
    with transaction.atomic():
        if not rows.update(enabled=False, disabled_reason=reason, disabled_at=now, updated_at=now):
            return False
        endpoint = WebhookEndpoint.objects.get(pk=endpoint_id)
        others = list(
            WebhookEndpoint.objects.filter(owner_id=endpoint.owner_id, enabled=True).exclude(
                pk=endpoint_id
            )
        )
        if others:
            msg_id = WebhookMessage.new_id()
            message = WebhookMessage.objects.create(
                id=msg_id,
                run=None,
                event_type=ENDPOINT_DISABLED,
                seq=0,
                payload={
                    "type": ENDPOINT_DISABLED,
                    "id": msg_id,
                    "timestamp": iso(now),
                    "data": {
                        "endpoint_id": str(endpoint.id),
                        "url": endpoint.url,
                        "reason": reason,
                        "failing_since": iso(endpoint.failing_since),
                        "disabled_at": iso(now),
                        "last_error": endpoint.last_error or None,
                    },
                },
                created_at=now,
            )
            WebhookDelivery.objects.bulk_create(
                WebhookDelivery(message=message, endpoint=other, url=other.url, next_attempt_at=now)
                for other in others
            )
            transaction.on_commit(deliveries_wake)
    logger.warning(
        "webhook endpoint %s disabled: %s (%s other endpoint(s) told)",
        endpoint_id,
        reason,
        len(others),
    )
    return True


def delivery_attempt(*, delivery_id: UUID | str, token: UUID | str | None = None) -> bool:
    """Claim a due delivery, send it once, record the attempt. Returns False if not ours."""
    claim = _claim(delivery_id=delivery_id, token=token)
    if claim is None:
        return False
    delivery = WebhookDelivery.objects.select_related("message__run", "endpoint").get(
        pk=delivery_id
    )
    run = delivery.message.run  # None for an endpoint's test event
    run_id = str(run.id) if run is not None else ""
    # The run's log lines, and a span in the trace of the request that created it.
    with (
        logs.log_context(run_id=run_id or None, key_prefix=None),
        tracing.tracer().start_as_current_span(
            "webhook.attempt",
            context=tracing.parent_context(run.trace_parent if run is not None else ""),
            kind=SpanKind.CLIENT,
            attributes={
                "agentsvc.run_id": run_id,
                "agentsvc.webhook.id": delivery.message.id,
                "agentsvc.webhook.event": delivery.message.event_type,
                "agentsvc.webhook.attempt": delivery.attempt_count + 1,
            },
        ) as span,
    ):
        return _delivery_send(delivery=delivery, claim=claim, span=span)


def _delivery_send(*, delivery: WebhookDelivery, claim: UUID, span: Span) -> bool:
    now = timezone.now()
    trigger = delivery.next_trigger
    endpoint = delivery.endpoint
    if endpoint is not None and not endpoint.enabled and trigger == Trigger.AUTO:
        WebhookDelivery.objects.filter(pk=delivery.pk, claim_token=claim).update(
            status=DeliveryStatus.FAILED,
            next_attempt_at=None,
            claim_token=None,
            last_error="endpoint_disabled",
        )
        span.set_attribute("agentsvc.webhook.skipped", "endpoint_disabled")
        return True
    message = delivery.message
    # An endpoint's retries follow it when its URL is changed.
    url = endpoint.url if endpoint is not None else delivery.url
    if not connection.in_atomic_block:
        connection.close()  # back to the pool while the receiver takes its time
    outcome = http.attempt(
        url=url,
        msg_id=message.id,
        body=http.body_bytes(message.payload),
        secrets=_secrets(delivery, now),
    )
    span.set_attribute("server.address", urlsplit(url).hostname or "")
    if outcome.status_code is not None:
        span.set_attribute("http.response.status_code", outcome.status_code)
    if not outcome.ok:
        span.set_status(Status(StatusCode.ERROR, outcome.error.partition(":")[0]))
    auto_attempts = delivery.auto_attempt_count + (trigger == Trigger.AUTO)
    status, next_at = DeliveryStatus.PENDING, None
    if outcome.ok:
        status = DeliveryStatus.SUCCEEDED
    elif outcome.permanent or (delay := _next_delay(auto_attempts, outcome.retry_after_s)) is None:
        status = DeliveryStatus.FAILED
    else:
        next_at = timezone.now() + timedelta(seconds=delay)
    recorded = attempt_record(
        delivery_id=delivery.pk,
        claim=claim,
        delivery={
            "url": url,
            "status": status,
            "next_attempt_at": next_at,
            "next_trigger": Trigger.AUTO,
            "auto_attempt_count": auto_attempts,
            "last_status_code": outcome.status_code,
            "last_error": outcome.error[:500],
            "last_duration_ms": outcome.duration_ms,
        },
        attempt={
            "at": now,
            "status_code": outcome.status_code,
            "duration_ms": outcome.duration_ms,
            "error": outcome.error[:500],
            "response_excerpt": outcome.excerpt[:1000],
            "private_target": outcome.private_target,
            "trigger": trigger,
        },
    )
    if not recorded:
        logger.warning("delivery %s: lease lost during the attempt", delivery.pk)
        return False
    logger.debug(
        "delivery %s: attempt %s of message %s: %s",
        delivery.pk,
        delivery.attempt_count + 1,
        message.id,
        outcome.status_code or outcome.error.partition(":")[0],
    )
    if endpoint is not None:
        _endpoint_after(endpoint, outcome, now)
    return True


def deliveries_claim_due(*, limit: int) -> tuple[list[UUID], UUID | None]:
    """Claim up to `limit` deliveries whose attempt is due (first attempts, retries, resends,
    and leases of a dead process run out), oldest due first, skipping rows a peer is claiming.
    Returns their ids and the claim token that `delivery_attempt` takes."""
    now = timezone.now()
    token = uuid.uuid4()
    with transaction.atomic():
        due = WebhookDelivery.objects.select_for_update(skip_locked=True).filter(
            status=DeliveryStatus.PENDING, next_attempt_at__lte=now
        )
        ids = list(due.order_by("next_attempt_at").values_list("id", flat=True)[:limit])
        if not ids:
            return [], None
        WebhookDelivery.objects.filter(id__in=ids).update(
            next_attempt_at=now + timedelta(seconds=_lease_s()), claim_token=token
        )
    return ids, token


# --- Resends ----------------------------------------------------------------------------------


def delivery_resend(*, delivery: WebhookDelivery) -> WebhookDelivery:
    """Send the same message again now (same webhook-id, new timestamp and signature).

    An attempt already under way is left to finish rather than doubled.
    """
    try:
        check_url(delivery.endpoint.url if delivery.endpoint_id else delivery.url)
    except BlockedAddress as e:
        raise ApplicationError(
            "validation_error",
            "The delivery's URL is refused.",
            errors=[{"field": "url", "message": str(e)}],
        ) from None
    now = timezone.now()
    with transaction.atomic():
        updated = (
            WebhookDelivery.objects.filter(pk=delivery.pk)
            .exclude(status=DeliveryStatus.PENDING, claim_token__isnull=False)
            .update(
                status=DeliveryStatus.PENDING,
                next_attempt_at=now,
                next_trigger=Trigger.MANUAL,
                claim_token=None,
            )
        )
        if updated:
            transaction.on_commit(deliveries_wake)
    delivery.refresh_from_db()
    return delivery


def run_webhooks_resend(*, run: Run) -> list[WebhookDelivery]:
    """Resend a run's terminal event to all its targets, adding targets registered since."""
    if not run.is_terminal:
        raise ApplicationError("run_not_finished", "The run has not ended yet.", run_id=str(run.id))
    event = f"run.{run.status}"
    now = timezone.now()
    with transaction.atomic():
        message = (
            WebhookMessage.objects.filter(run=run, event_type__in=TERMINAL_EVENTS)
            .order_by("-seq")
            .first()
        )
        if message is None:
            seq = run.last_seq
            messages_create_for_events(events=[(run.id, event, seq, now)])
            return list(WebhookDelivery.objects.filter(message__run=run).order_by("created_at"))
        existing = {d.endpoint_id: d for d in message.deliveries.select_related("endpoint")}
        new = [
            WebhookDelivery(message=message, endpoint=endpoint, url=url, next_attempt_at=now)
            for endpoint, url in _targets(run=run, event=message.event_type)
            if (endpoint.pk if endpoint else None) not in existing
        ]
        if WebhookDelivery.objects.bulk_create(new):
            transaction.on_commit(deliveries_wake)
    for d in existing.values():
        if d.endpoint_id is None or d.endpoint.enabled:
            try:
                delivery_resend(delivery=d)
            except ApplicationError:
                continue  # its URL is refused now; the others still go
    return list(message.deliveries.order_by("created_at"))


# --- Endpoint tools: a test event, and recovery of failed deliveries --------------------------


def _url_or_400(url: str) -> None:
    try:
        check_url(url)
    except BlockedAddress as e:
        raise ApplicationError(
            "validation_error",
            "The endpoint's URL is refused.",
            errors=[{"field": "url", "message": str(e)}],
        ) from None


def endpoint_test(*, endpoint: WebhookEndpoint) -> WebhookDelivery:
    """Send a signed `webhook.test` message to the endpoint now (whatever events it subscribes
    to, and even while it is disabled: a manual attempt), retried like any delivery.

    Its message has no run, so no run's deliveries list shows it."""
    _url_or_400(endpoint.url)
    now = timezone.now()
    msg_id = WebhookMessage.new_id()
    with transaction.atomic():
        message = WebhookMessage.objects.create(
            id=msg_id,
            run=None,
            event_type=WEBHOOK_TEST,
            seq=0,
            payload={
                "type": WEBHOOK_TEST,
                "id": msg_id,
                "timestamp": iso(now),
                "data": {"endpoint_id": str(endpoint.id), "url": endpoint.url},
            },
            created_at=now,
        )
        delivery = WebhookDelivery.objects.create(
            message=message,
            endpoint=endpoint,
            url=endpoint.url,
            next_attempt_at=now,
            next_trigger=Trigger.MANUAL,
        )
        transaction.on_commit(deliveries_wake)
    return delivery


def endpoint_recover(
    *, endpoint: WebhookEndpoint, since: datetime, until: datetime | None = None
) -> list[UUID]:
    """Resend now every failed delivery of the endpoint created in [since, until] (the same
    webhook-ids, new timestamps and signatures); returns their ids, oldest first."""
    _url_or_400(endpoint.url)
    now = timezone.now()
    with transaction.atomic():
        failed = WebhookDelivery.objects.filter(
            endpoint=endpoint, status=DeliveryStatus.FAILED, created_at__gte=since
        )
        if until is not None:
            failed = failed.filter(created_at__lte=until)
        ids = list(
            failed.select_for_update().order_by("created_at", "id").values_list("id", flat=True)
        )
        WebhookDelivery.objects.filter(id__in=ids).update(
            status=DeliveryStatus.PENDING,
            next_attempt_at=now,
            next_trigger=Trigger.MANUAL,
            claim_token=None,
        )
        if ids:
            transaction.on_commit(deliveries_wake)
    return ids
