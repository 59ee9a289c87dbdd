"""Faults injected into real processes: the invariants of DESIGN.md, at a scale that says
something, with the figures printed as one `FAULT name: ...` line per test.

Every test runs its own qcluster(s) on a queue of its own (the `executors` fixture), calls the
keeper itself where the schedule would (the test worker runs no schedules), and ends by
counting, over every run it started: lost (accepted but missing or never ended), duplicates
(an event log that shows two executions at once, a seq gap or more than one end) and stuck
(still queued or running when the test's time is up).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
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
from django_q.conf import Conf

import agentsvc.broker
from agentsvc.models import TokenWindow
from runs import keeper
from runs.executor import run_execute
from runs.models import ACTIVE_STATUSES, TERMINAL_EVENTS, Run, RunEvent, RunStatus
from runs.services import run_create
from tests.conftest import ROOT, Proc, fake, free_port, process_env, start_web, wait_until
from tests.fakes.tcp_proxy import TcpProxy
from tests.fakes.webhook_receiver import start_in_thread as start_receiver
from tests.sse_client import events
from tests.test_engine import requests_for
from tests.webhook_support import SECRET, deliver_all, hook_path
from webhooks.models import DeliveryStatus, WebhookAttempt, WebhookDelivery, WebhookMessage
from webhooks.services import deliveries_sweep

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def fault_report(capsys):
    """Prints the figures of a fault as one line, outside pytest's capture, so a run of the
    suite shows them (before the asserts: a failing test shows them too)."""

    def report(name: str, **figures) -> None:
        line = f"FAULT {name}: " + " ".join(f"{k}={v}" for k, v in figures.items())
        with capsys.disabled():
            print(f"\n{line}", flush=True)

    return report


# --- Counting -----------------------------------------------------------------------------------


def execution_problems(run_id) -> list[str]:
    """What the event log of a run says against the invariants: seq 1..n without a gap, one
    terminal event and it is the last, and one execution at a time (after `run.started`, the
    agents go 0, 1, ... until the end or a keeper's requeue; a completed run's output is
    exactly the chunks of its last execution's last agent)."""
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
        if type_ == "run.queued":
            executing = False
        elif type_ == "run.started":
            if executing:
                problems.append(f"#{seq} started while executing")
            executing, agent, chunks = True, -1, {}
        elif type_ == "agent.started":
            if not executing or data["index"] != agent + 1:
                problems.append(f"#{seq} agent {data['index']} after {agent}")
            agent = data["index"]
        elif type_ in ("agent.output", "agent.completed"):
            if not executing or data["index"] != agent:
                problems.append(f"#{seq} {type_} of agent {data['index']} in {agent}")
            if type_ == "agent.output":
                chunks[agent] = chunks.get(agent, "") + data["chunk"]
        elif type_ == "run.completed" and data["output"] != chunks.get(agent, ""):
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


def keeper_until_ended(run_ids, timeout: float, message: str = "every run to end") -> dict:
    """Wait for the runs to end, calling the keeper every 0.3 s as its schedule would: runs of a
    lost worker (WORKER_LOST_AFTER_S) go back to the queue, and runs queued for
    QUEUED_REENQUEUE_AFTER_S are enqueued again (a task lost on the way to a worker). Returns
    what it did, so a test reports it."""
    done = {"retried": 0, "reenqueued": 0}

    def ended() -> bool:
        done["retried"] += keeper.runs_recover_lost()["retried"]
        done["reenqueued"] += keeper.runs_reenqueue_waiting()
        return all_ended(run_ids)

    wait_until(ended, timeout, 0.3, message)
    return done


def _group_pids(pgid: int) -> set[int]:
    """The processes of a process group (a qcluster's sentinel and workers), from /proc."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # state, ppid, pgrp
            pids.add(int(stat.parent.name))
    return pids


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


# --- 1. kill -9 a worker mid-runs ---------------------------------------------------------------


@pytest.mark.timeout(150)
def test_kill9_worker_mid_runs(alice, make_chain, executors, settings, fake_model, fault_report):
    """Two qclusters share 30 runs; one is killed with its whole process group while it
    executes runs. The keeper (called here every 0.3 s, with the staleness cut to 2 s) hands
    its runs and the tasks its pusher had taken to the other: every run completes, none twice."""
    settings.MAX_ACTIVE_RUNS = 100
    settings.WORKER_LOST_AFTER_S = 2
    settings.QUEUED_REENQUEUE_AFTER_S = 3
    models = [fake(tokens=10, latency_ms=40), fake(tokens=10, latency_ms=40)]
    chain = make_chain("demo", models=models, timeout_s=60)
    doomed = executors(HEARTBEAT_S="0.3")
    executors(HEARTBEAT_S="0.3")
    started = time.monotonic()
    ids = [
        run_create(api_key=alice.key, chain=chain, run_input={"topic": f"t{i}"}, metadata={}).id
        for i in range(30)
    ]
    doomed_pids = {str(pid) for pid in _group_pids(doomed.proc.pid)}

    def doomed_runs() -> list:
        running = Run.objects.filter(pk__in=ids, status=RunStatus.RUNNING)
        return [i for i, w in running.values_list("id", "worker") if w.split(":")[1] in doomed_pids]

    wait_until(lambda: len(doomed_runs()) >= 2, 30, message="the doomed cluster to run two")
    killed = doomed_runs()
    doomed.kill()
    reenqueued = keeper_until_ended(ids, 90)["reenqueued"]
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
        reenqueued=reenqueued,
    )
    assert_clean(figures)
    assert statuses == {RunStatus.COMPLETED: 30}, statuses
    # The killed runs were taken over (a second execution after the keeper's requeue)...
    assert set(Run.objects.filter(pk__in=killed).values_list("attempt", flat=True)) == {2}
    # ...and no execution happened that the log does not show: one model call per agent start.
    assert model_requests <= agent_starts, (model_requests, agent_starts)


# --- 2. a web process killed and restarted while clients stream --------------------------------


@pytest.mark.timeout(210)
def test_web_restart_mid_stream(alice, make_chain, executors, settings, tmp_path, fault_report):
    """Ten SSE clients follow ten long runs through one daphne process, which is killed with
    SIGKILL and started again on the same port: each client reconnects with Last-Event-ID and
    gets every seq of its run exactly once, in order, through the terminal event."""
    settings.QUEUED_REENQUEUE_AFTER_S = 5
    make_chain("demo", models=[fake(tokens=60, latency_ms=50)], timeout_s=60)
    cluster = executors()
    env = process_env(Q_CLUSTER_NAME=cluster.name, MAX_ACTIVE_RUNS="100", DB_POOL_MAX="4")
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
        wait_until(
            lambda: sum(t == "agent.output" for f in followers for _, t in f.frames) >= 30,
            30,
            message="output streaming",
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
        reenqueued = keeper_until_ended(ids, 30)["reenqueued"]
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
        reenqueued=reenqueued,
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
    a registered endpoint: 60 deliveries). Once every delivery failed twice the receiver comes
    up: each message arrives once per target, under the one webhook-id of its message."""
    local_ok.MAX_ACTIVE_RUNS = 100
    local_ok.QUEUED_REENQUEUE_AFTER_S = 5
    port = free_port()
    hooks, tag = f"http://127.0.0.1:{port}", uuid.uuid4().hex[:8]
    endpoint_path = f"/endpoint?tag={tag}"
    response = alice.post("/api/v1/webhook-endpoints", {"url": hooks + endpoint_path})
    assert response.status_code == 201, response.content
    chain = make_chain("demo", models=[fake(tokens=3)])
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
    reenqueued = keeper_until_ended(ids, 60)["reenqueued"]
    deliveries = WebhookDelivery.objects.filter(message__run_id__in=ids)

    def sweep_until(done) -> bool:
        deliveries_sweep()  # the schedule's job, which the test worker does not run
        return done()

    wait_until(
        lambda: sweep_until(lambda: not deliveries.filter(attempt_count__lt=2).exists()),
        60,
        0.5,
        "every delivery to fail twice",
    )
    assert set(deliveries.values_list("status", flat=True)) == {DeliveryStatus.PENDING}
    receiver = start_receiver(port=port)
    try:
        wait_until(
            lambda: sweep_until(
                lambda: not deliveries.exclude(status=DeliveryStatus.SUCCEEDED).exists()
            ),
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
        reenqueued=reenqueued,
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


def keeper_pass_in(env: dict[str, str]) -> dict[str, int]:
    """One keeper pass in a process of its own (this process's broker is not that Redis)."""
    code = "import json; from runs.keeper import keeper_pass; print(json.dumps(keeper_pass()))"
    done = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=60,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(180)
def test_redis_stopped_and_started(alice, make_chain, executors, tmp_path, fault_report):
    """A web and a worker on a private Redis, which is killed (its queue lost) while 20 runs
    wait and one is streamed, then started again. While it is down /readyz says why, and run
    creation is refused with 503 problem+json (the request counters live in Redis, so nothing is
    accepted that could not be counted). Afterwards the keeper re-enqueues the waiting runs,
    every accepted run ends, and the open stream gets every event once."""
    redis_port = free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    server = start_redis(redis_port, tmp_path / "redis-1.log")
    make_chain("demo", models=[fake(tokens=10, latency_ms=30)])
    make_chain("long", models=[fake(tokens=80, latency_ms=50)], timeout_s=60)
    cluster = executors(REDIS_URL=redis_url)
    env = process_env(
        REDIS_URL=redis_url,
        Q_CLUSTER_NAME=cluster.name,
        MAX_ACTIVE_RUNS="100",
        DB_POOL_MAX="4",
        MODEL_PROBE_CACHE_S="0",
    )
    web, base = start_web(env, tmp_path / "web.log")
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
        server = start_redis(redis_port, tmp_path / "redis-2.log")
        down_s = time.monotonic() - down_at

        keeper_env = {**env, "QUEUED_REENQUEUE_AFTER_S": "1"}
        reenqueued = 0

        def settle() -> bool:
            nonlocal reenqueued
            if all_ended(accepted):
                return True
            reenqueued += keeper_pass_in(keeper_env)["reenqueued"]
            return all_ended(accepted)

        wait_until(settle, 90, 0.5, "every accepted run to end")
        follower.join(60)
        wait_until(lambda: http.get("/readyz").status_code == 200, 30, 0.3, "ready again")
        after = http.post("/api/v1/chains/demo/runs", json={"input": {"topic": "after"}})
        assert after.status_code == 202, after.text
        accepted.append(after.json()["run_id"])
        wait_until(lambda: all_ended(accepted), 30, message="the run after the outage")
    finally:
        http.close()
        web.stop()
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
        reenqueued=reenqueued,
        down_s=f"{down_s:.1f}",
        events_during_outage=outage_events,
        **streams,
    )
    assert_clean(figures)
    assert_streams_clean(streams)
    statuses = Counter(Run.objects.filter(pk__in=accepted).values_list("status", flat=True))
    assert statuses == {RunStatus.COMPLETED: len(accepted)}, statuses


@pytest.mark.timeout(60)
def test_broker_down_at_commit_loses_nothing(
    alice, make_chain, executors, monkeypatch, local_ok, receiver, fault_report
):
    """Redis answers the request counters but the queue push after commit fails (Redis dies
    between the two): the run is committed, so the answer is 202, not a 503 that would make the
    caller start it again; the keeper enqueues it later. A worker ending a run then cannot
    enqueue its webhook deliveries either: the run still ends cleanly, its tokens are settled,
    and the sweep sends the deliveries."""
    local_ok.QUEUED_REENQUEUE_AFTER_S = 0
    make_chain("demo", models=[fake(tokens=5)])
    path = hook_path()
    body = {
        "input": {"topic": "x"},
        "webhook": {"url": receiver.base_url + path, "secret": SECRET},
    }
    started = time.monotonic()
    working, dead = Conf.REDIS, f"redis://127.0.0.1:{free_port()}/0"

    def queue_on(url: str) -> None:
        """This process's task queue on `url` (the cache stays on the working Redis); the
        process's broker is built again from the configuration."""
        monkeypatch.setattr(Conf, "REDIS", url)
        monkeypatch.setattr(agentsvc.broker, "_broker", None)

    queue_on(dead)
    first = alice.post("/api/v1/chains/demo/runs", body, headers={"Idempotency-Key": "k1"})
    again = alice.post("/api/v1/chains/demo/runs", body, headers={"Idempotency-Key": "k1"})
    assert first.status_code == 202, first.content
    run_id = first.json()["run_id"]
    assert again.status_code == 202 and again.json()["run_id"] == run_id
    assert Run.objects.get(pk=run_id).status == RunStatus.QUEUED

    queue_on(working)
    assert keeper.runs_reenqueue_waiting() == 1  # on the test's own queue, which nobody reads
    queue_on(dead)
    run_execute(run_id=run_id)  # the worker's code, ending the run with the queue unreachable
    run = Run.objects.get(pk=run_id)
    assert run.status == RunStatus.COMPLETED
    used = TokenWindow.objects.get(api_key=alice.key, window=run.tokens_window).used
    assert used == run.input_tokens + run.output_tokens  # the reservation was settled

    queue_on(working)
    deliver_all()
    figures = audit([run_id])
    report_figures(
        fault_report,
        "broker-down-at-commit",
        figures,
        started,
        faults=2,
        runs_created=Run.objects.filter(owner=alice.key.owner).count(),
        webhooks_received=len(receiver.requests_for(path)),
    )
    assert_clean(figures)
    assert Run.objects.filter(owner=alice.key.owner).count() == 1
    assert len(receiver.requests_for(path)) == 1


# --- 5. PostgreSQL briefly unreachable ----------------------------------------------------------


@pytest.mark.timeout(180)
def test_postgres_briefly_unreachable(
    alice, make_chain, executors, settings, tmp_path, fault_report
):
    """A web and a worker reach PostgreSQL through a proxy that is cut for 2 s while 40 runs are
    created (each with an Idempotency-Key). Every answer is 202 or a 503 problem; retrying each
    503 with its key after the outage starts its run exactly once; every run has its first event
    (nothing half-written), and every run ends without restarting anything."""
    settings.WORKER_LOST_AFTER_S = 2
    settings.QUEUED_REENQUEUE_AFTER_S = 3
    db = django_settings.DATABASES["default"]
    proxy = TcpProxy((db["HOST"], int(db["PORT"] or 5432)))
    via_proxy = f"postgres://{db['USER']}@127.0.0.1:{proxy.port}/{db['NAME']}"
    make_chain("demo", models=[fake(tokens=10, latency_ms=20)])
    cluster = executors(DATABASE_URL=via_proxy, HEARTBEAT_S="0.3")
    # A request cut between recording its Idempotency-Key and answering cannot forget the key
    # (the database is gone): retries get 409 in progress until IDEMPOTENCY_LOCK_S, then start
    # over. The lock is cut from 120 s to 5 s here.
    env = process_env(
        Q_CLUSTER_NAME=cluster.name,
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

        kept = keeper_until_ended(run_ids.values(), 90)
        after = create("pg-outage-after")
        assert after.status_code == 202, after.text
        run_ids["after"] = after.json()["run_id"]
        wait_until(lambda: all_ended(run_ids.values()), 30, message="the run after the outage")
        assert httpx.get(f"{base}/readyz", timeout=30).status_code == 200
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
        runs_retried_by_keeper=retried_runs,
        reenqueued=kept["reenqueued"],
        completed=ends[RunStatus.COMPLETED],
    )
    assert_clean(figures)
    # A run the outage cut mid-way is run again, not failed for a database blip.
    assert ends == {RunStatus.COMPLETED: len(run_ids)}, ends
    # One run per key, whatever the outage did to its first request.
    assert owned.count() == len(run_ids) == len(keys) + 1
    assert headless == 0
    assert "not found" not in cluster.log_path.read_text(errors="replace")


# --- 6. the model server failing, slow and hanging ----------------------------------------------


@pytest.mark.timeout(120)
def test_model_failing_slow_hanging(alice, make_chain, executors, settings, fault_report):
    """24 runs against a model that answers 500, one too slow for the chain's 1 s timeout, and
    one that sends a token and then nothing: each ends failed or timed_out with its code within
    its bound plus 2 s. Then four normal runs complete promptly on both worker
    processes: no worker is stuck."""
    settings.MAX_ACTIVE_RUNS = 100
    settings.QUEUED_REENQUEUE_AFTER_S = 5
    cluster = executors(
        workers=2, PROVIDER_READ_TIMEOUT_S="1", PROVIDER_RETRY_MAX_WAIT_S="0.2", HEARTBEAT_S="0.3"
    )
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
        runs[name] = [
            run_create(api_key=alice.key, chain=chain, run_input={"topic": "x"}, metadata={}).id
            for _ in range(8)
        ]
    every = [i for ids in runs.values() for i in ids]
    reenqueued = keeper_until_ended(every, 60, "every faulty run to end")["reenqueued"]
    late = []
    for name, (_, _, status, code, bound) in cases.items():
        for run in Run.objects.filter(pk__in=runs[name]):
            assert (run.status, run.error_code) == (status, code), (name, run.error_message)
            took = (run.finished_at - run.started_at).total_seconds()
            if took > bound + grace:
                late.append((name, took))

    chain = make_chain("normal", models=[fake(tokens=10, latency_ms=50)])
    normal_started = time.monotonic()
    normal = [
        run_create(api_key=alice.key, chain=chain, run_input={"topic": "x"}, metadata={}).id
        for _ in range(4)
    ]
    reenqueued += keeper_until_ended(normal, 15, "the normal runs")["reenqueued"]
    normal_s = time.monotonic() - normal_started
    workers = {
        w.split(":")[1] for w in Run.objects.filter(pk__in=normal).values_list("worker", flat=True)
    }
    figures = audit(every + normal)
    report_figures(
        fault_report,
        "model-fail-slow-hang",
        figures,
        started,
        faults=len(every),
        late=len(late),
        reenqueued=reenqueued,
        normal_after_s=f"{normal_s:.1f}",
        workers_free=len(workers),
    )
    assert_clean(figures)
    assert late == []
    assert set(Run.objects.filter(pk__in=normal).values_list("status", flat=True)) == {
        RunStatus.COMPLETED
    }
    assert len(workers) == 2, cluster.log_path.read_text(errors="replace")[-2000:]
