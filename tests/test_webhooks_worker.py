"""End to end: a run completes in a real executor and its webhooks reach a real receiver."""

from __future__ import annotations

from datetime import datetime

import httpx
import pytest
from standardwebhooks import Webhook

from tests.conftest import fake, wait_until
from tests.webhook_support import SECRET, hook_path

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def http(live_server_url, worker, alice):
    with httpx.Client(
        base_url=live_server_url, timeout=30, headers={"Authorization": f"Bearer {alice.raw_key}"}
    ) as client:
        yield client


def test_run_end_is_pushed_to_every_target(http, make_chain, receiver):
    make_chain("demo", models=[fake(tokens=4)])
    own_path, endpoint_path, other_path = hook_path(), hook_path(), hook_path()
    endpoint = http.post(
        "/api/v1/webhook-endpoints", json={"url": receiver.base_url + endpoint_path}
    ).json()
    http.post(
        "/api/v1/webhook-endpoints",
        json={"url": receiver.base_url + other_path, "events": ["run.failed"]},
    )
    response = http.post(
        "/api/v1/chains/demo/runs",
        json={
            "input": {"topic": "tides"},
            "webhook": {"url": receiver.base_url + own_path, "secret": SECRET},
        },
    )
    assert response.status_code == 202
    run_id = response.json()["run_id"]
    wait_until(
        lambda: receiver.requests_for(own_path) and receiver.requests_for(endpoint_path),
        30,
        message="both webhooks",
    )
    [own] = receiver.requests_for(own_path)
    [registered] = receiver.requests_for(endpoint_path)
    own_payload = Webhook(SECRET).verify(own.body, own.headers)
    registered_payload = Webhook(endpoint["secret"]).verify(registered.body, registered.headers)
    assert own_payload == registered_payload
    assert own_payload["type"] == "run.completed"
    assert own_payload["data"]["run_id"] == run_id
    assert own_payload["data"]["status"] == "completed"
    assert own_payload["data"]["usage"]["output_tokens"] == 4

    def logged():
        body = http.get(f"/api/v1/runs/{run_id}/deliveries").json()
        done = all(d["status"] == "succeeded" for d in body["results"])
        return body if done and len(body["results"]) == 2 else None

    log = wait_until(logged, 10, message="deliveries logged")
    assert {d["url"] for d in log["results"]} == {
        receiver.base_url + own_path,
        receiver.base_url + endpoint_path,
    }
    assert receiver.requests_for(other_path) == []


def test_a_failed_delivery_is_retried_on_time_by_the_executor(http, make_chain, receiver):
    """The first attempt fails; the retry, due 5 s later (+-20 %), goes out within about a
    second of its due time from an otherwise idle executor."""
    make_chain("demo", models=[fake(tokens=2)])
    flaky = hook_path(fail_times=1, fail_status=503)
    hook = {"url": receiver.base_url + flaky, "secret": SECRET}
    run_id = http.post(
        "/api/v1/chains/demo/runs", json={"input": {"topic": "a"}, "webhook": hook}
    ).json()["run_id"]
    wait_until(lambda: len(receiver.requests_for(flaky)) >= 2, 30, message="the retry")
    first, second = receiver.requests_for(flaky)
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    Webhook(SECRET).verify(second.body, second.headers)
    [delivery] = wait_until(
        lambda: [
            d
            for d in http.get(f"/api/v1/runs/{run_id}/deliveries").json()["results"]
            if d["status"] == "succeeded"
        ],
        10,
        message="delivery succeeded",
    )
    # The receiver is on loopback: the tenant sees one error class for the failure.
    assert [(a["status_code"], a["error"]) for a in delivery["attempts"]] == [
        (None, "private_target_error"),
        (200, None),
    ]
    at = [datetime.fromisoformat(a["at"]) for a in delivery["attempts"]]
    assert (at[1] - at[0]).total_seconds() < 6 + 1.5, at


def test_slow_receivers_never_delay_a_run_start(http, make_chain, receiver):
    """Deliveries have threads of their own in the executor: with all of them waiting on a
    receiver that takes 3 s to answer, a new run still starts at once."""
    from runs.models import Run
    from webhooks.models import WebhookDelivery

    make_chain("demo", models=[fake(tokens=2)])
    slow = {"url": receiver.base_url + hook_path(delay_ms=3000), "secret": SECRET}
    for topic in "abcdef":
        http.post("/api/v1/chains/demo/runs", json={"input": {"topic": topic}, "webhook": slow})
    # Every delivery thread (WEBHOOK_CONCURRENCY in the test environment) is now mid-attempt.
    wait_until(
        lambda: WebhookDelivery.objects.filter(claim_token__isnull=False).count() >= 2,
        20,
        message="deliveries under way",
    )
    run_id = http.post("/api/v1/chains/demo/runs", json={"input": {"topic": "now"}}).json()[
        "run_id"
    ]
    run = wait_until(
        lambda: Run.objects.filter(pk=run_id, started_at__isnull=False).first(), 10, 0.01
    )
    assert (run.started_at - run.created_at).total_seconds() < 1
    assert WebhookDelivery.objects.filter(status="pending").exists()  # still on the slow ones
    wait_until(
        lambda: not WebhookDelivery.objects.filter(status="pending").exists(),
        60,
        message="the slow deliveries",
    )
