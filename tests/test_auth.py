from __future__ import annotations

import httpx
import pytest
from django.core.management import call_command
from websockets.sync.client import connect

from agentsvc.models import ApiKey
from agentsvc.services import api_key_revoke
from runs.models import Run
from runs.services import run_create
from tests.conftest import Api
from tests.test_ws import frames_until_close
from webhooks.models import WebhookEndpoint


def assert_problem(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"] == f"/api/problems/{code}"
    assert body["instance"] == response.wsgi_request.path
    return body


def test_missing_key_is_401_with_challenge(db):
    response = Api(None).get("/api/v1/runs")
    assert_problem(response, 401, "authentication_failed")
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_unknown_key_is_401(db):
    response = Api("ak_" + "x" * 43).get("/api/v1/runs")
    assert_problem(response, 401, "authentication_failed")
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_malformed_authorization_is_401(alice):
    response = Api(None).get("/api/v1/runs", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert_problem(response, 401, "authentication_failed")


def test_revoked_key_is_401(alice):
    assert alice.get("/api/v1/runs").status_code == 200
    api_key_revoke(key=alice.key)
    assert_problem(alice.get("/api/v1/runs"), 401, "authentication_failed")


def test_x_api_key_header_is_accepted(alice):
    response = Api(None).get("/api/v1/runs", headers={"X-API-Key": alice.raw_key})
    assert response.status_code == 200


def test_keys_are_stored_hashed(alice):
    key = ApiKey.objects.get(pk=alice.key.pk)
    assert alice.raw_key not in (key.key_hash, key.prefix, key.name)
    assert len(key.key_hash) == 64
    assert alice.raw_key.startswith("ak_") and len(alice.raw_key) >= 3 + 32
    assert alice.raw_key[3:11] == key.prefix


def test_last_used_is_recorded(alice):
    assert ApiKey.objects.get(pk=alice.key.pk).last_used_at is None
    alice.get("/api/v1/runs")
    assert ApiKey.objects.get(pk=alice.key.pk).last_used_at is not None


def test_createapikey_prints_a_working_key(db, capsys):
    call_command("createapikey", "billing", "--owner", "acme", "--runs-per-minute", "7")
    raw = capsys.readouterr().out.strip()
    assert Api(raw).get("/api/v1/runs").status_code == 200
    key = ApiKey.objects.get(name="billing")
    assert key.owner.name == "acme"
    assert key.runs_per_minute == 7


def test_infrastructure_endpoints_need_no_key(db):
    client = Api(None).client
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/api/problems/not_found").status_code == 200


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_two_keys_at_once_are_400_on_every_transport(live_server_url, alice, bob, make_chain):
    """A probe sent `Authorization: Bearer <alice>` with `X-API-Key: <bob>` and was served as
    alice. Both headers at once are refused wherever a key is read: DRF's views, the fast
    lane, the SSE views and the WebSocket (close 4400), with no side effect."""
    chain = make_chain("demo", schema={"type": "object"})
    run = run_create(api_key=alice.key, chain=chain, run_input={}, metadata={})
    both = {"Authorization": f"Bearer {alice.raw_key}", "X-API-Key": bob.raw_key}
    same_twice = {"Authorization": f"Bearer {alice.raw_key}", "X-API-Key": alice.raw_key}
    sse = {"Accept": "text/event-stream"}
    with httpx.Client(base_url=live_server_url, timeout=30) as http:
        for headers in (both, same_twice):
            for method, path, extra, body in (
                ("GET", "/api/v1/runs", {}, None),  # DRF
                ("POST", "/api/v1/webhook-endpoints", {}, {"url": "https://a.example/h"}),
                ("POST", "/api/v1/chains/demo/runs", {}, {"input": {}}),  # the lane
                ("GET", f"/api/v1/runs/{run.id}", {}, None),
                ("GET", f"/api/v1/runs/{run.id}/events", {}, None),
                ("GET", f"/api/v1/runs/{run.id}/events", sse, None),  # SSE
                ("POST", "/api/v1/chains/demo/stream", {}, {"input": {}}),
            ):
                response = http.request(method, path, headers={**headers, **extra}, json=body)
                assert response.status_code == 400, (path, response.text)
                assert response.headers["content-type"] == "application/problem+json"
                assert response.json()["code"] == "ambiguous_credentials", response.text
        # Each header alone still works.
        for alone in ({"Authorization": f"Bearer {bob.raw_key}"}, {"X-API-Key": bob.raw_key}):
            assert http.get("/api/v1/runs", headers=alone).json()["results"] == []
    ws = live_server_url.replace("http://", "ws://")
    for path in (f"/ws/v1/runs/{run.id}", "/ws/v1/runs"):
        with connect(ws + path, additional_headers=both) as sock:
            assert frames_until_close(sock) == ([], 4400), path
    assert Run.objects.count() == 1 and not WebhookEndpoint.objects.exists()
