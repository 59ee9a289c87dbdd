"""Runs through real processes: daphne serving the API, an executor running them."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from runs.models import Run, RunEvent, RunStatus
from tests.conftest import ROOT, fake, process_env, wait_until
from tests.test_engine import requests_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def http(live_server_url, worker, alice):
    with httpx.Client(
        base_url=live_server_url, timeout=30, headers={"Authorization": f"Bearer {alice.raw_key}"}
    ) as client:
        yield client


def wait_terminal(http, run_id: str, timeout: float = 30) -> dict:
    def done():
        body = http.get(f"/api/v1/runs/{run_id}").json()
        return body if body["status"] not in ("queued", "running") else None

    return wait_until(done, timeout, 0.05, f"run {run_id} to end")


def test_run_lifecycle_through_worker(http, make_chain):
    make_chain("demo", models=[fake(tokens=5), fake(tokens=7), fake(tokens=9)])
    response = http.post("/api/v1/chains/demo/runs", json={"input": {"topic": "tides"}})
    assert response.status_code == 202
    run_id = response.json()["run_id"]
    assert response.headers["Location"] == f"/api/v1/runs/{run_id}"
    body = wait_terminal(http, run_id)
    assert body["status"] == "completed"
    assert body["progress"]["agents_completed"] == 3
    assert body["usage"]["output_tokens"] == 21
    assert body["duration_ms"] is not None and body["finished_at"]
    assert len(body["output"].split()) == 9
    events = http.get(f"/api/v1/runs/{run_id}/events", params={"limit": 1000}).json()["results"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["event"] == "run.queued" and events[-1]["event"] == "run.completed"


def test_invoke_returns_finished_run(http, make_chain):
    make_chain("demo", models=[fake(tokens=5)])
    response = http.post("/api/v1/chains/demo/invoke", json={"input": {"topic": "x"}})
    assert response.status_code == 200
    assert response.json()["status"] == "completed"
    assert response.json()["usage"]["output_tokens"] == 5


def test_invoke_hands_back_a_handle_when_slow(http, make_chain):
    make_chain("demo", models=[fake(tokens=30, latency_ms=50)])
    started = time.monotonic()
    response = http.post(
        "/api/v1/chains/demo/invoke", json={"input": {"topic": "x"}, "wait_s": 0.3}
    )
    assert time.monotonic() - started < 5
    assert response.status_code == 202
    run_id = response.json()["run_id"]
    assert response.headers["Location"] == f"/api/v1/runs/{run_id}"
    # The run goes on: no work thrown away.
    assert wait_terminal(http, run_id)["status"] == "completed"


def test_invoke_failed_chain_is_502(http, make_chain):
    make_chain("demo", models=[fake(fail=401)])
    response = http.post("/api/v1/chains/demo/invoke", json={"input": {"topic": "x"}})
    assert response.status_code == 502
    assert response.headers["Content-Type"] == "application/problem+json"
    body = response.json()
    assert body["code"] == "chain_failed"
    assert body["error"]["code"] == "provider_auth_failed"
    assert Run.objects.get(pk=body["run_id"]).status == RunStatus.FAILED


def test_invoke_failure_is_replayed_as_problem(http, make_chain):
    make_chain("demo", models=[fake(fail=401)])
    headers = {"Idempotency-Key": "failing-1"}
    first = http.post("/api/v1/chains/demo/invoke", json={"input": {"topic": "x"}}, headers=headers)
    second = http.post(
        "/api/v1/chains/demo/invoke", json={"input": {"topic": "x"}}, headers=headers
    )
    assert first.status_code == second.status_code == 502
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.headers["Content-Type"] == "application/problem+json"
    assert second.json() == first.json()
    assert Run.objects.count() == 1


def test_invoke_timed_out_chain_is_504(http, make_chain):
    make_chain("demo", models=[fake(tokens=100, latency_ms=30)], timeout_s=1)
    response = http.post("/api/v1/chains/demo/invoke", json={"input": {"topic": "x"}})
    assert response.status_code == 504
    body = response.json()
    assert body["code"] == "chain_timed_out"
    assert Run.objects.get(pk=body["run_id"]).status == RunStatus.TIMED_OUT


def test_cancel_while_running(http, make_chain, fake_model):
    model = fake(tokens=400, latency_ms=25)
    make_chain("demo", models=[model, fake(tokens=3)])
    run_id = http.post("/api/v1/chains/demo/runs", json={"input": {"topic": "x"}}).json()["run_id"]
    wait_until(
        lambda: RunEvent.objects.filter(run_id=run_id, type="agent.output").exists(),
        20,
        message="first output",
    )
    response = http.post(f"/api/v1/runs/{run_id}/cancel")
    assert response.status_code == 202
    assert response.json()["cancel_requested"] is True
    cancel_sent = time.monotonic()
    body = wait_terminal(http, run_id, 10)
    stopped_after = time.monotonic() - cancel_sent
    assert body["status"] == "cancelled"
    assert stopped_after < 2, stopped_after
    last = RunEvent.objects.filter(run_id=run_id).order_by("-seq").first()
    assert last.type == "run.cancelled" and last.data["reason"] == "api"
    # The second agent never started.
    assert not RunEvent.objects.filter(run_id=run_id, type="agent.started", data__index=1).exists()
    assert http.post(f"/api/v1/runs/{run_id}/cancel").status_code == 200


CONTENDER = """
import time, django
django.setup()
from runs.execution.executor import run_execute
time.sleep(max(0, {at} - time.time()))
run_execute(run_id="{run_id}")
"""


def test_two_workers_never_run_one_run(alice, make_chain, fake_model):
    """Five processes race to execute the same run at the same instant: one wins."""
    models = [fake(tokens=20, latency_ms=5), fake(tokens=20, latency_ms=5)]
    chain = make_chain("demo", models=models)
    # Created outside the queue: only the contenders below try to run it.
    run = Run.objects.create(
        owner=alice.key.owner, api_key=alice.key, chain=chain, input={"topic": "x"}, agents_total=2
    )
    at = time.time() + 3
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONTENDER.format(at=at, run_id=run.id)],
            cwd=ROOT,
            env=process_env(DJANGO_SETTINGS_MODULE="agentsvc.settings"),
        )
        for _ in range(5)
    ]
    for proc in procs:
        assert proc.wait(timeout=60) == 0
    run.refresh_from_db()
    assert run.status == RunStatus.COMPLETED
    types = list(RunEvent.objects.filter(run=run).order_by("seq").values_list("type", flat=True))
    assert types.count("run.started") == 1
    assert types.count("agent.started") == 2
    assert types.count("run.completed") == 1
    assert [requests_for(fake_model, m) for m in models] == [1, 1]
    seqs = list(RunEvent.objects.filter(run=run).order_by("seq").values_list("seq", flat=True))
    assert seqs == list(range(1, len(seqs) + 1))


def test_a_queued_run_starts_at_once_not_at_the_next_poll(alice, make_chain, executors):
    """The wake-up on the channel layer starts a run within milliseconds; the poll is only the
    fallback (here 30 s, so a start after more than a few seconds means no wake-up came)."""
    from runs.services import run_create

    executors(EXECUTOR_POLL_S="30")
    chain = make_chain("demo", models=[fake(tokens=2)])
    # The first poll happens as the executor starts: the run made after it needs a wake-up.
    time.sleep(1)
    waits = []
    for _ in range(3):
        run = run_create(api_key=alice.key, chain=chain, run_input={"topic": "x"}, metadata={})
        wait_until(
            lambda run=run: Run.objects.get(pk=run.id).started_at, 10, message="the run to start"
        )
        run.refresh_from_db()
        waits.append((run.started_at - run.created_at).total_seconds())
    assert max(waits) < 2, waits
    wait_until(
        lambda: not Run.objects.filter(status__in=["queued", "running"]).exists(),
        20,
        message="the runs to end",
    )


def test_a_cancel_reaches_its_executor_at_once_not_at_the_next_poll(alice, make_chain, executors):
    """The cancel's wake-up makes the executor look at once; its poll (here 5 s) is only the
    fallback. The model says nothing meanwhile: the run is stopped mid-wait."""
    from runs.services import run_cancel, run_create

    executors(EXECUTOR_CANCEL_POLL_MS="5000")
    chain = make_chain("demo", models=[fake(hang=20, tokens=5)], timeout_s=60)
    time.sleep(1)  # the executor's listener has joined its group
    run = run_create(api_key=alice.key, chain=chain, run_input={"topic": "x"}, metadata={})
    wait_until(
        lambda: RunEvent.objects.filter(run=run, type="agent.started").exists(),
        10,
        message="the agent to start",
    )
    run_cancel(run=run, reason="api")
    wait_until(
        lambda: Run.objects.get(pk=run.id).status == RunStatus.CANCELLED, 10, 0.01, "cancelled"
    )
    run.refresh_from_db()
    assert (run.finished_at - run.cancel_requested_at).total_seconds() < 2
