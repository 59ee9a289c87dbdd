"""Faults injected into real processes: the invariants of docs/reliability.md (no run lost, none
executed twice, none stuck), at a scale that says something, with the figures printed as one
`FAULT name: ...` line per test.

Every test runs executors of its own (the `executors` fixture; the suite's shared one is stopped
for it), which claim queued runs from the database and recover the runs of a lost peer by
themselves every HEARTBEAT_S: no test calls the keeper. Each test ends by counting, over every
run it started: lost (accepted but missing or never ended), duplicates (an event log that shows
two executions at once, a seq gap or more than one end) and stuck (still queued or running when
the test's time is up).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
from django.conf import settings as django_settings
from django.utils import timezone

import runs.wakeup
from agentsvc.models import ApiKey, TokenWindow
from runs.models import ACTIVE_STATUSES, TERMINAL_EVENTS, Run, RunEvent, RunStatus
from runs.services import run_create
from tests.conftest import (
    ExecutorProcess,
    Proc,
    fake,
    free_port,
    process_env,
    start_web,
    wait_until,
)
from tests.fakes.tcp_proxy import TcpProxy
from tests.fakes.webhook_receiver import start_in_thread as start_receiver
from tests.sse_client import events
from tests.test_engine import requests_for
from tests.webhook_support import SECRET, hook_path
from webhooks.models import DeliveryStatus, WebhookAttempt, WebhookDelivery, WebhookMessage

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


# --- Counting -----------------------------------------------------------------------------------


def execution_problems(run_id) -> list[str]:
    """What the event log of a run says against the invariants: seq 1..n without a gap, one
    terminal event and it is the last, and one execution at a time (after `run.started`, the
    agents go 0, 1, ... from the agent a `run.resumed` names, until the end, a `run.queued`
    (recovered from a lost executor, or handed back on SIGTERM) or a `run.input_required` (it
    stopped to wait for a person); a completed run's output is exactly the chunks of its last
    agent's last execution)."""
    rows = list(
        RunEvent.objects.filter(run_id=run_id).order_by("seq").values_list("seq", "type", "data")
    )
    problems = []
    if [seq for seq, _, _ in rows] != list(range(1, len(rows) + 1)):
        problems.append("seq gap")
    ends = [t for _, t, _ in rows if t in TERMINAL_EVENTS]
    if len(ends) != 1 or rows[-1][1] not in TERMINAL_EVENTS:
        problems.append(f"ends {ends}")
    executing, agent, chunks = False, -1, {}
    for seq, type_, data in rows:
        if type_ in ("run.queued", "run.input_required"):
            executing = False
        elif type_ == "run.started":
            if executing:
                problems.append(f"#{seq} started while executing")
            executing, agent = True, -1
        elif type_ == "run.resumed":
            if not executing or agent != -1:
                problems.append(f"#{seq} resumed at {data['index']} in agent {agent}")
            agent = data["index"] - 1
        elif type_ == "agent.started":
            if not executing or data["index"] != agent + 1:
                problems.append(f"#{seq} agent {data['index']} after {agent}")
            agent = data["index"]
            chunks[agent] = ""
        elif type_ in ("agent.output", "agent.tool_call", "agent.tool_result", "agent.completed"):
            if not executing or data["index"] != agent:
                problems.append(f"#{seq} {type_} of agent {data['index']} in {agent}")
            if type_ == "agent.output":
                chunks[agent] = chunks.get(agent, "") + data["chunk"]
        elif type_ == "run.completed" and data["output"] != chunks.get(max(chunks, default=0), ""):
            problems.append("output is not the last execution's")
    return problems


def audit(run_ids) -> dict:
    """lost / duplicates / stuck over the runs a test started (ids it was answered with)."""
    ids = [str(i) for i in run_ids]
    found = {str(i): s for i, s in Run.objects.filter(pk__in=ids).values_list("id", "status")}
    problems = {i: p for i in found if (p := execution_problems(i))}
    return {
        "runs": len(ids),
        "lost": sum(1 for i in ids if i not in found),
        "duplicates": len(problems),
        "stuck": sum(1 for s in found.values() if s in ACTIVE_STATUSES),
        "problems": problems,
    }


def assert_clean(figures: dict) -> None:
    assert figures["lost"] == 0, figures
    assert figures["duplicates"] == 0, figures["problems"]
    assert figures["stuck"] == 0, figures


def report_figures(report, name: str, figures: dict, started: float, **more) -> None:
    shown = {k: v for k, v in figures.items() if k != "problems"}
    report(name, **shown, **more, seconds=f"{time.monotonic() - started:.1f}")


def all_ended(run_ids) -> bool:
    return not Run.objects.filter(pk__in=list(run_ids), status__in=ACTIVE_STATUSES).exists()


def wait_ended(run_ids, timeout: float, message: str = "every run to end") -> None:
    """Wait for the runs to end: the executors claim, execute and recover them by themselves."""
    wait_until(lambda: all_ended(run_ids), timeout, 0.3, message)


def requeued(run_ids, reason: str) -> int:
    """`run.queued` events with this reason (`worker_lost`: a peer recovered the run of a lost
    executor; `worker_shutdown`: an executor handed it back on SIGTERM)."""
    return RunEvent.objects.filter(
        run_id__in=list(run_ids), type="run.queued", data__reason=reason
    ).count()


def roomy(api) -> None:
    """Limits that let one key have hundreds of runs going (the defaults allow 60 a minute)."""
    ApiKey.objects.filter(pk=api.key.pk).update(
        runs_per_minute=1_000_000, tokens_per_minute=1_000_000_000, max_active_runs=100_000
    )
    api.key.refresh_from_db()


def create_runs(api, chain, n: int) -> list:
    return [
        run_create(api_key=api.key, chain=chain, run_input={"topic": f"t{i}"}, metadata={}).id
        for i in range(n)
    ]


def executor_pid(worker: str) -> int | None:
    """The pid in a run's `worker` claim (host:pid:nonce), None when no executor holds it."""
    return int(worker.split(":")[1]) if worker else None


def held_by(executor: ExecutorProcess, run_ids) -> list:
    """The runs, among `run_ids`, that this executor process is running now."""
    running = Run.objects.filter(pk__in=list(run_ids), status=RunStatus.RUNNING)
    pid = executor.proc.pid
    return [i for i, w in running.values_list("id", "worker") if executor_pid(w) == pid]


class SseFollower(threading.Thread):
    """Follows one run's SSE stream as EventSource does: on any drop or refusal it reconnects
    after 0.2 s with Last-Event-ID, until the terminal event or its deadline. It keeps every
    frame the server sent, so a seq sent twice or skipped shows."""

    def __init__(self, base_url: str, raw_key: str, run_id: str, deadline_s: float = 90) -> None:
        super().__init__(daemon=True)
        self.url = f"{base_url}/api/v1/runs/{run_id}/events"
        self.headers = {"Authorization": f"Bearer {raw_key}", "Accept": "text/event-stream"}
        self.run_id = run_id
        self.deadline_s = deadline_s
        self.frames: list[tuple[int, str]] = []
        self.connects = 0
        self.refusals: list[int] = []
        self.start()

    def run(self) -> None:
        deadline = time.monotonic() + self.deadline_s
        while time.monotonic() < deadline:
            headers = dict(self.headers)
            if self.frames:
                headers["Last-Event-ID"] = str(self.frames[-1][0])
            try:
                with httpx.stream(
                    "GET", self.url, headers=headers, timeout=httpx.Timeout(30, connect=2)
                ) as response:
                    if response.status_code != 200:
                        self.refusals.append(response.status_code)
                    else:
                        self.connects += 1
                        for frame in events(response.iter_lines()):
                            self.frames.append((frame.id, frame.event))
                            if frame.event in TERMINAL_EVENTS:
                                return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

    def check(self) -> dict:
        """Every seq of the run exactly once, in order, through its terminal event."""
        last_seq = Run.objects.values_list("last_seq", flat=True).get(pk=self.run_id)
        seqs = [seq for seq, _ in self.frames]
        return {
            "duplicates": len(seqs) - len(set(seqs)),
            "missing": last_seq - len(set(seqs)),
            "in_order": seqs == sorted(seqs),
            "ended": bool(self.frames) and self.frames[-1][1] in TERMINAL_EVENTS,
        }


def streams_figures(followers: list[SseFollower]) -> dict:
    checks = [f.check() for f in followers]
    return {
        "events": sum(len(f.frames) for f in followers),
        "dup_events": sum(c["duplicates"] for c in checks),
        "missing_events": sum(c["missing"] for c in checks),
        "out_of_order": sum(not c["in_order"] for c in checks),
        "unended_streams": sum(not c["ended"] for c in checks),
    }


def assert_streams_clean(figures: dict) -> None:
    assert figures["dup_events"] == 0, figures
    assert figures["missing_events"] == 0, figures
    assert figures["out_of_order"] == 0, figures
    assert figures["unended_streams"] == 0, figures


# --- 1. kill -9 an executor mid-runs -------------------------------------------------------------


@pytest.mark.timeout(150)
def test_kill9_worker_mid_runs(alice, make_chain, executors, fake_model, fault_report):
    """Two executors share 30 runs; one is killed (SIGKILL) while it executes runs. The other
    notices the stale heartbeat (cut to 2 s here) on its own and takes the runs over: every run
    completes, none twice."""
    roomy(alice)
    models = [fake(tokens=10, latency_ms=40), fake(tokens=10, latency_ms=40)]
    chain = make_chain("demo", models=models, timeout_s=60)
    # Fifteen runs at a time each: the thirty are shared out between the two.
    lifecycle = {"HEARTBEAT_S": "0.3", "WORKER_LOST_AFTER_S": "2", "RUN_CONCURRENCY": "15"}
    doomed = executors(**lifecycle)
    executors(**lifecycle)
    started = time.monotonic()
    ids = create_runs(alice, chain, 30)
    wait_until(lambda: len(held_by(doomed, ids)) >= 2, 30, message="the doomed executor to run two")
    killed = held_by(doomed, ids)
    doomed.kill()
    wait_ended(ids, 90)
    figures = audit(ids)
    statuses = Counter(Run.objects.filter(pk__in=ids).values_list("status", flat=True))
    retried = Run.objects.filter(pk__in=ids, attempt=2).count()
    agent_starts = RunEvent.objects.filter(run_id__in=ids, type="agent.started").count()
    model_requests = sum(requests_for(fake_model, m) for m in models)
    report_figures(
        fault_report,
        "kill9-worker",
        figures,
        started,
        faults=1,
        killed_mid_run=len(killed),
        retried=retried,
    )
    assert_clean(figures)
    assert statuses == {RunStatus.COMPLETED: 30}, statuses
    # The killed runs were taken over (a second execution after the peer's requeue)...
    assert set(Run.objects.filter(pk__in=killed).values_list("attempt", flat=True)) == {2}
    assert requeued(killed, "worker_lost") == len(killed)
    # ...and no execution happened that the log does not show: one model call per agent start,
    # except the calls of a killed execution whose agent.started was still waiting for its
    # group commit (at most one per agent of each killed run).
    assert model_requests <= agent_starts + len(killed) * len(models), (
        model_requests,
        agent_starts,
    )


# --- 2. a web process killed and restarted while clients stream --------------------------------


@pytest.mark.timeout(210)
def test_web_restart_mid_stream(alice, make_chain, executors, tmp_path, fault_report):
    """Ten SSE clients follow ten long runs through one daphne process, which is killed with
    SIGKILL and started again on the same port: each client reconnects with Last-Event-ID and
    gets every seq of its run exactly once, in order, through the terminal event."""
    make_chain("demo", models=[fake(tokens=60, latency_ms=50)], timeout_s=60)
    executors()
    env = process_env(MAX_ACTIVE_RUNS="100", DB_POOL_MAX="4")
    web, base = start_web(env, tmp_path / "web-1.log")
    port = int(base.rsplit(":", 1)[1])
    started = time.monotonic()
    try:
        headers = {"Authorization": f"Bearer {alice.raw_key}"}
        ids = [
            httpx.post(
                f"{base}/api/v1/chains/demo/runs",
                json={"input": {"topic": f"t{i}"}},
                headers=headers,
                timeout=30,
            ).json()["run_id"]
            for i in range(10)
        ]
        followers = [SseFollower(base, alice.raw_key, run_id) for run_id in ids]
        # Every client is streaming (all ten runs go at once: a client slow to connect would
        # otherwise make its first connection after the restart, with nothing to resume).
        wait_until(
            lambda: all(sum(t == "agent.output" for _, t in f.frames) >= 3 for f in followers),
            30,
            message="output streaming to every client",
        )
        os.kill(web.proc.pid, signal.SIGKILL)
        web.proc.wait()
        # What each client had when the process died; a run may have ended just before.
        at_kill = [list(f.frames) for f in followers]
        web.stop()
        killed_at = time.monotonic()
        # Ten clients knocking every 0.2 s on a busy machine: the restart may be slow.
        web, _ = start_web(env, tmp_path / "web-2.log", port=port, timeout=90)
        down_s = time.monotonic() - killed_at
        for follower in followers:
            follower.join(90)
        wait_ended(ids, 30)
    finally:
        web.stop()
    figures = audit(ids)
    streams = streams_figures(followers)
    cut = [
        (f, len(frames))
        for f, frames in zip(followers, at_kill, strict=True)
        if not any(t in TERMINAL_EVENTS for _, t in frames)
    ]
    resumed = sum(1 for f, n in cut if f.connects >= 2 and len(f.frames) > n)
    report_figures(
        fault_report,
        "web-restart",
        figures,
        started,
        faults=1,
        clients=len(followers),
        resumed=resumed,
        down_s=f"{down_s:.1f}",
        refusals=sum(len(f.refusals) for f in followers),
        **streams,
    )
    assert_clean(figures)
    assert_streams_clean(streams)
    # Every stream whose run was still going when the process died carried on from where it was.
    assert len(cut) >= len(followers) // 2, "most runs should still be going at the kill"
    assert resumed == len(cut), [(f.connects, len(f.frames), n) for f, n in cut]


# --- 3. the webhook receiver down, then up ------------------------------------------------------


@pytest.mark.timeout(150)
def test_webhook_receiver_down_then_up(alice, make_chain, executors, local_ok, fault_report):
    """30 runs end while their receiver's port refuses connections (each run's own webhook and
    a registered endpoint: 60 deliveries), attempted by the delivery pumps of two executors.
    Once every delivery failed twice the receiver comes up: each message arrives once per
    target, under the one webhook-id of its message."""
    local_ok.MAX_ACTIVE_RUNS = 100
    port = free_port()
    hooks, tag = f"http://127.0.0.1:{port}", uuid.uuid4().hex[:8]
    endpoint_path = f"/endpoint?tag={tag}"
    response = alice.post("/api/v1/webhook-endpoints", {"url": hooks + endpoint_path})
    assert response.status_code == 201, response.content
    chain = make_chain("demo", models=[fake(tokens=3)])
    for _ in range(2):
        executors(WEBHOOK_RETRY_SCHEDULE_S=",".join(["1"] * 40), WEBHOOK_TIMEOUT_S="2")
    started = time.monotonic()
    ids = [
        run_create(
            api_key=alice.key,
            chain=chain,
            run_input={"topic": f"t{i}"},
            metadata={},
            webhook={"url": f"{hooks}/run?tag={tag}&n={i}", "secret": SECRET},
        ).id
        for i in range(30)
    ]
    wait_ended(ids, 60)
    deliveries = WebhookDelivery.objects.filter(message__run_id__in=ids)
    wait_until(
        lambda: not deliveries.filter(attempt_count__lt=2).exists(),
        60,
        0.5,
        "every delivery to fail twice",
    )
    assert set(deliveries.values_list("status", flat=True)) == {DeliveryStatus.PENDING}
    receiver = start_receiver(port=port)
    try:
        wait_until(
            lambda: not deliveries.exclude(status=DeliveryStatus.SUCCEEDED).exists(),
            60,
            0.5,
            "every delivery to succeed",
        )
        with receiver.lock:
            received = list(receiver.received)
        # Every attempt is recorded; each delivery's last one succeeded, the others failed.
        attempts = sum(deliveries.values_list("attempt_count", flat=True))
        assert WebhookAttempt.objects.filter(delivery__in=deliveries).count() == attempts
        failed_attempts = attempts - deliveries.count()
    finally:
        receiver.shutdown()
        receiver.server_close()
    messages = dict(WebhookMessage.objects.filter(run_id__in=ids).values_list("id", "run_id"))
    expected = Counter()
    for msg_id, run_id in messages.items():
        n = ids.index(run_id)
        expected[(f"/run?tag={tag}&n={n}", msg_id)] = 1
        expected[(endpoint_path, msg_id)] = 1
    got = Counter(
        (r.path, {k.lower(): v for k, v in r.headers.items()}["webhook-id"]) for r in received
    )
    figures = audit(ids)
    report_figures(
        fault_report,
        "webhook-receiver-down",
        figures,
        started,
        faults=1,
        messages=len(messages),
        deliveries=deliveries.count(),
        failed_attempts=failed_attempts,
        received=len(received),
        missing=sum((expected - got).values()),
        dup_receipts=sum((got - expected).values()),
    )
    assert_clean(figures)
    assert len(messages) == 30 and deliveries.count() == 60
    assert got == expected


# --- 4. Redis stopped and started --------------------------------------------------------------


def start_redis(port: int, log: Path) -> Proc:
    """A private redis-server without persistence: stopping it loses the queue, as a crash
    would."""
    server = Proc(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        os.environ.copy(),
        log,
    )

    def up() -> bool:
        try:
            return redis.Redis(port=port, socket_connect_timeout=0.5).ping()
        except redis.RedisError:
            return False

    wait_until(up, 10, 0.05, "redis-server start")
    return server


def start_qcluster(env: dict[str, str], log: Path) -> Proc:
    """A django-q2 cluster (the schedules; readiness wants one alive on the service's Redis)."""
    proc = Proc([sys.executable, "manage.py", "qcluster"], env, log)
    wait_until(
        lambda: "running" in proc.output() or proc.proc.poll() is not None,
        30,
        message="qcluster start",
    )
    assert proc.proc.poll() is None, proc.output()
    return proc


@pytest.mark.timeout(180)
def test_redis_stopped_and_started(alice, make_chain, executors, tmp_path, fault_report):
    """A web, an executor (three runs at a time) and a qcluster on a private Redis, which is
    killed (its wake-ups lost) while 20 runs wait and one is streamed, then started again.
    While it is down /readyz says why, and run creation is refused with 503 problem+json (the
    request counters live in Redis, so nothing is accepted that could not be counted). The
    executor goes on claiming the waiting runs from the database: every accepted run ends, and
    the open stream gets every event once."""
    redis_port = free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    server = start_redis(redis_port, tmp_path / "redis-1.log")
    make_chain("demo", models=[fake(tokens=10, latency_ms=30)])
    make_chain("long", models=[fake(tokens=80, latency_ms=50)], timeout_s=60)
    executors(REDIS_URL=redis_url, RUN_CONCURRENCY="3")
    env = process_env(
        REDIS_URL=redis_url,
        Q_CLUSTER_NAME=f"faults-{uuid.uuid4().hex[:8]}",
        MAX_ACTIVE_RUNS="100",
        DB_POOL_MAX="4",
        MODEL_PROBE_CACHE_S="0",
    )
    schedules = start_qcluster(env, tmp_path / "qcluster.log")
    try:
        web, base = start_web(env, tmp_path / "web.log")
    except BaseException:
        schedules.stop()
        raise
    http = httpx.Client(
        base_url=base, timeout=30, headers={"Authorization": f"Bearer {alice.raw_key}"}
    )
    started = time.monotonic()
    try:
        wait_until(lambda: http.get("/readyz").status_code == 200, 30, 0.3, "ready")
        long_id = http.post("/api/v1/chains/long/runs", json={"input": {"topic": "x"}}).json()[
            "run_id"
        ]
        follower = SseFollower(base, alice.raw_key, long_id, deadline_s=120)
        wait_until(
            lambda: sum(t == "agent.output" for _, t in follower.frames) >= 3, 30, message="output"
        )
        accepted = [long_id]
        for i in range(20):
            response = http.post("/api/v1/chains/demo/runs", json={"input": {"topic": f"t{i}"}})
            assert response.status_code == 202, response.text
            accepted.append(response.json()["run_id"])

        waiting_at_kill = Run.objects.filter(pk__in=accepted, status=RunStatus.QUEUED).count()
        server.proc.kill()
        server.stop()
        down_at = time.monotonic()
        ready = http.get("/readyz")
        assert ready.status_code == 503, ready.text
        assert ready.json()["status"] == "not_ready"
        assert ready.json()["checks"]["broker"]["ok"] is False
        assert "Connection" in ready.json()["checks"]["broker"]["detail"]
        refused = 0
        for i in range(5):
            response = http.post("/api/v1/chains/demo/runs", json={"input": {"topic": f"d{i}"}})
            assert response.status_code == 503, response.text
            assert response.headers["Content-Type"] == "application/problem+json"
            assert response.json()["code"] == "service_unavailable"
            assert response.headers["Retry-After"]
            refused += 1
        # The open stream goes on meanwhile: readers re-check the database without wake-ups.
        outage_events = len(follower.frames)
        time.sleep(max(0.0, 2 - (time.monotonic() - down_at)))
        outage_events = len(follower.frames) - outage_events
        waiting_at_restart = Run.objects.filter(pk__in=accepted, status=RunStatus.QUEUED).count()
        server = start_redis(redis_port, tmp_path / "redis-2.log")
        down_s = time.monotonic() - down_at
        wait_ended(accepted, 90, "every accepted run to end")
        follower.join(60)
        wait_until(lambda: http.get("/readyz").status_code == 200, 30, 0.3, "ready again")
        after = http.post("/api/v1/chains/demo/runs", json={"input": {"topic": "after"}})
        assert after.status_code == 202, after.text
        accepted.append(after.json()["run_id"])
        wait_until(lambda: all_ended(accepted), 30, message="the run after the outage")
    finally:
        http.close()
        web.stop()
        schedules.stop()
        server.stop()
    figures = audit(accepted)
    streams = streams_figures([follower])
    report_figures(
        fault_report,
        "redis-restart",
        figures,
        started,
        faults=1,
        refused_503=refused,
        waiting_at_kill=waiting_at_kill,
        waiting_at_restart=waiting_at_restart,
        down_s=f"{down_s:.1f}",
        events_during_outage=outage_events,
        **streams,
    )
    assert_clean(figures)
    assert_streams_clean(streams)
    statuses = Counter(Run.objects.filter(pk__in=accepted).values_list("status", flat=True))
    assert statuses == {RunStatus.COMPLETED: len(accepted)}, statuses


def queue_waits(run_ids) -> list[float]:
    """Seconds from each run's creation to its start (its first claim)."""
    rows = Run.objects.filter(pk__in=list(run_ids)).values_list("created_at", "started_at")
    return sorted((started - created).total_seconds() for created, started in rows)


@pytest.mark.timeout(120)
def test_runs_start_without_a_message(
    alice, make_chain, executors, monkeypatch, settings, local_ok, receiver, tmp_path, fault_report
):
    """Nothing has to reach an executor for a run to start: a run accepted while no executor
    runs (its wake-up went nowhere) waits, queued, and the executor started later claims it
    from the database, completes it, settles its tokens and delivers its webhook. Then that
    executor's Redis dies: runs created meanwhile lose their wake-ups and start at the
    executor's next poll (EXECUTOR_POLL_S), not later."""
    poll_s = 2.0
    redis_port = free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    server = start_redis(redis_port, tmp_path / "redis.log")
    # This process publishes its wake-ups on that Redis too (the request counters stay on the
    # suite's), as a web process on that Redis would.
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [redis_url]},
        }
    }
    monkeypatch.setattr(runs.wakeup, "_publisher", runs.wakeup._Publisher())
    chain = make_chain("demo", models=[fake(tokens=5)])
    path = hook_path()
    body = {
        "input": {"topic": "x"},
        "webhook": {"url": receiver.base_url + path, "secret": SECRET},
    }
    started = time.monotonic()
    try:
        first = alice.post("/api/v1/chains/demo/runs", body, headers={"Idempotency-Key": "k1"})
        again = alice.post("/api/v1/chains/demo/runs", body, headers={"Idempotency-Key": "k1"})
        assert first.status_code == 202, first.content
        run_id = first.json()["run_id"]
        assert again.status_code == 202 and again.json()["run_id"] == run_id
        time.sleep(poll_s)  # nobody to start it: it waits, queued
        assert Run.objects.get(pk=run_id).status == RunStatus.QUEUED

        late = executors(REDIS_URL=redis_url, EXECUTOR_POLL_S=str(poll_s))
        late_at = time.monotonic()
        wait_ended([run_id], 30, "the run created before any executor")
        waited_s = time.monotonic() - late_at
        wait_until(lambda: receiver.requests_for(path), 30, message="the run's webhook")
        run = Run.objects.get(pk=run_id)
        assert run.status == RunStatus.COMPLETED, run.error_message
        assert executor_pid(run.worker) == late.proc.pid
        used = TokenWindow.objects.get(api_key=alice.key, window=run.tokens_window).used
        assert used == run.input_tokens + run.output_tokens  # the reservation was settled

        # Wake-ups reach the executor: runs start at once, not at its poll.
        awake = create_runs(alice, chain, 5)
        wait_ended(awake, 30, "the runs created with Redis up")
        server.proc.kill()
        server.stop()
        # Redis is gone: nothing wakes the executor, its poll finds the runs.
        asleep = []
        for i in range(5):
            asleep += create_runs(alice, chain, 1)
            time.sleep(poll_s * (i + 1) / 5)  # created at different points of its poll cycle
        wait_ended(asleep, 30, "the runs created with Redis down")
    finally:
        server.stop()
    ids = [run_id, *awake, *asleep]
    figures = audit(ids)
    awake_waits, asleep_waits = queue_waits(awake), queue_waits(asleep)
    report_figures(
        fault_report,
        "no-message",
        figures,
        started,
        faults=2,
        runs_created=Run.objects.filter(owner=alice.key.owner).count(),
        started_after_executor_s=f"{waited_s:.1f}",
        webhooks_received=len(receiver.requests_for(path)),
        poll_s=poll_s,
        wait_redis_up_max_s=f"{awake_waits[-1]:.2f}",
        wait_redis_down_max_s=f"{asleep_waits[-1]:.2f}",
    )
    assert_clean(figures)
    assert Run.objects.filter(owner=alice.key.owner).count() == len(ids)
    assert len(receiver.requests_for(path)) == 1
    assert set(Run.objects.filter(pk__in=ids).values_list("status", flat=True)) == {
        RunStatus.COMPLETED
    }
    # Without wake-ups a run waits for the executor's next poll, and no longer (a second of
    # slack for a busy machine).
    assert asleep_waits[-1] <= poll_s + 1.5, asleep_waits


# --- 5. PostgreSQL briefly unreachable ----------------------------------------------------------


@pytest.mark.timeout(180)
def test_postgres_briefly_unreachable(
    alice, make_chain, executors, qcluster, tmp_path, fault_report
):
    """A web and an executor reach PostgreSQL through a proxy that is cut for 2 s (the
    schedules' qcluster, which readiness wants alive, does not) while 40 runs are created, each
    with an Idempotency-Key. Every answer is 202 or a 503 problem; retrying each 503 with its
    key after the outage starts its run exactly once; every run has its first event (nothing
    half-written), and every run ends without restarting anything."""
    db = django_settings.DATABASES["default"]
    proxy = TcpProxy((db["HOST"], int(db["PORT"] or 5432)))
    via_proxy = f"postgres://{db['USER']}@127.0.0.1:{proxy.port}/{db['NAME']}"
    make_chain("demo", models=[fake(tokens=10, latency_ms=20)])
    executor = executors(DATABASE_URL=via_proxy, HEARTBEAT_S="0.3", WORKER_LOST_AFTER_S="2")
    # A request cut between recording its Idempotency-Key and answering cannot forget the key
    # (the database is gone): retries get 409 in progress until IDEMPOTENCY_LOCK_S, then start
    # over. The lock is cut from 120 s to 5 s here.
    env = process_env(
        MAX_ACTIVE_RUNS="100",
        DB_POOL_MAX="4",
        DB_POOL_TIMEOUT_S="1",
        IDEMPOTENCY_LOCK_S="5",
    )
    env["DATABASE_URL"] = via_proxy
    web, base = start_web(env, tmp_path / "web.log")
    headers = {"Authorization": f"Bearer {alice.raw_key}"}
    keys = [f"pg-outage-{i}" for i in range(40)]
    started = time.monotonic()

    def create(key: str) -> httpx.Response:
        return httpx.post(
            f"{base}/api/v1/chains/demo/runs",
            json={"input": {"topic": key}},
            headers={**headers, "Idempotency-Key": key},
            timeout=30,
        )

    def create_slowly(chunk: list[str]) -> list[tuple[str, httpx.Response]]:
        answers = []
        for key in chunk:
            answers.append((key, create(key)))
            time.sleep(0.1)
        return answers

    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(create_slowly, keys[i::4]) for i in range(4)]
            time.sleep(1)
            proxy.refuse()
            time.sleep(2)
            proxy.restore()
            answers = [a for f in futures for a in f.result()]
        statuses = Counter(r.status_code for _, r in answers)
        for _, response in answers:
            assert response.status_code in (202, 503), response.text
            if response.status_code == 503:
                assert response.headers["Content-Type"] == "application/problem+json"
                assert response.json()["code"] == "service_unavailable"
                assert "Traceback" not in response.text
        run_ids = {k: r.json()["run_id"] for k, r in answers if r.status_code == 202}
        retried = [k for k, r in answers if r.status_code == 503]
        retry_answers: Counter = Counter()
        for key in retried:

            def accepted(key=key):
                response = create(key)
                retry_answers[(response.status_code, response.json().get("code"))] += 1
                return response.status_code == 202 and response

            try:
                response = wait_until(accepted, 30, 0.5, f"{key} to be accepted")
            except AssertionError as e:
                raise AssertionError(f"{e}; answers to the retries: {dict(retry_answers)}") from e
            run_ids[key] = response.json()["run_id"]

        wait_ended(run_ids.values(), 90)
        after = create("pg-outage-after")
        assert after.status_code == 202, after.text
        run_ids["after"] = after.json()["run_id"]
        wait_until(lambda: all_ended(run_ids.values()), 30, message="the run after the outage")
        ready = httpx.get(f"{base}/readyz", timeout=30)
        assert ready.status_code == 200, ready.text
    finally:
        web.stop()
        proxy.close()
    figures = audit(run_ids.values())
    owned = Run.objects.filter(owner=alice.key.owner)
    headless = owned.exclude(events__seq=1).count()
    ends = Counter(owned.values_list("status", flat=True))
    retried_runs = owned.filter(attempt=2).count()
    report_figures(
        fault_report,
        "postgres-unreachable",
        figures,
        started,
        faults=1,
        answered_202=statuses[202],
        answered_503=statuses[503],
        answered_other=sum(n for s, n in statuses.items() if s not in (202, 503)),
        retries_409=sum(n for (status, _), n in retry_answers.items() if status == 409),
        runs_in_db=owned.count(),
        headless=headless,
        runs_retried=retried_runs,
        completed=ends[RunStatus.COMPLETED],
    )
    assert_clean(figures)
    # A run the outage cut mid-way is run again, not failed for a database blip.
    assert ends == {RunStatus.COMPLETED: len(run_ids)}, ends
    # One run per key, whatever the outage did to its first request.
    assert owned.count() == len(run_ids) == len(keys) + 1
    assert headless == 0
    assert "not found" not in executor.output()


# --- 6. the model server failing, slow and hanging ----------------------------------------------


@pytest.mark.timeout(120)
def test_model_failing_slow_hanging(alice, make_chain, executors, fault_report):
    """24 runs against a model that answers 500, one too slow for the chain's 1 s timeout, and
    one that sends a token and then nothing, on two executors of two runs at a time: each ends
    failed or timed_out with its code within its bound plus 2 s. Then four normal runs complete
    promptly on both executors: no slot of either is stuck."""
    roomy(alice)
    pair = [
        executors(
            RUN_CONCURRENCY="2",
            PROVIDER_READ_TIMEOUT_S="1",
            PROVIDER_RETRY_MAX_WAIT_S="0.2",
            HEARTBEAT_S="0.3",
            WORKER_LOST_AFTER_S="2",
        )
        for _ in range(2)
    ]
    grace = 2
    cases = {
        # name: (model, chain timeout, status, error code, bound in s)
        "failing": (fake(fail=500), 10, RunStatus.FAILED, "provider_error", 3),
        "slow": (fake(tokens=200, latency_ms=50), 1, RunStatus.TIMED_OUT, "chain_timed_out", 1),
        "hanging": (fake(hang=1), 10, RunStatus.FAILED, "provider_timeout", 1),
    }
    started = time.monotonic()
    runs: dict[str, list] = {}
    for name, (model, timeout_s, *_) in cases.items():
        chain = make_chain(name, models=[model], timeout_s=timeout_s)
        runs[name] = create_runs(alice, chain, 8)
    every = [i for ids in runs.values() for i in ids]
    wait_ended(every, 60, "every faulty run to end")
    late = []
    for name, (_, _, status, code, bound) in cases.items():
        for run in Run.objects.filter(pk__in=runs[name]):
            assert (run.status, run.error_code) == (status, code), (name, run.error_message)
            took = (run.finished_at - run.started_at).total_seconds()
            if took > bound + grace:
                late.append((name, took))

    chain = make_chain("normal", models=[fake(tokens=10, latency_ms=50)])
    normal_started = time.monotonic()
    normal = create_runs(alice, chain, 4)
    wait_ended(normal, 15, "the normal runs")
    normal_s = time.monotonic() - normal_started
    pids = {
        executor_pid(w) for w in Run.objects.filter(pk__in=normal).values_list("worker", flat=True)
    }
    figures = audit(every + normal)
    report_figures(
        fault_report,
        "model-fail-slow-hang",
        figures,
        started,
        faults=len(every),
        late=len(late),
        normal_after_s=f"{normal_s:.1f}",
        workers_free=len(pids),
    )
    assert_clean(figures)
    assert late == []
    assert set(Run.objects.filter(pk__in=normal).values_list("status", flat=True)) == {
        RunStatus.COMPLETED
    }
    # Two runs at a time each: four runs at once need both executors' two slots.
    assert pids == {e.proc.pid for e in pair}, [e.output()[-2000:] for e in pair]


# --- 7. SIGKILL an executor holding 200 runs, default lifecycle settings --------------------------


@pytest.mark.timeout(240)
def test_kill9_executor_holding_200_runs(alice, make_chain, executors, fake_model, fault_report):
    """One executor holds 200 runs mid-way when it is killed with SIGKILL; another is running.
    With the default heartbeat (HEARTBEAT_S 5, WORKER_LOST_AFTER_S 30) the survivor notices the
    silence by itself and runs all 200 again: each ends once, completed on its retry, with no
    seq gap and never two executions at once, within a minute of the kill."""
    roomy(alice)
    # About 8 s a run, at one event a run per 0.7 s: long enough that the survivor starts while
    # they are all in flight, light enough for 200 at once on a small machine.
    model = fake(tokens=12, latency_ms=700)
    chain = make_chain("held", models=[model], timeout_s=120)
    started = time.monotonic()
    ids = create_runs(alice, chain, 200)  # no executor yet: they wait, queued
    doomed = executors()
    wait_until(lambda: len(held_by(doomed, ids)) == 200, 60, 0.2, "the doomed to hold 200")
    survivor = executors()
    held = held_by(doomed, ids)
    agent_outputs = RunEvent.objects.filter(run_id__in=held, type="agent.output").count()
    doomed.kill()
    killed_at = time.monotonic()
    wait_ended(ids, 60, "every run to end within a minute of the kill")
    recovery_s = time.monotonic() - killed_at
    figures = audit(ids)
    statuses = Counter(Run.objects.filter(pk__in=ids).values_list("status", flat=True))
    retried = requeued(ids, "worker_lost")
    agent_starts = RunEvent.objects.filter(run_id__in=ids, type="agent.started").count()
    model_requests = requests_for(fake_model, model)
    report_figures(
        fault_report,
        "kill9-executor-200",
        figures,
        started,
        faults=1,
        held_at_kill=len(held),
        outputs_before_kill=agent_outputs,
        retried=retried,
        recovery_s=f"{recovery_s:.1f}",
        heartbeat_s=django_settings.HEARTBEAT_S,
        lost_after_s=django_settings.WORKER_LOST_AFTER_S,
    )
    assert len(held) == 200, "every run should be in flight on the doomed executor at the kill"
    assert_clean(figures)
    assert statuses == {RunStatus.COMPLETED: 200}, statuses
    # Each was recovered once (worker_lost) and completed by the survivor on its second attempt.
    assert retried == 200
    runs = Run.objects.filter(pk__in=ids)
    assert set(runs.values_list("attempt", flat=True)) == {2}
    assert {executor_pid(w) for w in runs.values_list("worker", flat=True)} == {survivor.proc.pid}
    # One model call per logged agent start, but for the killed executions' agent.started still
    # waiting for their group commit at the kill (one agent per run here).
    assert model_requests <= agent_starts + len(held), (model_requests, agent_starts)


# --- 8. SIGTERM an executor with 200 runs in flight -----------------------------------------------


@pytest.mark.timeout(240)
def test_sigterm_executor_with_200_runs_in_flight(
    alice, make_chain, executors, fake_model, fault_report
):
    """One executor holds 200 runs when it gets SIGTERM (WORKER_DRAIN_S 2); another is running.
    It claims nothing more, lets the runs that end within the drain finish (100 short ones,
    signalled as the first of them ends) and hands the others back to the queue
    (`run.queued`, reason worker_shutdown), where the other executor starts them again at once.
    Every run completes, once; none is lost or executed twice at a time."""
    roomy(alice)
    drain_s = 2
    short_model, long_model = fake(tokens=10, latency_ms=800), fake(tokens=16, latency_ms=800)
    short = make_chain("short", models=[short_model], timeout_s=120)
    long = make_chain("long", models=[long_model], timeout_s=120)
    started = time.monotonic()
    short_ids, long_ids = create_runs(alice, short, 100), create_runs(alice, long, 100)
    ids = short_ids + long_ids
    leaving = executors(WORKER_DRAIN_S=str(drain_s))
    wait_until(lambda: len(held_by(leaving, ids)) == 200, 60, 0.2, "the leaving to hold 200")
    staying = executors(WORKER_DRAIN_S=str(drain_s))
    # The short runs started within a moment of each other: once the first has ended, the
    # others end within the drain.
    wait_until(
        lambda: Run.objects.filter(pk__in=short_ids, status=RunStatus.COMPLETED).exists(),
        60,
        0.05,
        "a short run to end",
    )
    in_flight = len(held_by(leaving, ids))
    signalled = timezone.now()
    signalled_mono = time.monotonic()
    leaving.terminate(timeout=drain_s + 30)
    exit_s = time.monotonic() - signalled_mono
    wait_ended(ids, 90, "every run to end")

    figures = audit(ids)
    runs = Run.objects.filter(pk__in=ids)
    statuses = Counter(runs.values_list("status", flat=True))
    handed_back = set(
        RunEvent.objects.filter(
            run_id__in=ids, type="run.queued", data__reason="worker_shutdown"
        ).values_list("run_id", flat=True)
    )
    by_leaving = [
        (run_id, finished_at)
        for run_id, worker, finished_at in runs.values_list("id", "worker", "finished_at")
        if executor_pid(worker) == leaving.proc.pid
    ]
    finished_in_drain = sum(1 for _, at in by_leaving if at >= signalled)
    finished_before = len(by_leaving) - finished_in_drain
    restarts = []
    for run_id in handed_back:
        events_ = list(
            RunEvent.objects.filter(run_id=run_id, type__in=["run.queued", "run.started"])
            .order_by("seq")
            .values_list("type", "created_at")
        )
        back = max(at for t, at in events_ if t == "run.queued")
        again = min(at for t, at in events_ if t == "run.started" and at >= back)
        restarts.append((again - back).total_seconds())
    agent_starts = RunEvent.objects.filter(run_id__in=ids, type="agent.started").count()
    model_requests = requests_for(fake_model, short_model) + requests_for(fake_model, long_model)
    report_figures(
        fault_report,
        "sigterm-executor-200",
        figures,
        started,
        faults=1,
        in_flight_at_sigterm=in_flight,
        finished_before_sigterm=finished_before,
        finished_in_drain=finished_in_drain,
        handed_back=len(handed_back),
        drain_s=drain_s,
        exit_s=f"{exit_s:.1f}",
        restart_max_s=f"{max(restarts, default=0):.2f}",
    )
    assert leaving.proc.returncode == 0, leaving.output()[-2000:]  # it exited by itself
    assert_clean(figures)
    assert statuses == {RunStatus.COMPLETED: 200}, statuses
    # Each run either finished on the leaving executor or was handed back, never both...
    assert not handed_back & {run_id for run_id, _ in by_leaving}
    assert finished_before + finished_in_drain + len(handed_back) == 200
    # ...the long ones could not finish in the drain: all handed back, each once, and completed
    # by the staying executor (a hand-back is not a failure: the attempt stays 1).
    assert set(long_ids) <= handed_back
    assert requeued(ids, "worker_shutdown") == len(handed_back)
    back = runs.filter(pk__in=handed_back)
    assert {executor_pid(w) for w in back.values_list("worker", flat=True)} == {staying.proc.pid}
    assert set(runs.values_list("attempt", flat=True)) == {1}
    assert model_requests <= agent_starts, (model_requests, agent_starts)


# --- 9. two executors claiming the same 300 runs ------------------------------------------------


@pytest.mark.timeout(180)
def test_two_executors_claim_300_runs_once_each(
    alice, make_chain, fake_model, tmp_path, fault_report
):
    """300 queued runs, each on a chain with a model of its own, and two executors started at
    the same moment (fifty runs at a time each, so they claim against each other round after
    round): each run is claimed and executed exactly once, one `run.started` and one request
    to its model."""
    roomy(alice)
    models = [fake(tokens=5, latency_ms=100) for _ in range(300)]
    chains = [make_chain(f"c{i}", models=[m]) for i, m in enumerate(models)]
    started = time.monotonic()
    ids = [create_runs(alice, chain, 1)[0] for chain in chains]
    pair: list[ExecutorProcess] = []
    try:
        with ThreadPoolExecutor(2) as pool:
            futures = [
                pool.submit(ExecutorProcess, tmp_path / f"claimer-{n}.log", RUN_CONCURRENCY="50")
                for n in "ab"
            ]
        # Both starts are over here: keep what came up (to kill it), then raise any failure.
        pair = [f.result() for f in futures if f.exception() is None]
        for future in futures:
            future.result()
        wait_ended(ids, 120)
    finally:
        for proc in pair:
            proc.kill()
    figures = audit(ids)
    starts = Counter(
        RunEvent.objects.filter(run_id__in=ids, type="run.started").values_list("run_id", flat=True)
    )
    stats = httpx.get(fake_model.base_url.replace("/v1", "/_stats")).json()
    requests = Counter(stats.get(m, 0) for m in models)
    runs = Run.objects.filter(pk__in=ids)
    per_executor = Counter(executor_pid(w) for w in runs.values_list("worker", flat=True))
    report_figures(
        fault_report,
        "two-executors-300",
        figures,
        started,
        executor_a=per_executor[pair[0].proc.pid],
        executor_b=per_executor[pair[1].proc.pid],
        started_twice=sum(1 for n in starts.values() if n > 1),
        model_requests=sum(stats.get(m, 0) for m in models),
    )
    assert_clean(figures)
    assert set(runs.values_list("status", flat=True)) == {RunStatus.COMPLETED}
    assert set(starts.values()) == {1} and len(starts) == 300
    assert requests == {1: 300}, requests
    assert set(per_executor) == {p.proc.pid for p in pair}, per_executor
