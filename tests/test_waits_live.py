"""Runs that wait for a person, on the wire: real daphne processes and executors. Two answers
raced from two web processes, the stream that stays open through a wait, invoke, the Python
client and CLI, and every process restarted while 200 runs wait."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from agentsvc_client import INPUT_REQUIRED, AsyncClient, Client, ConflictError

from runs.chains import chain_publish
from runs.models import Run, RunEvent, RunStatus, RunStep
from tests.conftest import fake, process_env, start_web, wait_until
from tests.sse_client import parse_lines
from tests.test_engine import requests_for
from tests.test_faults import assert_clean, audit, report_figures, roomy

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

SCRIPT = str(Path(sys.executable).parent / "agentsvc")


def gate_chain(fake_model, name: str = "gate", model: str | None = None, **agent):
    chain, _ = chain_publish(
        definition={
            "name": name,
            "timeout_s": 120,
            "input_schema": {"type": "object"},
            "agents": [
                {
                    "name": "writer",
                    "provider": "local",
                    "model": model or fake(tokens=4),
                    "base_url": fake_model.base_url,
                    "prompt": "Write on {{ input.topic }}",
                    **(agent or {"approval": {"prompt": "Publish {{ input.topic }}?"}}),
                }
            ],
        }
    )
    return chain


def headers(api) -> dict[str, str]:
    return {"Authorization": f"Bearer {api.raw_key}"}


def create(base: str, api, chain: str, topic: str = "tides") -> str:
    response = httpx.post(
        f"{base}/api/v1/chains/{chain}/runs",
        json={"input": {"topic": topic}},
        headers=headers(api),
        timeout=30,
    )
    assert response.status_code == 202, response.text
    return response.json()["run_id"]


def waiting(run_ids) -> bool:
    return Run.objects.filter(pk__in=list(run_ids), status=RunStatus.INPUT_REQUIRED).count() == len(
        run_ids
    )


def request_id(run_id) -> str:
    return Run.objects.values_list("input_request", flat=True).get(pk=run_id)["request_id"]


def test_two_answers_raced_from_two_processes_one_wins(
    alice, fake_model, live_server_url, worker, tmp_path
):
    """Twenty waiting runs, each answered at the same instant through two daphne processes
    (one approving, one refusing): per run exactly one 202 and one 409, and the run carries
    the answer that got the 202."""
    gate_chain(fake_model)
    roomy(alice)
    other, other_url = start_web(process_env(), tmp_path / "web-2.log")
    try:
        ids = [create(live_server_url, alice, "gate", f"t{i}") for i in range(20)]
        wait_until(lambda: waiting(ids), 60, 0.1, "every run to wait")
        outcomes: dict[str, list[tuple[int, bool]]] = {run_id: [] for run_id in ids}
        for run_id in ids:
            rid = request_id(run_id)
            barrier = threading.Barrier(2)

            def answer(base: str, approve: bool, run_id=run_id, rid=rid, barrier=barrier):
                with httpx.Client(base_url=base, headers=headers(alice), timeout=30) as http:
                    http.get("/healthz")  # connected before the race starts
                    barrier.wait()
                    response = http.post(
                        f"/api/v1/runs/{run_id}/input", json={"request_id": rid, "approve": approve}
                    )
                outcomes[run_id].append((response.status_code, approve, response.json()))

            threads = [
                threading.Thread(target=answer, args=(live_server_url, True)),
                threading.Thread(target=answer, args=(other_url, False)),
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
        wait_until(
            lambda: (
                not Run.objects.filter(
                    pk__in=ids, status__in=[RunStatus.QUEUED, RunStatus.RUNNING]
                ).exists()
            ),
            60,
            0.2,
            "every run to end",
        )
    finally:
        other.stop()
    for run_id, answers in outcomes.items():
        statuses = sorted(status for status, _, _ in answers)
        assert statuses == [202, 409], answers
        loser = next(body for status, _, body in answers if status == 409)
        assert loser["code"] == "input_already_received"
        approved = next(approve for status, approve, _ in answers if status == 202)
        step = RunStep.objects.get(run_id=run_id, key="a0/approval")
        assert step.data["approve"] is approved
        assert RunEvent.objects.filter(run_id=run_id, type="run.input_received").count() == 1
        run = Run.objects.get(pk=run_id)
        assert run.status == (RunStatus.COMPLETED if approved else RunStatus.FAILED)
    winners = Counter(approve for a in outcomes.values() for s, approve, _ in a if s == 202)
    assert sum(winners.values()) == len(ids)


def test_stream_stays_open_through_the_wait(alice, fake_model, tmp_path, executors):
    """One SSE connection follows a run through its request (pings while it waits) and, once
    answered, to its end."""
    gate_chain(fake_model, name="streamed")
    executors()
    web, base = start_web(process_env(SSE_PING_S="0.5"), tmp_path / "web.log")
    try:
        run_id = create(base, alice, "streamed")
        frames, pings = [], []

        def follow():
            with httpx.stream(
                "GET",
                f"{base}/api/v1/runs/{run_id}/events",
                headers={**headers(alice), "Accept": "text/event-stream"},
                timeout=60,
            ) as response:
                for frame in parse_lines(response.iter_lines()):
                    if frame.event is None:
                        pings.extend(c for c in frame.comments if "ping" in c)
                        continue
                    frames.append(frame)
                    if frame.event == "run.completed":
                        return

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        wait_until(lambda: any(f.event == "run.input_required" for f in frames), 30)
        pings_before = len(pings)
        wait_until(lambda: len(pings) >= pings_before + 2, 10, message="pings while waiting")
        rid = next(f.data["request_id"] for f in frames if f.event == "run.input_required")
        answered = httpx.post(
            f"{base}/api/v1/runs/{run_id}/input",
            json={"request_id": rid, "approve": True},
            headers=headers(alice),
        )
        assert answered.status_code == 202
        reader.join(30)
    finally:
        web.stop()
    seen = [f.event for f in frames]
    assert seen[:3] == ["run.queued", "run.started", "run.input_required"]
    assert seen[3:7] == ["run.input_received", "run.queued", "run.started", "run.resumed"]
    assert seen[-1] == "run.completed"
    assert [f.id for f in frames] == list(range(1, len(frames) + 1))


def test_invoke_answers_a_waiting_run_with_its_request(alice, fake_model, live_server_url, worker):
    gate_chain(fake_model, name="invoked")
    started = time.monotonic()
    response = httpx.post(
        f"{live_server_url}/api/v1/chains/invoked/invoke",
        json={"input": {"topic": "tides"}, "wait_s": 30},
        headers=headers(alice),
        timeout=60,
    )
    assert time.monotonic() - started < 20  # it did not wait out wait_s
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "input_required"
    assert body["input_request"]["prompt"] == "Publish tides?"
    assert response.headers["Location"] == f"/api/v1/runs/{body['run_id']}"


def test_python_clients_wait_reports_the_request_and_respond_answers(
    alice, fake_model, live_server_url, worker
):
    gate_chain(fake_model, name="client-gate")
    gate_chain(
        fake_model,
        name="client-ask",
        ask={"prompt": "City?", "schema": {"type": "object", "required": ["city"]}},
    )
    with Client(live_server_url, alice.raw_key) as client:
        handle = client.runs.create("client-gate", {"topic": "tides"})
        run = client.runs.wait(handle["run_id"], 60)
        assert run["status"] == INPUT_REQUIRED
        rid = run["input_request"]["request_id"]
        assert client.runs.respond(run["run_id"], rid, approve=True)["status"] == "queued"
        with pytest.raises(ConflictError) as again:
            client.runs.respond(run["run_id"], rid, approve=True)
        assert again.value.code == "input_already_received"
        assert client.runs.wait(run["run_id"], 60)["status"] == "completed"
        with pytest.raises(ValueError):
            client.runs.respond(run["run_id"], rid)

    async def asynchronously():
        async with AsyncClient(live_server_url, alice.raw_key) as client:
            handle = await client.runs.create("client-ask", {"topic": "tides"})
            run = await client.runs.wait(handle["run_id"], 60)
            assert run["status"] == INPUT_REQUIRED and run["input_request"]["kind"] == "input"
            rid = run["input_request"]["request_id"]
            await client.runs.respond(run["run_id"], rid, input={"city": "Oslo"})
            return await client.runs.wait(run["run_id"], 60)

    import asyncio

    assert asyncio.run(asynchronously())["status"] == "completed"


def test_cli_wait_reports_a_waiting_run_and_respond_answers_it(
    alice, fake_model, live_server_url, worker
):
    gate_chain(fake_model, name="cli-gate")
    env = {**os.environ, "AGENTSVC_URL": live_server_url, "AGENTSVC_API_KEY": alice.raw_key}

    def cli(*args: str):
        return subprocess.run([SCRIPT, *args], env=env, capture_output=True, text=True, timeout=90)

    waited = cli("run", "cli-gate", "--input", '{"topic": "tides"}', "--wait")
    assert waited.returncode == 6, waited.stderr
    assert "status    input_required" in waited.stdout
    assert "asks      approval: Publish tides?" in waited.stdout
    run_id = waited.stdout.split()[1]
    answered = cli("respond", run_id, "--approve")
    assert answered.returncode == 0, answered.stderr
    assert f"run {run_id} is queued" in answered.stdout
    again = cli("respond", run_id, "--refuse")
    assert again.returncode == 2 and "not waiting" in again.stderr
    wait_until(lambda: Run.objects.get(pk=run_id).status == RunStatus.COMPLETED, 60)
    streamed = cli("run", "cli-gate", "--input", '{"topic": "x"}', "--stream")
    assert streamed.returncode == 6, streamed.stderr
    assert "asks      approval: Publish x?" in streamed.stdout


# --- Fault: every process restarted while 200 runs wait --------------------------------------


@pytest.mark.timeout(300)
def test_restart_every_process_while_200_runs_wait(
    alice, fake_model, executors, tmp_path, fault_report
):
    """200 runs wait for an approval when the web process and the executor are killed
    (SIGKILL) and started again: every run still waits, unchanged; answered through the new
    web process, each resumes once on the new executor (one answer, one resumed execution,
    one model call) and completes."""
    roomy(alice)
    model = fake(tokens=4)
    gate_chain(fake_model, name="held", model=model)
    started = time.monotonic()
    executor = executors()
    web, base = start_web(process_env(DB_POOL_MAX="4"), tmp_path / "web-1.log")
    port = int(base.rsplit(":", 1)[1])
    try:
        ids = [create(base, alice, "held", f"t{i}") for i in range(200)]
        wait_until(lambda: waiting(ids), 120, 0.2, "all 200 to wait")
        before = dict(Run.objects.filter(pk__in=ids).values_list("id", "last_seq"))
        os.kill(web.proc.pid, 9)
        executor.kill()
        web.proc.wait()
        web.stop()
        still = Run.objects.filter(pk__in=ids, status=RunStatus.INPUT_REQUIRED)
        assert still.count() == 200
        executor = executors()
        web, _ = start_web(process_env(DB_POOL_MAX="4"), tmp_path / "web-2.log", port=port)
        assert dict(Run.objects.filter(pk__in=ids).values_list("id", "last_seq")) == before
        assert waiting(ids)

        requests = {run_id: request_id(run_id) for run_id in ids}

        def answer(run_id) -> int:
            with httpx.Client(base_url=base, headers=headers(alice), timeout=30) as http:
                body = {"request_id": requests[run_id], "approve": True}
                return http.post(f"/api/v1/runs/{run_id}/input", json=body).status_code

        with ThreadPoolExecutor(8) as pool:
            answered = list(pool.map(answer, ids))
        wait_until(
            lambda: Run.objects.filter(pk__in=ids, status=RunStatus.COMPLETED).count() == 200,
            120,
            0.3,
            "every run to complete",
        )
    finally:
        web.stop()
    figures = audit(ids)
    received = Counter(
        RunEvent.objects.filter(run_id__in=ids, type="run.input_received").values_list(
            "run_id", flat=True
        )
    )
    resumed = Counter(
        RunEvent.objects.filter(run_id__in=ids, type="run.resumed").values_list("run_id", flat=True)
    )
    agent_starts = RunEvent.objects.filter(run_id__in=ids, type="agent.started").count()
    model_calls = requests_for(fake_model, model)
    report_figures(
        fault_report,
        "restart-while-200-wait",
        figures,
        started,
        faults=2,
        answered_202=answered.count(202),
        resumed=sum(resumed.values()),
        model_calls=model_calls,
    )
    assert answered == [202] * 200
    assert_clean(figures)
    assert set(received.values()) == {1} and len(received) == 200
    assert set(resumed.values()) == {1} and len(resumed) == 200
    assert agent_starts == 200 and model_calls == 200
