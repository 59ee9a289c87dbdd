"""Rerun and batch: over Django's test client for the answers and what the database holds, and
over a live server with a real executor for runs that really execute."""

from __future__ import annotations

import httpx
import pytest

from agentsvc.models import ApiKey
from runs.execution.executor import run_execute
from runs.models import Run, RunEvent, RunStatus
from runs.services import token_reservation
from tests.conftest import fake, wait_until
from tests.test_auth import assert_problem
from tests.webhook_support import SECRET

TOPIC = {"input": {"topic": "tides"}}


def create(api, body=None, chain="demo"):
    response = api.post(f"/api/v1/chains/{chain}/runs", TOPIC if body is None else body)
    assert response.status_code == 202, response.content
    return response.json()


def set_limits(api, **limits) -> None:
    ApiKey.objects.filter(pk=api.key.pk).update(**limits)


# --- Rerun ------------------------------------------------------------------------------------


def test_rerun_runs_the_same_version_input_metadata_and_webhook(alice, make_chain, local_ok):
    make_chain("demo", models=[fake(tokens=2)])
    webhook = {"url": "http://127.0.0.1:9/hook", "secret": SECRET}
    first = create(alice, {**TOPIC, "metadata": {"ticket": "T-1"}, "webhook": webhook})
    make_chain("demo", models=[fake(tokens=2), fake(tokens=2)])  # version 2 is published since
    response = alice.post(f"/api/v1/runs/{first['run_id']}/rerun", {})
    assert response.status_code == 202, response.content
    handle = response.json()
    assert response["Location"] == f"/api/v1/runs/{handle['run_id']}"
    assert handle["version"] == 1 and handle["status"] == "queued"
    run = alice.get(f"/api/v1/runs/{handle['run_id']}").json()
    assert run["rerun_of"] == first["run_id"]
    assert run["input"] == TOPIC["input"] and run["metadata"] == {"ticket": "T-1"}
    original = alice.get(f"/api/v1/runs/{first['run_id']}").json()
    assert run["webhook"] == original["webhook"] and run["webhook"]["url"] == webhook["url"]
    assert Run.objects.get(pk=handle["run_id"]).webhook_secret == SECRET
    assert alice.get(f"/api/v1/runs/{first['run_id']}").json()["rerun_of"] is None


def test_rerun_body_overrides_input_metadata_and_drops_the_webhook(alice, make_chain, local_ok):
    make_chain("demo", models=[fake(tokens=2)])
    webhook = {"url": "http://127.0.0.1:9/hook", "secret": SECRET}
    first = create(alice, {**TOPIC, "metadata": {"a": 1}, "webhook": webhook})
    body = {"input": {"topic": "moon"}, "metadata": {"b": 2}, "webhook": None}
    handle = alice.post(f"/api/v1/runs/{first['run_id']}/rerun", body).json()
    run = alice.get(f"/api/v1/runs/{handle['run_id']}").json()
    assert (run["input"], run["metadata"], run["webhook"]) == ({"topic": "moon"}, {"b": 2}, None)
    # The override is checked against the chain's input schema like any create.
    problem = assert_problem(
        alice.post(f"/api/v1/runs/{first['run_id']}/rerun", {"input": {"topic": 5}}),
        400,
        "validation_error",
    )
    assert [e["field"] for e in problem["errors"]] == ["input.topic"]
    problem = assert_problem(
        alice.post(f"/api/v1/runs/{first['run_id']}/rerun", {"inptu": {}}), 400, "validation_error"
    )
    assert [e["field"] for e in problem["errors"]] == ["inptu"]


def test_rerun_is_idempotent_limited_and_owner_scoped(alice, bob, make_chain):
    make_chain("demo", models=[fake(tokens=2)])
    first = create(alice)["run_id"]
    key = {"Idempotency-Key": "rerun-1"}
    a = alice.post(f"/api/v1/runs/{first}/rerun", {}, headers=key)
    b = alice.post(f"/api/v1/runs/{first}/rerun", {}, headers=key)
    assert a.status_code == b.status_code == 202
    assert a.json() == b.json() and b["Idempotent-Replayed"] == "true"
    assert Run.objects.filter(rerun_of_id=first).count() == 1
    assert_problem(
        alice.post(f"/api/v1/runs/{first}/rerun", {"metadata": {"x": 1}}, headers=key),
        422,
        "idempotency_key_reused",
    )
    assert_problem(bob.post(f"/api/v1/runs/{first}/rerun", {}), 404, "not_found")
    set_limits(alice, max_active_runs=2)
    assert_problem(alice.post(f"/api/v1/runs/{first}/rerun", {}), 429, "concurrency_limit")
    assert Run.objects.filter(rerun_of_id=first).count() == 1


# --- Batch ------------------------------------------------------------------------------------

BATCH = "/api/v1/chains/demo/runs/batch"


def test_batch_creates_every_run_in_order(alice, make_chain, django_assert_max_num_queries):
    make_chain("demo", models=[fake(tokens=2)])
    items = [{"input": {"topic": f"t{i}"}, "metadata": {"i": i}} for i in range(20)]
    response = alice.post(BATCH, {"items": items})
    assert response.status_code == 202, response.content
    results = response.json()["results"]
    assert len(results) == 20
    for i, handle in enumerate(results):
        run = alice.get(handle["poll_url"]).json()
        assert run["input"] == {"topic": f"t{i}"} and run["metadata"] == {"i": i}
        assert handle["status"] == "queued" and handle["chain"] == "demo"
    assert RunEvent.objects.filter(type="run.queued").count() == 20
    assert ApiKey.objects.get(pk=alice.key.pk).active_runs == 20


def test_batch_is_all_or_nothing_and_names_the_bad_item(alice, make_chain):
    make_chain("demo", models=[fake(tokens=2)])
    items = [{"input": {"topic": "ok"}} for _ in range(5)]
    items[3] = {"input": {}}
    items[4] = {"input": {"topic": "x"}, "metadata": "nope"}
    problem = assert_problem(alice.post(BATCH, {"items": items}), 400, "validation_error")
    assert [e["field"] for e in problem["errors"]] == ["items[4].metadata"]
    items[4] = {"input": {"topic": "x"}}
    problem = assert_problem(alice.post(BATCH, {"items": items}), 400, "validation_error")
    assert [e["field"] for e in problem["errors"]] == ["items[3].input.topic"]
    assert not Run.objects.exists()


@pytest.mark.parametrize(
    "body, field",
    [
        ({"items": [{"input": {"topic": "x"}}] * 101}, "items"),
        ({"items": []}, "items"),
        ({"items": "all"}, "items"),
        ({}, "items"),
        ({"items": [{"input": {"topic": "x"}, "colour": 1}]}, "items[0].colour"),
        ({"items": [{"input": {"topic": "x"}}], "version": "1"}, "version"),
    ],
)
def test_batch_refuses_bad_bodies(alice, make_chain, body, field):
    make_chain("demo", models=[fake(tokens=2)])
    problem = assert_problem(alice.post(BATCH, body), 400, "validation_error")
    assert field in [e["field"] for e in problem["errors"]]
    assert not Run.objects.exists()


def test_batch_counts_every_run_against_the_limits(alice, make_chain):
    chain = make_chain("demo", models=[fake(tokens=2)])
    items = [{"input": {"topic": "t"}}] * 5
    set_limits(alice, max_active_runs=4)
    problem = assert_problem(alice.post(BATCH, {"items": items}), 429, "concurrency_limit")
    assert "batch needs 5" in problem["detail"]
    set_limits(alice, max_active_runs=100, runs_per_minute=4)
    assert_problem(alice.post(BATCH, {"items": items}), 429, "rate_limited")
    set_limits(alice, runs_per_minute=1000)
    one = token_reservation(chain=chain, run_input={"topic": "t"})
    set_limits(alice, tokens_per_minute=one * 5 - 1)
    response = alice.post(BATCH, {"items": items})
    problem = assert_problem(response, 422, "run_too_large")
    assert "batch of 5 runs" in problem["detail"] and not response.has_header("Retry-After")
    set_limits(alice, tokens_per_minute=one * 6)
    create(alice, {"input": {"topic": "t"}})  # leaves room for 5 more, not 6
    response = alice.post(BATCH, {"items": items})
    assert response.status_code == 202, response.json()
    assert_problem(alice.post(BATCH, {"items": items[:2]}), 429, "token_budget_exceeded")
    assert Run.objects.count() == 6
    assert ApiKey.objects.get(pk=alice.key.pk).active_runs == 6


def test_batch_idempotency_key_covers_the_whole_batch(alice, bob, make_chain):
    make_chain("demo", models=[fake(tokens=2)])
    body = {"items": [{"input": {"topic": "a"}}, {"input": {"topic": "b"}}]}
    key = {"Idempotency-Key": "batch-1"}
    first = alice.post(BATCH, body, headers=key)
    again = alice.post(BATCH, body, headers=key)
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json() and again["Idempotent-Replayed"] == "true"
    assert Run.objects.count() == 2
    assert_problem(
        alice.post(BATCH, {"items": body["items"][:1]}, headers=key), 422, "idempotency_key_reused"
    )
    assert bob.post(BATCH, body, headers=key).json() != first.json()
    assert Run.objects.count() == 4


def test_batch_unknown_chain_or_version_is_404(alice, make_chain):
    make_chain("demo", models=[fake(tokens=2)])
    item = {"input": {"topic": "a"}}
    assert_problem(
        alice.post("/api/v1/chains/nope/runs/batch", {"items": [item]}), 404, "not_found"
    )
    assert_problem(alice.post(BATCH, {"items": [item], "version": 7}), 404, "not_found")


# --- End to end: a live server and an executor ------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_batch_and_rerun_runs_execute(live_server_url, worker, alice, make_chain):
    make_chain("demo", models=[fake(tokens=3)])
    headers = {"Authorization": f"Bearer {alice.raw_key}"}
    with httpx.Client(base_url=live_server_url, headers=headers, timeout=30) as http:
        items = [{"input": {"topic": f"t{i}"}} for i in range(5)]
        response = http.post("/api/v1/chains/demo/runs/batch", json={"items": items})
        assert response.status_code == 202, response.text
        ids = [h["run_id"] for h in response.json()["results"]]

        def ended():
            return all(http.get(f"/api/v1/runs/{i}").json()["status"] == "completed" for i in ids)

        wait_until(ended, 60, message="the batch to complete")
        rerun = http.post(f"/api/v1/runs/{ids[2]}/rerun", json={})
        assert rerun.status_code == 202, rerun.text
        new = rerun.json()["run_id"]
        wait_until(
            lambda: http.get(f"/api/v1/runs/{new}").json()["status"] == "completed",
            60,
            message="the rerun to complete",
        )
        run = http.get(f"/api/v1/runs/{new}").json()
        assert run["rerun_of"] == ids[2] and run["input"] == {"topic": "t2"}
        assert run["output"] == Run.objects.get(pk=ids[2]).output


def test_admin_rerun_goes_through_the_same_service(alice, make_chain):
    from runs.services import run_rerun

    make_chain("demo", models=[fake(tokens=2)])
    first = Run.objects.get(pk=create(alice)["run_id"])
    run_execute(run_id=str(first.id))
    new = run_rerun(api_key=alice.key, run=first)
    assert new.rerun_of_id == first.id and new.status == RunStatus.QUEUED
