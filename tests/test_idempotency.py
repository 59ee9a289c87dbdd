from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import httpx
import pytest
from django.utils import timezone

from agentsvc.models import IdempotencyRecord
from agentsvc.tasks import purge_expired
from runs.models import Run
from tests.conftest import fake, wait_until
from tests.test_auth import assert_problem

BODY = {"input": {"topic": "tides"}}


@pytest.fixture
def chain(make_chain):
    return make_chain("demo")


def post(api, body=None, key="k-1", path="/api/v1/chains/demo/runs"):
    headers = {"Idempotency-Key": key} if key is not None else {}
    return api.post(path, BODY if body is None else body, headers=headers)


def test_same_key_same_body_replays(alice, chain):
    first = post(alice)
    assert first.status_code == 202
    assert "Idempotent-Replayed" not in first
    second = post(alice)
    assert second.status_code == 202
    assert second["Idempotent-Replayed"] == "true"
    assert second.json() == first.json()
    assert second["Location"] == first["Location"]
    assert Run.objects.count() == 1


def test_quoted_and_bare_forms_are_one_key(alice, chain):
    first = post(alice, key='"order-42"')
    second = post(alice, key="order-42")
    assert second["Idempotent-Replayed"] == "true"
    assert second.json()["run_id"] == first.json()["run_id"]


def test_body_field_when_no_header(alice, chain):
    body = {**BODY, "idempotency_key": "from-body"}
    first = post(alice, body, key=None)
    second = post(alice, body, key=None)
    assert second["Idempotent-Replayed"] == "true"
    assert second.json()["run_id"] == first.json()["run_id"]
    assert Run.objects.count() == 1


def test_same_key_different_body_is_422(alice, chain):
    post(alice)
    problem = assert_problem(
        post(alice, {"input": {"topic": "other"}}), 422, "idempotency_key_reused"
    )
    assert "different" in problem["detail"]
    assert Run.objects.count() == 1


def test_key_is_scoped_by_owner_and_path(alice, bob, make_chain):
    make_chain("demo")
    make_chain("other")
    a = post(alice).json()["run_id"]
    b = post(bob).json()["run_id"]
    c = post(alice, path="/api/v1/chains/other/runs").json()["run_id"]
    assert len({a, b, c}) == 3
    assert Run.objects.count() == 3


def test_rejected_request_does_not_burn_the_key(alice, chain):
    assert_problem(post(alice, {"input": {}}), 400, "validation_error")
    first = post(alice)
    assert first.status_code == 202 and "Idempotent-Replayed" not in first
    assert post(alice)["Idempotent-Replayed"] == "true"
    assert Run.objects.count() == 1


def test_cancel_is_idempotent_too(alice, chain):
    run_id = post(alice, key=None).json()["run_id"]
    path = f"/api/v1/runs/{run_id}/cancel"
    first = alice.post(path, {}, headers={"Idempotency-Key": "c-1"})
    second = alice.post(path, {}, headers={"Idempotency-Key": "c-1"})
    assert first.status_code == second.status_code == 200
    assert second["Idempotent-Replayed"] == "true"


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", '"unterminated'])
def test_invalid_keys_are_400(alice, chain, key):
    problem = assert_problem(post(alice, key=key), 400, "validation_error")
    assert problem["errors"][0]["field"] == "Idempotency-Key"
    assert not Run.objects.exists()


def test_expired_key_starts_over(alice, chain):
    first = post(alice).json()["run_id"]
    IdempotencyRecord.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    second = post(alice).json()["run_id"]
    assert first != second


def test_purge_removes_expired_records(alice, chain, caplog):
    post(alice, key="old")
    post(alice, key="new")
    IdempotencyRecord.objects.filter(key="old").update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    with caplog.at_level("INFO", logger="agentsvc.tasks"):
        assert purge_expired() == 1
        assert purge_expired() == 0  # nothing to do: nothing in the log
    assert list(IdempotencyRecord.objects.values_list("key", flat=True)) == ["new"]
    assert [r.getMessage() for r in caplog.records if r.name == "agentsvc.tasks"] == [
        "purged 1 expired idempotency records and 0 old token windows"
    ]


def test_abandoned_request_replays_its_run(alice, chain):
    """A process that died after creating the run but before answering: the retry finds it."""
    run_id = post(alice).json()["run_id"]
    IdempotencyRecord.objects.update(
        response_status=None, response_body=None, created_at=timezone.now() - timedelta(hours=1)
    )
    replay = post(alice)
    assert replay.status_code == 202
    assert replay["Idempotent-Replayed"] == "true"
    assert replay.json()["run_id"] == run_id


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_in_flight_key_is_409(live_server_url, worker, alice, make_chain):
    make_chain("slow", models=[fake(tokens=60, latency_ms=50)])
    url = f"{live_server_url}/api/v1/chains/slow/invoke"
    headers = {"Authorization": f"Bearer {alice.raw_key}", "Idempotency-Key": "slow-1"}
    body = {**BODY, "wait_s": 3}
    results = {}
    first = threading.Thread(
        target=lambda: results.update(first=httpx.post(url, json=body, headers=headers, timeout=30))
    )
    first.start()
    # The first request holds the key once its record exists (and for wait_s after).
    wait_until(lambda: IdempotencyRecord.objects.filter(key="slow-1").exists(), 10, 0.01)
    second = httpx.post(url, json=body, headers=headers, timeout=30)
    first.join()
    assert second.status_code == 409
    assert second.headers["Retry-After"] == "1"
    assert second.json()["code"] == "idempotency_request_in_progress"
    assert results["first"].status_code == 202
    third = httpx.post(url, json=body, headers=headers, timeout=30)
    assert third.headers["Idempotent-Replayed"] == "true"
    assert third.json()["run_id"] == results["first"].json()["run_id"]
    assert Run.objects.count() == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_fifty_parallel_requests_make_one_run(live_server_url, alice, make_chain):
    make_chain("demo")
    url = f"{live_server_url}/api/v1/chains/demo/runs"
    headers = {"Authorization": f"Bearer {alice.raw_key}", "Idempotency-Key": "burst-1"}
    barrier = threading.Barrier(50)

    def send(_):
        barrier.wait()
        return httpx.post(url, json=BODY, headers=headers, timeout=30)

    with ThreadPoolExecutor(50) as pool:
        responses = list(pool.map(send, range(50)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {202, 409}, statuses
    assert Run.objects.count() == 1
    run_id = str(Run.objects.get().id)
    assert {r.json()["run_id"] for r in responses if r.status_code == 202} == {run_id}
    assert (
        sum(1 for r in responses if r.status_code == 202 and "Idempotent-Replayed" not in r.headers)
        == 1
    )
