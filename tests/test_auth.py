from __future__ import annotations

from django.core.management import call_command

from agentsvc.models import ApiKey
from agentsvc.services import api_key_revoke
from tests.conftest import Api


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
