"""Webhook delivery against a real local receiver: signing, retries, resends, endpoint health."""

from __future__ import annotations

import json
import threading
from datetime import timedelta

import pytest
from django.db import connection, connections, transaction
from django.utils import timezone
from standardwebhooks import Webhook

from runs.models import RunStatus
from runs.services import run_cancel, run_create
from tests.conftest import wait_until
from tests.webhook_support import SECRET, deliver_all, finished_run, hook_path
from webhooks.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookMessage
from webhooks.services import (
    deliveries_claim_due,
    delivery_attempt,
    endpoint_create,
    endpoint_delete,
    endpoint_rotate_secret,
)
from webhooks.services.deliveries import _claim, endpoint_disable_automatically

pytestmark = pytest.mark.usefixtures("local_ok")

ALL = ["run.completed", "run.failed", "run.cancelled", "run.timed_out"]


def own(receiver, path: str, events=None) -> dict:
    hook = {"url": receiver.base_url + path, "secret": SECRET}
    if events is not None:
        hook["events"] = events
    return hook


def verify(secret: str, request) -> dict:
    return Webhook(secret).verify(request.body, request.headers)


def patch(api, path: str, body: dict):
    return api.client.patch(
        path, json.dumps(body), content_type="application/json", headers=api._headers(None)
    )


def test_signed_delivery_verifies_with_standardwebhooks(alice, make_chain, receiver):
    path = hook_path()
    run = finished_run(alice, make_chain, webhook=own(receiver, path))
    deliver_all()
    [request] = receiver.requests_for(path)
    payload = verify(SECRET, request)
    assert request.headers["Content-Type"] == "application/json"
    assert payload["type"] == "run.completed"
    assert payload["id"] == request.headers["webhook-id"]
    assert payload["id"].startswith("msg_")
    data = payload["data"]
    assert data["run_id"] == str(run.id) and data["status"] == "completed"
    assert data["output"] == run.output and data["metadata"] == {"customer": "c1"}
    assert data["chain"] == "demo" and data["version"] == 1
    assert data["usage"]["output_tokens"] == 3 and data["seq"] == run.last_seq
    assert set(data) >= {"error", "cost", "duration_ms", "started_at", "finished_at"}
    response = alice.get(f"/api/v1/runs/{run.id}/deliveries").json()
    [delivery] = response["results"]
    assert delivery["status"] == "succeeded" and delivery["next_attempt_at"] is None
    assert delivery["event"] == "run.completed" and delivery["url"].endswith(path)
    [attempt] = delivery["attempts"]
    assert attempt["number"] == 1 and attempt["status_code"] == 200
    assert attempt["trigger"] == "auto"
    # The receiver is on loopback: its answer is kept for operators, not shown to the tenant.
    assert attempt["response_excerpt"] == ""
    assert WebhookAttempt.objects.get().response_excerpt == "received 1"
    assert "secret" not in json.dumps(response)


def test_retries_after_failures_keep_the_same_id(alice, make_chain, receiver):
    path = hook_path(fail_times=3, fail_status=500)
    run = finished_run(alice, make_chain, webhook=own(receiver, path))
    deliver_all()
    requests = receiver.requests_for(path)
    assert len(requests) == 4
    assert len({r.headers["webhook-id"] for r in requests}) == 1
    for request in requests:
        verify(SECRET, request)
    attempts = WebhookAttempt.objects.order_by("number")
    assert [a.status_code for a in attempts] == [500, 500, 500, 200]
    assert attempts[0].error == "http_500"
    [delivery] = alice.get(f"/api/v1/runs/{run.id}/deliveries").json()["results"]
    assert delivery["status"] == "succeeded"
    assert [a["number"] for a in delivery["attempts"]] == [1, 2, 3, 4]
    # The receiver is on loopback: the tenant sees one error class for its failures.
    assert [a["status_code"] for a in delivery["attempts"]] == [None, None, None, 200]
    assert delivery["attempts"][0]["error"] == "private_target_error"


def test_delivery_fails_when_the_schedule_is_spent(alice, make_chain, receiver):
    path = hook_path(status=500)
    run = finished_run(alice, make_chain, webhook=own(receiver, path))
    deliver_all()
    # The first attempt and one per step of the (shortened) schedule.
    assert len(receiver.requests_for(path)) == 4
    [delivery] = alice.get(f"/api/v1/runs/{run.id}/deliveries").json()["results"]
    assert delivery["status"] == "failed" and delivery["next_attempt_at"] is None


def test_events_are_filtered_per_target(alice, make_chain, receiver):
    failed_only = hook_path()
    everything = hook_path()
    own_failed = hook_path()
    endpoint_create(
        owner=alice.key.owner, url=receiver.base_url + failed_only, events=["run.failed"]
    )
    endpoint_create(owner=alice.key.owner, url=receiver.base_url + everything, events=ALL)
    finished_run(alice, make_chain, webhook=own(receiver, own_failed, ["run.failed"]))
    deliver_all()
    assert receiver.requests_for(failed_only) == [] and receiver.requests_for(own_failed) == []
    assert len(receiver.requests_for(everything)) == 1
    # A failing run reaches all three.
    finished_run(alice, make_chain, webhook=own(receiver, own_failed, ["run.failed"]), fail=401)
    deliver_all()
    for path in (failed_only, everything, own_failed):
        assert (
            receiver.requests_for(path)[-1].headers
            and json.loads(receiver.requests_for(path)[-1].body)["type"] == "run.failed"
        )


def test_other_owners_endpoints_get_nothing(alice, bob, make_chain, receiver):
    path = hook_path()
    endpoint_create(owner=bob.key.owner, url=receiver.base_url + path, events=ALL)
    finished_run(alice, make_chain)
    deliver_all()
    assert receiver.requests_for(path) == []


def test_rotation_sends_both_signatures_for_a_day(alice, make_chain, receiver):
    path = hook_path()
    endpoint = endpoint_create(owner=alice.key.owner, url=receiver.base_url + path, events=ALL)
    old = endpoint.secret
    new = endpoint_rotate_secret(endpoint=endpoint).secret
    assert new != old
    finished_run(alice, make_chain)
    deliver_all()
    [request] = receiver.requests_for(path)
    signatures = request.headers["webhook-signature"].split(" ")
    assert len(signatures) == 2 and all(s.startswith("v1,") for s in signatures)
    verify(old, request)
    verify(new, request)
    # After 24 h only the new secret signs.
    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(
        previous_secret_expires_at=timezone.now() - timedelta(seconds=1)
    )
    finished_run(alice, make_chain)
    deliver_all()
    latest = receiver.requests_for(path)[-1]
    assert len(latest.headers["webhook-signature"].split(" ")) == 1
    verify(new, latest)


def test_410_disables_the_endpoint(alice, make_chain, receiver):
    path = hook_path(status=410)
    endpoint = endpoint_create(owner=alice.key.owner, url=receiver.base_url + path, events=ALL)
    run = finished_run(alice, make_chain)
    deliver_all()
    assert len(receiver.requests_for(path)) == 1
    endpoint.refresh_from_db()
    assert not endpoint.enabled and "410" in endpoint.disabled_reason
    assert WebhookAttempt.objects.get().error == "gone"
    assert endpoint.last_error == "private_target_error"  # loopback: what the tenant sees
    [delivery] = alice.get(f"/api/v1/runs/{run.id}/deliveries").json()["results"]
    assert delivery["status"] == "failed"
    shown = alice.get(f"/api/v1/webhook-endpoints/{endpoint.id}").json()
    assert shown["enabled"] is False and shown["disabled_reason"]
    finished_run(alice, make_chain)
    deliver_all()
    assert len(receiver.requests_for(path)) == 1


def test_redirect_is_a_failure_and_not_followed(alice, make_chain, receiver):
    path = hook_path(redirect=1)
    run = finished_run(alice, make_chain, webhook=own(receiver, path))
    deliver_all()
    assert len(receiver.requests_for(path)) == 4
    assert receiver.requests_for("/ok") == []
    first = WebhookAttempt.objects.get(number=1)
    assert first.status_code == 302 and first.error.startswith("redirect_not_followed")
    [delivery] = alice.get(f"/api/v1/runs/{run.id}/deliveries").json()["results"]
    assert delivery["status"] == "failed" and len(delivery["attempts"]) == 4


def test_retry_after_is_honoured(alice, make_chain, receiver):
    path = hook_path(status=503, retry_after=120)
    finished_run(alice, make_chain, webhook=own(receiver, path))
    delivery = WebhookDelivery.objects.get()
    before = timezone.now()
    delivery_attempt(delivery_id=delivery.id)
    delivery.refresh_from_db()
    assert delivery.status == "pending" and delivery.last_status_code == 503
    wait = (delivery.next_attempt_at - before).total_seconds()
    assert 100 < wait < 140  # not the 0.05 s of the schedule


def test_endpoint_failing_for_five_days_is_disabled(alice, make_chain, receiver):
    path = hook_path(status=500)
    endpoint = endpoint_create(owner=alice.key.owner, url=receiver.base_url + path, events=ALL)
    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(
        failing_since=timezone.now() - timedelta(days=5, minutes=1)
    )
    finished_run(alice, make_chain)
    delivery_attempt(delivery_id=WebhookDelivery.objects.get().id)
    endpoint.refresh_from_db()
    assert not endpoint.enabled and endpoint.disabled_reason
    assert endpoint.last_error == "private_target_error" and endpoint.disabled_at  # loopback
    assert WebhookAttempt.objects.get().error == "http_500"


def test_a_disabled_endpoint_is_announced_to_the_owners_other_endpoints(
    alice, bob, make_chain, receiver, settings
):
    """endpoint.disabled, signed with each receiving endpoint's secret, to every other enabled
    endpoint of the owner (whatever events it takes), not to the disabled one nor to another
    owner's; the API shows when, and re-enabling through it delivers again."""
    settings.WEBHOOK_DISABLE_AFTER_S = 3600
    failing_path = hook_path(status=500)
    other_path, quiet_path, off_path, bobs_path = (hook_path() for _ in range(4))
    owner = alice.key.owner
    failing = endpoint_create(owner=owner, url=receiver.base_url + failing_path, events=ALL)
    other = endpoint_create(owner=owner, url=receiver.base_url + other_path, events=ALL)
    quiet = endpoint_create(owner=owner, url=receiver.base_url + quiet_path, events=["run.failed"])
    off = endpoint_create(owner=owner, url=receiver.base_url + off_path, events=ALL)
    WebhookEndpoint.objects.filter(pk=off.pk).update(enabled=False)
    endpoint_create(owner=bob.key.owner, url=receiver.base_url + bobs_path, events=ALL)
    since = timezone.now() - timedelta(hours=1, seconds=1)
    WebhookEndpoint.objects.filter(pk=failing.pk).update(failing_since=since)

    finished_run(alice, make_chain)
    deliver_all()
    failing.refresh_from_db()
    assert not failing.enabled
    assert failing.disabled_reason == "Failing for too long without a success."
    shown = alice.get(f"/api/v1/webhook-endpoints/{failing.id}").json()
    assert shown["enabled"] is False and shown["disabled_at"] and shown["failing_since"]

    [announced] = [r for r in receiver.requests_for(other_path) if b"endpoint.disabled" in r.body]
    payload = verify(other.secret, announced)
    assert payload["type"] == "endpoint.disabled" and payload["id"].startswith("msg_")
    assert payload["data"] == {
        "endpoint_id": str(failing.id),
        "url": failing.url,
        "reason": "Failing for too long without a success.",
        "failing_since": shown["failing_since"],
        "disabled_at": shown["disabled_at"],
        "last_error": "private_target_error",
    }
    [to_quiet] = receiver.requests_for(quiet_path)  # it takes no run.completed, but this
    assert verify(quiet.secret, to_quiet)["type"] == "endpoint.disabled"
    assert not [r for r in receiver.requests_for(failing_path) if b"endpoint.disabled" in r.body]
    assert receiver.requests_for(off_path) == []
    assert receiver.requests_for(bobs_path) == []  # bob's runs did not end; nor did his endpoint
    assert WebhookMessage.objects.filter(event_type="endpoint.disabled").count() == 1

    # Re-enabled through the API: enabled, no reason, no failing clock, and delivered again.
    response = patch(alice, f"/api/v1/webhook-endpoints/{failing.id}", {"enabled": True})
    assert response.status_code == 200
    body = response.json()
    assert body["enabled"] is True and body["disabled_reason"] is None
    assert body["disabled_at"] is None and body["failing_since"] is None
    before = len(receiver.requests_for(failing_path))
    finished_run(alice, make_chain)
    deliver_all()
    assert len(receiver.requests_for(failing_path)) > before


def test_a_410_is_announced_too_and_only_once(alice, make_chain, receiver):
    gone_path, other_path = hook_path(status=410), hook_path()
    owner = alice.key.owner
    gone = endpoint_create(owner=owner, url=receiver.base_url + gone_path, events=ALL)
    endpoint_create(owner=owner, url=receiver.base_url + other_path, events=ALL)
    finished_run(alice, make_chain)
    deliver_all()
    message = WebhookMessage.objects.get(event_type="endpoint.disabled")
    assert message.payload["data"]["reason"] == "The receiver answered 410 Gone."
    assert message.payload["data"]["endpoint_id"] == str(gone.id)
    # A second disable (another attempt that failed at the same time) finds it disabled.
    assert not endpoint_disable_automatically(
        endpoint_id=gone.id, reason="again", now=timezone.now()
    )
    assert WebhookMessage.objects.filter(event_type="endpoint.disabled").count() == 1


def test_deleting_one_receiver_of_an_announcement_keeps_the_others(alice, make_chain, receiver):
    owner = alice.key.owner
    failing = endpoint_create(owner=owner, url=receiver.base_url + hook_path(), events=ALL)
    first = endpoint_create(owner=owner, url=receiver.base_url + hook_path(), events=ALL)
    second = endpoint_create(owner=owner, url=receiver.base_url + hook_path(), events=ALL)
    assert endpoint_disable_automatically(endpoint_id=failing.id, reason="r", now=timezone.now())
    endpoint_delete(endpoint=first)
    [delivery] = WebhookDelivery.objects.filter(message__event_type="endpoint.disabled")
    assert delivery.endpoint_id == second.id
    endpoint_delete(endpoint=second)
    assert not WebhookMessage.objects.filter(event_type="endpoint.disabled").exists()


def test_abort_message_stops_the_retries_of_that_message(alice, make_chain, receiver):
    aborting = hook_path(status=500, control="abort-message")
    plain = hook_path(status=500)
    run = finished_run(alice, make_chain, webhook=own(receiver, aborting))
    deliver_all()
    assert len(receiver.requests_for(aborting)) == 1  # without the header: 1 + 3 retries
    [delivery] = alice.get(f"/api/v1/runs/{run.id}/deliveries").json()["results"]
    assert delivery["status"] == "failed" and delivery["next_attempt_at"] is None
    assert delivery["attempts"][0]["error"] == "private_target_error"  # loopback, to the tenant
    assert WebhookAttempt.objects.get(delivery_id=delivery["id"]).error == (
        "aborted_by_receiver: http_500"
    )
    # Only that message: the next one is attempted, and a resend still goes out.
    finished_run(alice, make_chain, webhook=own(receiver, aborting))
    deliver_all()
    assert len(receiver.requests_for(aborting)) == 2
    alice.post(f"/api/v1/deliveries/{delivery['id']}/resend")
    deliver_all()
    assert len(receiver.requests_for(aborting)) == 3
    finished_run(alice, make_chain, webhook=own(receiver, plain))
    deliver_all()
    assert len(receiver.requests_for(plain)) == 4


def test_abort_message_on_a_success_changes_nothing(alice, make_chain, receiver):
    path = hook_path(control="abort-message")
    run = finished_run(alice, make_chain, webhook=own(receiver, path))
    deliver_all()
    [delivery] = alice.get(f"/api/v1/runs/{run.id}/deliveries").json()["results"]
    assert delivery["status"] == "succeeded" and delivery["attempts"][0]["error"] is None


def test_a_success_clears_the_endpoint_error(alice, make_chain, receiver):
    path = hook_path(fail_times=1)
    endpoint = endpoint_create(owner=alice.key.owner, url=receiver.base_url + path, events=ALL)
    finished_run(alice, make_chain)
    delivery_attempt(delivery_id=WebhookDelivery.objects.get().id)
    endpoint.refresh_from_db()
    assert endpoint.failing_since and endpoint.last_error == "private_target_error"
    deliver_all()
    endpoint.refresh_from_db()
    assert endpoint.failing_since is None and endpoint.last_error == ""


def test_resend_keeps_the_webhook_id(alice, make_chain, receiver):
    path = hook_path()
    run = finished_run(alice, make_chain, webhook=own(receiver, path))
    deliver_all()
    [delivery] = alice.get(f"/api/v1/runs/{run.id}/deliveries").json()["results"]
    response = alice.post(f"/api/v1/deliveries/{delivery['id']}/resend")
    assert response.status_code == 202
    assert response.json()["status"] == "pending"
    deliver_all()
    first, second = receiver.requests_for(path)
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == delivery["webhook_id"]
    verify(SECRET, second)
    [delivery] = alice.get(f"/api/v1/runs/{run.id}/deliveries").json()["results"]
    assert [a["trigger"] for a in delivery["attempts"]] == ["auto", "manual"]
    assert delivery["status"] == "succeeded"


def test_run_resend_reaches_every_target(alice, make_chain, receiver):
    own_path, endpoint_path = hook_path(), hook_path()
    run = finished_run(alice, make_chain, webhook=own(receiver, own_path))
    deliver_all()
    # An endpoint registered after the run ended is a target of the resend too.
    endpoint_create(owner=alice.key.owner, url=receiver.base_url + endpoint_path, events=ALL)
    response = alice.post(f"/api/v1/runs/{run.id}/webhooks/resend")
    assert response.status_code == 202
    assert len(response.json()["results"]) == 2
    deliver_all()
    assert len(receiver.requests_for(own_path)) == 2
    [request] = receiver.requests_for(endpoint_path)
    assert request.headers["webhook-id"] == receiver.requests_for(own_path)[0].headers["webhook-id"]


def test_run_resend_of_an_unfinished_run_is_409(alice, make_chain, receiver):
    chain = make_chain("demo")
    run = run_create(api_key=alice.key, chain=chain, run_input={"topic": "x"}, metadata={})
    response = alice.post(f"/api/v1/runs/{run.id}/webhooks/resend")
    assert response.status_code == 409
    assert response.json()["code"] == "run_not_finished"


def test_cancelling_a_queued_run_writes_its_message(alice, make_chain, receiver):
    path = hook_path()
    chain = make_chain("demo")
    run = run_create(
        api_key=alice.key,
        chain=chain,
        run_input={"topic": "x"},
        metadata={},
        webhook=own(receiver, path, ["run.cancelled"]),
    )
    assert not WebhookMessage.objects.exists()
    run_cancel(run=run, reason="api")
    message = WebhookMessage.objects.get()
    assert message.event_type == "run.cancelled" and message.run_id == run.id
    deliver_all()
    payload = verify(SECRET, receiver.requests_for(path)[0])
    assert payload["data"]["status"] == RunStatus.CANCELLED


def test_one_claim_wins_and_a_dead_executors_lease_is_claimed_again(alice, make_chain, receiver):
    path = hook_path()
    finished_run(alice, make_chain, webhook=own(receiver, path))
    delivery = WebhookDelivery.objects.get()
    token = _claim(delivery_id=delivery.id, token=None)
    assert token is not None
    assert _claim(delivery_id=delivery.id, token=None) is None  # a second executor loses
    assert deliveries_claim_due(limit=10) == ([], None)  # the lease is still running
    # The executor holding it died: once the lease runs out, another claims it.
    WebhookDelivery.objects.filter(pk=delivery.pk).update(
        next_attempt_at=timezone.now() - timedelta(seconds=1)
    )
    ids, _ = deliveries_claim_due(limit=10)
    assert ids == [delivery.id]
    swept = WebhookDelivery.objects.get()
    assert swept.claim_token not in (None, token)
    assert not delivery_attempt(delivery_id=delivery.id, token=token)  # the old token is void
    assert delivery_attempt(delivery_id=delivery.id, token=swept.claim_token)
    assert len(receiver.requests_for(path)) == 1


def test_the_sweep_schedule_is_gone(db):
    """Executors claim due deliveries themselves; the old minute schedule is removed."""
    import importlib

    from django.apps import apps
    from django_q.models import Schedule

    Schedule.objects.create(name="webhooks-sweep", func="webhooks.tasks.deliveries_sweep")
    importlib.import_module("webhooks.migrations.0004_no_sweep_schedule").delete(apps, None)
    assert not Schedule.objects.filter(name="webhooks-sweep").exists()


def test_retries_follow_a_changed_endpoint_url(alice, make_chain, receiver):
    old, new = hook_path(status=500), hook_path()
    endpoint = endpoint_create(owner=alice.key.owner, url=receiver.base_url + old, events=ALL)
    finished_run(alice, make_chain)
    delivery_attempt(delivery_id=WebhookDelivery.objects.get().id)
    response = alice.client.patch(
        f"/api/v1/webhook-endpoints/{endpoint.id}",
        json.dumps({"url": receiver.base_url + new}),
        content_type="application/json",
        headers=alice._headers(None),
    )
    assert response.status_code == 200
    deliver_all()
    assert len(receiver.requests_for(old)) == 1 and len(receiver.requests_for(new)) == 1
    assert WebhookDelivery.objects.get().status == "succeeded"


@pytest.mark.parametrize(
    "retry_after, low, high",
    [
        ("Wed, 21 Oct 2099 07:28:00 GMT", 3500, 3601),  # an HTTP date, capped at 1 h
        ("999999", 3500, 3601),  # capped
        ("soon", 0, 1),  # unparseable: the schedule (0.05 s here)
    ],
)
def test_retry_after_forms_and_cap(alice, make_chain, receiver, retry_after, low, high):
    from urllib.parse import quote

    path = hook_path(status=429, retry_after=quote(retry_after))
    finished_run(alice, make_chain, webhook=own(receiver, path))
    delivery = WebhookDelivery.objects.get()
    before = timezone.now()
    delivery_attempt(delivery_id=delivery.id)
    delivery.refresh_from_db()
    assert delivery.status == "pending" and delivery.last_status_code == 429
    assert low <= (delivery.next_attempt_at - before).total_seconds() <= high


def test_metrics_count_attempts_by_outcome(alice, make_chain, receiver):
    from django.test import Client

    from tests.test_health import metric

    def count(outcome: str) -> float:
        text = Client().get("/metrics").content.decode()
        return metric(text, f'agentsvc_webhook_attempts_total{{outcome="{outcome}"}}')

    before = count("succeeded")
    finished_run(alice, make_chain, webhook=own(receiver, hook_path()))
    deliver_all()
    assert count("succeeded") == before + 1


@pytest.mark.django_db(transaction=True)
def test_deleting_an_endpoint_while_a_worker_records_an_attempt(alice, make_chain, receiver):
    """The worker records an attempt (one statement: the delivery row and a new attempt) while
    the endpoint is deleted. The delete must take the attempt with it, not fail on its foreign
    key at commit (a 500 found by the stateful fuzzing)."""
    endpoint = endpoint_create(
        owner=alice.key.owner, url=receiver.base_url + hook_path(), events=ALL
    )
    finished_run(alice, make_chain)
    deliver_all()  # the first attempt, before any worker of the session takes it
    delivery = WebhookDelivery.objects.get(endpoint=endpoint)
    number = delivery.attempt_count + 1
    recorded, release, deleted = threading.Event(), threading.Event(), []

    def worker() -> None:
        try:
            with transaction.atomic():
                WebhookDelivery.objects.filter(pk=delivery.pk).update(attempt_count=number)
                WebhookAttempt.objects.create(
                    delivery=delivery,
                    number=number,
                    at=timezone.now(),
                    duration_ms=1,
                    trigger="auto",
                )
                recorded.set()
                release.wait(20)
        finally:
            connection.close()

    def delete() -> None:
        try:
            endpoint_delete(endpoint=WebhookEndpoint.objects.get(pk=endpoint.pk))
            deleted.append(True)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker)]
    threads[0].start()
    assert recorded.wait(20)
    threads.append(threading.Thread(target=delete))
    threads[1].start()
    with connections["default"].cursor() as cursor:

        def delete_waits() -> bool:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"
            )
            return cursor.fetchone()[0] == 1

        wait_until(delete_waits, 20, message="the delete to wait for the worker's row lock")
    release.set()
    for thread in threads:
        thread.join(30)
    assert deleted == [True]
    assert not WebhookAttempt.objects.filter(delivery_id=delivery.pk).exists()
    assert not WebhookDelivery.objects.filter(pk=delivery.pk).exists()
