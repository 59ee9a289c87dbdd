"""Scale-out across two hosts: network namespaces made by scripts/two-hosts, each running its own
web (daphne) and executor against the one PostgreSQL and the one Redis.

A stream opened on host A follows a run executed on host B (the wake-up crosses hosts through
the channel layer); then host B's executor is killed with SIGKILL mid-runs and A's executor,
seeing B's heartbeat go stale, takes its runs over, where they finish. Each process runs with
the hostname of its host, so a run's `worker` claim records which host executed it.

Deselected from the main suite (it changes the machine's network); run it with
`scripts/test -m twohosts tests/test_two_hosts.py` or `scripts/scale-check`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from django.conf import settings

from agentsvc.demo_model_server import start_in_thread
from runs.models import Run, RunEvent, RunStatus
from tests.conftest import ROOT, fake, process_env, wait_until
from tests.sse_client import events

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.slow,
    pytest.mark.twohosts,
    pytest.mark.timeout(300),
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2 (the `ip` command)"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux (`unshare`)"),
]

SCRIPT = str(ROOT / "scripts" / "two-hosts")
BRIDGE = "10.77.0.1"
ADDRESS = {"a": "10.77.0.2", "b": "10.77.0.3"}


def bridged(url: str) -> str:
    """The same URL as seen from inside a host: loopback becomes the bridge address."""
    return re.sub(r"(@|//)(127\.0\.0\.1|localhost)(?=[:/])", rf"\g<1>{BRIDGE}", url)


class Host:
    """One namespace's processes. Each is its own process group, so SIGKILL takes a process
    with all its children at once, as a machine losing power would."""

    def __init__(self, name: str, env: dict[str, str], log_dir) -> None:
        self.name = name
        self.env = env
        self.log_dir = log_dir
        self.url = f"http://{ADDRESS[name]}:8000"
        self.procs: dict[str, subprocess.Popen] = {}

    def _start(self, role: str, *args: str) -> subprocess.Popen:
        log = (self.log_dir / f"{role}-{self.name}.log").open("ab")
        proc = subprocess.Popen(
            [SCRIPT, "exec", self.name, sys.executable, *args],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[role] = proc
        return proc

    def log(self, role: str) -> str:
        return (self.log_dir / f"{role}-{self.name}.log").read_text(errors="replace")

    def start_web(self) -> None:
        address = ADDRESS[self.name]
        proc = self._start(
            "web", "-m", "daphne", "-b", address, "-p", "8000", "agentsvc.asgi:application"
        )

        def up() -> bool:
            assert proc.poll() is None, self.log("web")
            try:
                return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 30, message=f"web on host {self.name}")

    def start_executor(self) -> None:
        proc = self._start("executor", "manage.py", "executor")
        wait_until(
            lambda: "runs at once" in self.log("executor") or proc.poll() is not None,
            60,
            message=f"executor on host {self.name}",
        )
        assert proc.poll() is None, self.log("executor")

    def kill(self, role: str) -> None:
        proc = self.procs.pop(role)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        for role in list(self.procs):
            proc = self.procs.pop(role)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


@pytest.fixture
def hosts(tmp_path):
    subprocess.run([SCRIPT, "up"], check=True)
    db = settings.DATABASES["default"]
    env = process_env(
        DATABASE_URL=f"postgres://{db['USER']}@{BRIDGE}:{db['PORT'] or 5432}/{db['NAME']}",
        REDIS_URL=bridged(settings.REDIS_URL),
        ALLOWED_HOSTS=",".join(ADDRESS.values()),
        # Short lifecycle timings, so a lost executor is noticed within seconds.
        HEARTBEAT_S="0.5",
        PROVIDER_READ_TIMEOUT_S="2",
        WORKER_LOST_AFTER_S="3",
        LOG_LEVEL="INFO",
    )
    pair = {name: Host(name, env, tmp_path) for name in ADDRESS}
    try:
        yield pair
    finally:
        for host in pair.values():
            host.stop()
        subprocess.run([SCRIPT, "down"], check=True)


@pytest.fixture
def bridge_model():
    """The fake model on the bridge address, where both hosts reach it."""
    server = start_in_thread(host=BRIDGE)
    yield server
    server.shutdown()


def follow(url: str, key: str, run_id: str, into: list) -> threading.Thread:
    """Read a run's SSE stream to its end in a thread, appending (seq, event, data)."""

    def read() -> None:
        with httpx.stream(
            "GET",
            f"{url}/api/v1/runs/{run_id}/events",
            headers={"Authorization": f"Bearer {key}", "Accept": "text/event-stream"},
            timeout=httpx.Timeout(10, read=60),
        ) as r:
            assert r.status_code == 200, r.read()
            for frame in events(r.iter_lines()):
                into.append((frame.id, frame.event, frame.data))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def create(host: Host, key: str, chain: str) -> str:
    r = httpx.post(
        f"{host.url}/api/v1/chains/{chain}/runs",
        json={"input": {"topic": "tides"}},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert r.status_code == 202, r.text
    return r.json()["run_id"]


def executed_on(run: Run) -> str:
    return run.worker.split(":", 1)[0]


def db_events(run_id: str) -> list[tuple[int, str]]:
    return list(RunEvent.objects.filter(run_id=run_id).order_by("seq").values_list("seq", "type"))


def test_stream_on_a_follows_a_run_executed_on_b(hosts, bridge_model, alice, make_chain):
    a, b = hosts["a"], hosts["b"]
    a.start_web()
    b.start_web()
    b.start_executor()  # the only executor: the run can only execute on host B
    chain = make_chain(
        name="two-hosts",
        models=[fake(tokens=30, latency_ms=10), fake(tokens=30, latency_ms=10)],
        base_url=bridge_model.base_url,
    )
    run_id = create(b, alice.raw_key, chain.name)
    received: list = []
    follow(a.url, alice.raw_key, run_id, received).join(60)

    run = Run.objects.get(pk=run_id)
    assert run.status == RunStatus.COMPLETED
    assert executed_on(run) == "agentsvc-b", run.worker
    assert [(seq, event) for seq, event, _ in received] == db_events(run_id)
    assert [seq for seq, _, _ in received] == list(range(1, len(received) + 1))
    assert received[-1][1] == "run.completed"
    assert sum(1 for _, event, _ in received if event == "agent.output") >= 2


def test_runs_of_a_killed_executor_on_b_finish_on_a(hosts, bridge_model, alice, make_chain):
    a, b = hosts["a"], hosts["b"]
    a.start_web()
    b.start_web()
    b.start_executor()
    # About 4 s a run (2 agents x 40 tokens x 50 ms), so B's executor holds all four mid-run
    # when it is killed.
    chain = make_chain(
        name="two-hosts-slow",
        models=[fake(tokens=40, latency_ms=50), fake(tokens=40, latency_ms=50)],
        base_url=bridge_model.base_url,
    )
    run_ids = [create(b, alice.raw_key, chain.name) for _ in range(4)]
    followed: list = []
    reader = follow(a.url, alice.raw_key, run_ids[0], followed)

    def running_on_b() -> list[str]:
        return [
            str(r.pk)
            for r in Run.objects.filter(pk__in=run_ids, status=RunStatus.RUNNING)
            if executed_on(r) == "agentsvc-b"
            and RunEvent.objects.filter(run_id=r.pk, type="agent.output").exists()
        ]

    killed_mid_run = wait_until(
        lambda: r if len(r := running_on_b()) == 4 else None, 30, message="four runs mid-way on B"
    )
    b.kill("executor")
    killed_at = time.monotonic()
    a.start_executor()  # it recovers the runs of the lost peer by itself (no keeper pass)

    def all_finished() -> bool:
        return (
            not Run.objects.filter(pk__in=run_ids)
            .exclude(status__in=[RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED])
            .exists()
        )

    wait_until(all_finished, 90, interval=0.5, message="every run to finish on host A")
    recovered_s = time.monotonic() - killed_at
    reader.join(30)

    runs = {str(r.pk): r for r in Run.objects.filter(pk__in=run_ids)}
    print(f"\nrecovered {len(killed_mid_run)} runs killed mid-way in {recovered_s:.1f} s")
    for run_id in run_ids:
        run = runs[run_id]
        print(f"run {run_id}: {run.status}, attempt {run.attempt}, on host {executed_on(run)}")
    # Nothing lost: every run completed, on host A, B being dead.
    assert all(r.status == RunStatus.COMPLETED for r in runs.values())
    assert all(executed_on(r) == "agentsvc-a" for r in runs.values())
    for run_id in killed_mid_run:
        assert runs[run_id].attempt == 2
        queued = [
            e.data
            for e in RunEvent.objects.filter(run_id=run_id, type="run.queued").order_by("seq")
        ]
        assert queued[-1]["reason"] == "worker_lost", queued
    # The stream opened on A saw the run through the move, every event once and in order.
    assert [(seq, event) for seq, event, _ in followed] == db_events(run_ids[0])
    assert followed[-1][1] == "run.completed"
