"""The webhooks API: endpoint CRUD, validation, a run's own webhook, tenant isolation."""

from __future__ import annotations

import uuid

import pytest

from runs.models import Run
from tests.webhook_support import SECRET, deliver_all, finished_run, hook_path
from webhooks.models import WebhookEndpoint

pytestmark = pytest.mark.usefixtures("local_ok")

ALL = ["run.completed", "run.failed", "run.cancelled", "run.timed_out"]
EP = "/api/v1/webhook-endpoints"


def problem(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/problem+json"
    body = response.json()
    assert body["code"] == code
    return body


def patch(api, path: str, body: dict):
    import json

    return api.client.patch(
        path, json.dumps(body), content_type="application/json", headers=api._headers(None)
    )


def delete(api, path: str):
    return api.client.delete(path, headers=api._headers(None))


def test_endpoint_lifecycle(alice, receiver):
    url = receiver.base_url + hook_path()
    created = alice.post(EP, {"url": url, "description": "billing"})
    assert created.status_code == 201
    body = created.json()
    assert body["secret"].startswith("whsec_")
    assert body["events"] == ALL and body["enabled"] is True
    assert created["Location"] == f"{EP}/{body['id']}"
    shown = alice.get(f"{EP}/{body['id']}").json()
    assert "secret" not in shown and shown["url"] == url and shown["description"] == "billing"
    listed = alice.get(EP).json()
    assert [e["id"] for e in listed["results"]] == [body["id"]] and listed["next"] is None
    assert "secret" not in listed["results"][0]
    changed = patch(alice, f"{EP}/{body['id']}", {"events": ["run.failed"], "enabled": False})
    assert changed.status_code == 200
    assert changed.json()["events"] == ["run.failed"] and changed.json()["enabled"] is False
    rotated = alice.post(f"{EP}/{body['id']}/rotate-secret")
    assert rotated.status_code == 200
    assert rotated.json()["secret"].startswith("whsec_")
    assert rotated.json()["secret"] != body["secret"]
    assert delete(alice, f"{EP}/{body['id']}").status_code == 204
    problem(alice.get(f"{EP}/{body['id']}"), 404, "not_found")


def test_endpoint_list_is_paginated(alice, receiver):
    ids = [alice.post(EP, {"url": receiver.base_url + hook_path()}).json()["id"] for _ in range(3)]
    first = alice.get(EP, {"limit": 2}).json()
    assert len(first["results"]) == 2 and first["next"]
    second = alice.client.get(first["next"], headers=alice._headers(None)).json()
    assert second["next"] is None
    assert {e["id"] for e in first["results"] + second["results"]} == set(ids)


@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "url"),
        ({"url": "not a url"}, "url"),
        ({"url": "ftp://example.com/hook"}, "url"),
        ({"url": "http://10.0.0.5/hook"}, "url"),
        ({"url": "https://example.com/h", "events": ["run.exploded"]}, "events[0]"),
        ({"url": "https://example.com/h", "events": []}, "events"),
        ({"url": "https://example.com/h", "events": "run.failed"}, "events"),
        ({"url": "https://example.com/h", "secret": SECRET}, "secret"),
        ({"url": "https://example.com/h", "description": "x" * 501}, "description"),
    ],
)
def test_endpoint_validation(alice, body, field, settings):
    settings.WEBHOOK_ALLOWED_NETWORKS = []
    body = problem(alice.post(EP, body), 400, "validation_error")
    assert field in [e["field"] for e in body["errors"]]
    assert not WebhookEndpoint.objects.exists()


def test_endpoints_of_another_owner_are_404(alice, bob, receiver):
    endpoint_id = alice.post(EP, {"url": receiver.base_url + hook_path()}).json()["id"]
    problem(bob.get(f"{EP}/{endpoint_id}"), 404, "not_found")
    problem(patch(bob, f"{EP}/{endpoint_id}", {"enabled": False}), 404, "not_found")
    problem(delete(bob, f"{EP}/{endpoint_id}"), 404, "not_found")
    problem(bob.post(f"{EP}/{endpoint_id}/rotate-secret"), 404, "not_found")
    assert bob.get(EP).json()["results"] == []
    problem(bob.get(f"{EP}/{uuid.uuid4()}"), 404, "not_found")
    assert WebhookEndpoint.objects.get().enabled


def test_deliveries_of_another_owner_are_404(alice, bob, make_chain, receiver):
    path = hook_path()
    run = finished_run(
        alice, make_chain, webhook={"url": receiver.base_url + path, "secret": SECRET}
    )
    deliver_all()
    [delivery] = alice.get(f"/api/v1/runs/{run.id}/deliveries").json()["results"]
    problem(bob.get(f"/api/v1/runs/{run.id}/deliveries"), 404, "not_found")
    problem(bob.post(f"/api/v1/deliveries/{delivery['id']}/resend"), 404, "not_found")
    problem(bob.post(f"/api/v1/runs/{run.id}/webhooks/resend"), 404, "not_found")
    deliver_all()
    assert len(receiver.requests_for(path)) == 1


def test_delivery_log_query_count(alice, make_chain, receiver, django_assert_max_num_queries):
    for _ in range(3):
        alice.post(EP, {"url": receiver.base_url + hook_path()})
    run = finished_run(alice, make_chain)
    deliver_all()
    with django_assert_max_num_queries(6):
        body = alice.get(f"/api/v1/runs/{run.id}/deliveries").json()
    assert len(body["results"]) == 3
    assert all(len(d["attempts"]) == 1 for d in body["results"])


def test_run_with_a_webhook(alice, make_chain, receiver):
    make_chain("demo")
    url = receiver.base_url + hook_path()
    hook = {"url": url, "secret": SECRET, "events": ["run.failed", "run.completed"]}
    response = alice.post("/api/v1/chains/demo/runs", {"input": {"topic": "x"}, "webhook": hook})
    assert response.status_code == 202
    shown = alice.get(f"/api/v1/runs/{response.json()['run_id']}").json()
    assert shown["webhook"] == {"url": url, "events": ["run.completed", "run.failed"]}
    assert SECRET not in str(shown)
    response = alice.post(
        "/api/v1/chains/demo/runs",
        {"input": {"topic": "x"}, "webhook": {"url": url, "secret": SECRET}},
    )
    assert alice.get(f"/api/v1/runs/{response.json()['run_id']}").json()["webhook"]["events"] == ALL


@pytest.mark.parametrize(
    "hook, field",
    [
        ({"url": "http://127.0.0.1/hook", "secret": SECRET}, "webhook.url"),
        ({"url": "http://[::1]/hook", "secret": SECRET}, "webhook.url"),
        ({"url": "gopher://example.com/", "secret": SECRET}, "webhook.url"),
        ({"url": "https://example.com/h"}, "webhook.secret"),
        ({"url": "https://example.com/h", "secret": "abc"}, "webhook.secret"),
        ({"url": "https://example.com/h", "secret": "whsec_c2hvcnQ="}, "webhook.secret"),
        ({"url": "https://example.com/h", "secret": "whsec_!!!"}, "webhook.secret"),
        ({"url": "https://example.com/h", "secret": SECRET, "events": ["x"]}, "webhook.events[0]"),
        ({"url": "https://example.com/h", "secret": SECRET, "extra": 1}, "webhook.extra"),
        ("https://example.com/h", "webhook.non_field_errors"),
    ],
)
def test_run_webhook_validation(alice, make_chain, hook, field, settings):
    settings.WEBHOOK_ALLOWED_NETWORKS = []
    make_chain("demo")
    response = alice.post("/api/v1/chains/demo/runs", {"input": {"topic": "x"}, "webhook": hook})
    body = problem(response, 400, "validation_error")
    fields = [e["field"] for e in body["errors"]]
    assert field in fields or (field.endswith("non_field_errors") and fields == ["webhook"])
    assert not Run.objects.exists()


def test_admin_resend_action(alice, make_chain, receiver, admin_client):
    path = hook_path()
    run = finished_run(
        alice, make_chain, webhook={"url": receiver.base_url + path, "secret": SECRET}
    )
    deliver_all()
    delivery = run.webhook_messages.get().deliveries.get()
    page = admin_client.get(f"/admin/webhooks/webhookdelivery/{delivery.id}/change/")
    assert page.status_code == 200 and SECRET not in page.content.decode()
    response = admin_client.post(
        "/admin/webhooks/webhookdelivery/",
        {"action": "resend", "_selected_action": [str(delivery.id)]},
    )
    assert response.status_code == 302
    deliver_all()
    first, second = receiver.requests_for(path)
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert [a.trigger for a in delivery.attempts.order_by("number")] == ["auto", "manual"]
    assert admin_client.get("/admin/webhooks/webhookendpoint/").status_code == 200
    # Endpoints are made through the API, which shows the secret once.
    assert admin_client.get("/admin/webhooks/webhookendpoint/add/").status_code == 403


def test_a_null_webhook_is_no_webhook(alice, make_chain):
    make_chain("demo")
    response = alice.post("/api/v1/chains/demo/runs", {"input": {"topic": "x"}, "webhook": None})
    assert response.status_code == 202
    assert alice.get(f"/api/v1/runs/{response.json()['run_id']}").json()["webhook"] is None
