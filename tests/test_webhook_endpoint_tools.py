"""POST /webhook-endpoints/{id}/test and /recover, end to end: the live server answers, the
executor's delivery pump sends, the local receiver checks the signature."""

from __future__ import annotations

from datetime import datetime, timedelta

import httpx
import pytest
from standardwebhooks import Webhook

from runs.timefmt import iso
from tests.conftest import fake, wait_until
from tests.webhook_support import hook_path

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def http(live_server_url, worker, alice):
    with httpx.Client(
        base_url=live_server_url, timeout=30, headers={"Authorization": f"Bearer {alice.raw_key}"}
    ) as client:
        yield client


def register(http, url: str, **fields) -> dict:
    response = http.post("/api/v1/webhook-endpoints", json={"url": url, **fields})
    assert response.status_code == 201, response.text
    return response.json()


def test_test_event_reaches_the_endpoint_signed_and_stays_out_of_run_logs(
    http, make_chain, receiver
):
    path = hook_path()
    endpoint = register(http, receiver.base_url + path, events=["run.failed"])
    response = http.post(f"/api/v1/webhook-endpoints/{endpoint['id']}/test")
    assert response.status_code == 202, response.text
    sent = response.json()
    [request] = wait_until(lambda: receiver.requests_for(path), 20, message="the test event")
    payload = Webhook(endpoint["secret"]).verify(request.body, request.headers)
    assert payload["type"] == "webhook.test" and payload["id"] == sent["webhook_id"]
    assert payload["data"] == {"endpoint_id": endpoint["id"], "url": endpoint["url"]}
    # Resending it works like any delivery: the same webhook-id again.
    resent = http.post(f"/api/v1/deliveries/{sent['delivery_id']}/resend")
    assert resent.status_code == 202, resent.text
    assert resent.json()["event"] == "webhook.test"
    wait_until(lambda: len(receiver.requests_for(path)) == 2, 20, message="the resend")
    assert receiver.requests_for(path)[1].headers["webhook-id"] == sent["webhook_id"]
    # A run's deliveries never list it (this run's end is not one the endpoint subscribes to).
    make_chain("demo", models=[fake(tokens=2)])
    run_id = http.post("/api/v1/chains/demo/runs", json={"input": {"topic": "t"}}).json()["run_id"]
    wait_until(lambda: http.get(f"/api/v1/runs/{run_id}").json()["status"] == "completed", 30)
    assert http.get(f"/api/v1/runs/{run_id}/deliveries").json()["results"] == []
    # Deleting the endpoint takes its test deliveries along.
    assert http.delete(f"/api/v1/webhook-endpoints/{endpoint['id']}").status_code == 204
    gone = http.post(f"/api/v1/deliveries/{sent['delivery_id']}/resend")
    assert gone.status_code == 404 and gone.json()["code"] == "not_found"


def test_recover_resends_the_failed_deliveries_since_a_time(http, make_chain, receiver):
    """The receiver answered 410 (gone): the delivery failed and the endpoint was disabled.
    Once it is back and enabled, recover sends what failed since the time given."""
    make_chain("demo", models=[fake(tokens=2)])
    path = hook_path(fail_times=1, fail_status=410)
    endpoint = register(http, receiver.base_url + path)
    run_id = http.post("/api/v1/chains/demo/runs", json={"input": {"topic": "t"}}).json()["run_id"]

    def failed():
        results = http.get(f"/api/v1/runs/{run_id}/deliveries").json()["results"]
        return results if results and results[0]["status"] == "failed" else None

    [delivery] = wait_until(failed, 30, message="the delivery to fail")
    shown = http.get(f"/api/v1/webhook-endpoints/{endpoint['id']}").json()
    assert shown["enabled"] is False
    http.patch(f"/api/v1/webhook-endpoints/{endpoint['id']}", json={"enabled": True})
    recover = f"/api/v1/webhook-endpoints/{endpoint['id']}/recover"
    # `since` later than the delivery, by the millisecond shown: nothing to resend.
    later = iso(datetime.fromisoformat(delivery["created_at"]) + timedelta(milliseconds=1))
    response = http.post(recover, json={"since": later})
    assert response.status_code == 202 and response.json() == {"count": 0, "delivery_ids": []}
    # `since` copied from the delivery itself includes it.
    response = http.post(recover, json={"since": delivery["created_at"]})
    assert response.status_code == 202, response.text
    assert response.json() == {"count": 1, "delivery_ids": [delivery["id"]]}
    wait_until(lambda: len(receiver.requests_for(path)) == 2, 20, message="the resend")
    first, second = receiver.requests_for(path)
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    Webhook(endpoint["secret"]).verify(second.body, second.headers)
    [done] = wait_until(
        lambda: [
            d
            for d in http.get(f"/api/v1/runs/{run_id}/deliveries").json()["results"]
            if d["status"] == "succeeded"
        ],
        20,
    )
    # The receiver is on loopback: the tenant sees one error class for its failure.
    assert [(a["status_code"], a["error"], a["trigger"]) for a in done["attempts"]] == [
        (None, "private_target_error", "auto"),
        (200, None, "manual"),
    ]
    # Nothing failed is left: a second recover finds nothing.
    assert http.post(recover, json={"since": "2000-01-01T00:00:00Z"}).json()["count"] == 0
    # An offset PostgreSQL cannot take (RFC 3339 allows up to 23:59) was a 500.
    far = http.post(recover, json={"since": "0302-08-06T10:20:59.208-17:45"})
    assert far.status_code == 202 and far.json()["count"] == 0, far.text


@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "since"),
        ({"since": "yesterday"}, "since"),
        ({"since": "2026-01-01T00:00:00"}, "since"),
        ({"since": 1700000000}, "since"),
        ({"since": "2026-01-01T00:00:00Z", "until": "soon"}, "until"),
        ({"since": "0001-01-01T00:00:00+01:00"}, "since"),  # before year 1 in UTC
        ({"since": "2026-01-01T00:00:00Z", "colour": "red"}, "colour"),
    ],
)
def test_recover_refuses_bad_bodies(http, receiver, body, field):
    endpoint = register(http, receiver.base_url + hook_path())
    response = http.post(f"/api/v1/webhook-endpoints/{endpoint['id']}/recover", json=body)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert [e["field"] for e in response.json()["errors"]] == [field]
