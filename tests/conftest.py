"""Shared fixtures: two tenants (alice, bob), the fake model server, chains, real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from django.conf import settings
from django.test import Client

from agentsvc.demo_model_server import start_in_thread
from agentsvc.services import api_key_create
from runs.chains import chain_publish

ROOT = Path(__file__).resolve().parent.parent


class Api:
    """A caller with an API key, over Django's test client."""

    def __init__(self, raw_key: str | None) -> None:
        self.client = Client()
        self.raw_key = raw_key

    def _headers(self, headers: dict | None) -> dict:
        h = {"Authorization": f"Bearer {self.raw_key}"} if self.raw_key else {}
        return {**h, **(headers or {})}

    def get(self, path: str, params: dict | None = None, headers: dict | None = None):
        return self.client.get(path, params or {}, headers=self._headers(headers))

    def post(
        self,
        path: str,
        body=None,
        headers: dict | None = None,
        raw: bytes | None = None,
        content_type: str = "application/json",
    ):
        data = raw if raw is not None else json.dumps(body if body is not None else {})
        return self.client.post(
            path, data, content_type=content_type, headers=self._headers(headers)
        )


@pytest.fixture(scope="session", autouse=True)
def _fresh_cache():
    """Rate-limit counters from an earlier test session must not leak into this one."""
    from django.core.cache import cache

    cache.clear()


@pytest.fixture
def alice(db):
    key, raw = api_key_create(owner_name="alice", name="alice-key")
    api = Api(raw)
    api.key = key
    return api


@pytest.fixture
def bob(db):
    key, raw = api_key_create(owner_name="bob", name="bob-key")
    api = Api(raw)
    api.key = key
    return api


@pytest.fixture(scope="session")
def fake_model():
    server = start_in_thread()
    yield server
    server.shutdown()


def fake(**opts) -> str:
    """A fake-model name with behaviour options and a unique tag (its own request counter)."""
    opts.setdefault("tag", uuid.uuid4().hex[:8])
    return "fake?" + "&".join(f"{k}={v}" for k, v in opts.items())


@pytest.fixture
def make_chain(fake_model):
    def make(
        name: str = "demo",
        models: list[str] | None = None,
        timeout_s: int = 30,
        schema: dict | None = None,
        base_url: str = "",
        **extra,
    ):
        agents = [
            {
                "name": f"agent{i}",
                "provider": "local",
                "model": model,
                "base_url": base_url or fake_model.base_url,
                "prompt": "Work on {{ input.topic }}. {{ previous }}",
            }
            for i, model in enumerate(models or [fake(tokens=5)])
        ]
        definition = {
            "name": name,
            "timeout_s": timeout_s,
            "agents": agents,
            "input_schema": schema
            or {
                "type": "object",
                "required": ["topic"],
                "properties": {"topic": {"type": "string", "minLength": 1}},
            },
            **extra,
        }
        chain, _ = chain_publish(definition=definition)
        return chain

    return make


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: same settings, the test database."""
    db = settings.DATABASES["default"]
    env = dict(os.environ)
    env["DATABASE_URL"] = f"postgres://{db['USER']}@{db['HOST']}:{db['PORT'] or 5432}/{db['NAME']}"
    # Webhook tests deliver to a receiver on loopback, which the SSRF guard refuses otherwise.
    env.setdefault("WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8")
    env.update(extra)
    return env


def wait_until(predicate, timeout: float = 20, interval: float = 0.05, message: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message or predicate}")


class Proc:
    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self.log = log.open("wb")
        self.proc = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _transactional(request) -> bool:
    marker = request.node.get_closest_marker("django_db")
    return "transactional_db" in request.fixturenames or bool(
        marker and marker.kwargs.get("transaction")
    )


@pytest.fixture(autouse=True)
def _runs_end_before_flush(request):
    """Before a transactional test's database is flushed, no run may still be written to: an
    executor mid-write and the flush's TRUNCATE can deadlock, and a run left going would leak
    into the next test. Queued runs are cancelled (a claim then fails) and running ones are
    waited for. Schedules are paused first, so no executor's clock starts one meanwhile."""
    yield
    if _transactional(request):
        from runs.models import Run, RunStatus
        from schedules.models import Schedule

        Schedule.objects.update(paused=True, next_run_at=None)
        Run.objects.filter(status=RunStatus.QUEUED).update(status=RunStatus.CANCELLED)
        wait_until(
            lambda: not Run.objects.filter(status=RunStatus.RUNNING).exists(),
            60,
            message="runs to end",
        )


class ExecutorProcess:
    """`manage.py executor` in its own process group, so SIGKILL takes it whole."""

    def __init__(self, log: Path, **env: str) -> None:
        self.log_path = log
        self.log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "manage.py", "executor"],
            cwd=ROOT,
            # Small: the machine's PostgreSQL connections are shared with other suites.
            env=process_env(**{"DB_POOL_MAX": "3", "EXECUTOR_DB_THREADS": "3", **env}),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_until(
                lambda: "runs at once" in self.output() or self.proc.poll() is not None,
                60,
                message="executor start",
            )
            assert self.proc.poll() is None, self.output()
        except BaseException:
            self.kill()  # an executor that did not come up in time must not outlive the test
            raise

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self, timeout: float = 60) -> None:
        """SIGTERM: the executor drains (WORKER_DRAIN_S), hands back the rest and exits."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


class _SharedExecutor:
    """The suite's executor: started for the tests that ask for `worker`, stopped for any other
    transactional test (an executor claims every queued run it can see, including the ones a
    test makes for itself)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.current: ExecutorProcess | None = None
        self.starts = 0

    def ensure(self) -> ExecutorProcess:
        if self.current is None or not self.current.alive():
            self.starts += 1
            self.current = ExecutorProcess(self.log_dir / f"executor-{self.starts}.log")
        return self.current

    def stop(self) -> None:
        if self.current is not None:
            self.current.terminate()
            self.current = None


@pytest.fixture(scope="session")
def _shared_executor(django_db_setup, tmp_path_factory):
    shared = _SharedExecutor(tmp_path_factory.mktemp("executor"))
    yield shared
    shared.stop()


@pytest.fixture(autouse=True)
def _only_wanted_executors(request):
    """A transactional test that did not ask for the suite's executor runs without it."""
    if _transactional(request) and "worker" not in request.fixturenames:
        shared = request.getfixturevalue("_shared_executor")
        shared.stop()
    yield


@pytest.fixture(scope="session")
def qcluster(django_db_setup, tmp_path_factory):
    """A django-q2 cluster (the schedules' worker) against the test database and Redis."""
    proc = Proc(
        [sys.executable, "manage.py", "qcluster"],
        process_env(),
        tmp_path_factory.mktemp("qcluster") / "qcluster.log",
    )
    wait_until(
        lambda: "running" in proc.output() or proc.proc.poll() is not None,
        30,
        message="qcluster start",
    )
    assert proc.proc.poll() is None, proc.output()
    yield proc
    proc.stop()


@pytest.fixture
def worker(_shared_executor):
    """A real executor process against the test database and Redis (runs and webhooks)."""
    return _shared_executor.ensure()


def start_web(
    env: dict[str, str], log: Path, port: int | None = None, timeout: float = 30
) -> tuple[Proc, str]:
    """A daphne process serving the app (on `port` to restart one); returns once /healthz
    answers."""
    port = port or free_port()
    proc = Proc(
        [
            sys.executable,
            "-m",
            "daphne",
            "-b",
            "127.0.0.1",
            "-p",
            str(port),
            "agentsvc.asgi:application",
        ],
        env,
        log,
    )
    url = f"http://127.0.0.1:{port}"

    def up():
        assert proc.proc.poll() is None, proc.output()
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, timeout, message="daphne start")
    except BaseException:
        proc.stop()  # a process that did not come up in time must not outlive the test
        raise
    return proc, url


@pytest.fixture(scope="session")
def live_server_url(django_db_setup, tmp_path_factory):
    """A real daphne process serving the app against the test database."""
    proc, url = start_web(process_env(), tmp_path_factory.mktemp("web") / "daphne.log")
    yield url
    proc.stop()


# --- Executors that tests start and kill ----------------------------------------------------------


@pytest.fixture
def executors(tmp_path):
    """Executors of this test's own (the suite's executor is stopped for it: the test is
    transactional and does not ask for `worker`)."""
    started: list[ExecutorProcess] = []

    def start(**env: str) -> ExecutorProcess:
        proc = ExecutorProcess(tmp_path / f"executor-{len(started)}.log", **env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


@pytest.fixture
def fault_report(capsys):
    """Prints the figures of a fault as one line, outside pytest's capture, so a run of the
    suite shows them (before the asserts: a failing test shows them too)."""

    def report(name: str, **figures) -> None:
        line = f"FAULT {name}: " + " ".join(f"{k}={v}" for k, v in figures.items())
        with capsys.disabled():
            print(f"\n{line}", flush=True)

    return report


# --- Webhooks: the local receiver and the SSRF exemption for it ------------------------------
from tests.webhook_support import local_ok, receiver  # noqa: E402, F401
