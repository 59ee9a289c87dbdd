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
from django_q.conf import Conf

import agentsvc.broker
from agentsvc.services import api_key_create
from runs.chains import chain_publish
from tests.fakes.openai_server import start_in_thread

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


@pytest.fixture(autouse=True)
def _runs_end_before_flush(request):
    """Before a transactional test's database is flushed, no run may still be written to: a
    worker mid-write and the flush's TRUNCATE can deadlock, and a run left going would leak into
    the next test. Queued runs are cancelled (a worker's claim then fails) and running ones are
    waited for."""
    yield
    if "transactional_db" in request.fixturenames or (
        request.node.get_closest_marker("django_db")
        and request.node.get_closest_marker("django_db").kwargs.get("transaction")
    ):
        from runs.models import Run, RunStatus

        Run.objects.filter(status=RunStatus.QUEUED).update(status=RunStatus.CANCELLED)
        wait_until(
            lambda: not Run.objects.filter(status=RunStatus.RUNNING).exists(),
            60,
            message="runs to end",
        )


@pytest.fixture(scope="session")
def worker(django_db_setup, django_db_blocker, tmp_path_factory):
    """A real django-q2 cluster (qcluster) against the test database and Redis."""
    proc = Proc(
        [sys.executable, "manage.py", "qcluster"],
        process_env(),
        tmp_path_factory.mktemp("worker") / "qcluster.log",
    )
    wait_until(
        lambda: "running" in proc.output() or proc.proc.poll() is not None,
        30,
        message="qcluster start",
    )
    assert proc.proc.poll() is None, proc.output()
    yield proc
    proc.stop()


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


# --- Worker clusters that tests start and kill ---------------------------------------------------


class Cluster:
    """A qcluster in its own process group, so SIGKILL takes its sentinel and workers at once."""

    def __init__(self, name: str, log: Path, workers: int = 1, **env: str) -> None:
        self.name = name
        self.log_path = log
        self.log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "manage.py", "qcluster"],
            cwd=ROOT,
            # Small: the machine's PostgreSQL connections are shared with other suites.
            env=process_env(
                **{"Q_CLUSTER_NAME": name, "Q_WORKERS": str(workers), "DB_POOL_MAX": "3", **env}
            ),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_until(
                lambda: (
                    "running" in log.read_text(errors="replace") or self.proc.poll() is not None
                ),
                60,
                message="qcluster start",
            )
            assert self.proc.poll() is None, log.read_text(errors="replace")
        except BaseException:
            self.kill()  # a cluster that did not come up in time must not outlive the test
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            # Every process of the group gone, so none is still blocked reading the queue
            # (Redis would hand it the retry's task, which would then be lost).
            wait_until(lambda: not _group_alive(self.proc.pid), 10, message="the group to die")
        self.log.close()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def clusters(monkeypatch, tmp_path):
    """Workers on a queue of this test's own, so the session's worker cannot take its runs."""
    name = f"cluster-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(Conf, "CLUSTER_NAME", name)
    monkeypatch.setattr(Conf, "PREFIX", name)  # the signing salt
    # This process's broker is kept once built, with the queue name it was built with.
    monkeypatch.setattr(agentsvc.broker, "_broker", None)
    started: list[Cluster] = []

    def start(workers: int = 1, **env: str) -> Cluster:
        cluster = Cluster(name, tmp_path / f"qcluster-{len(started)}.log", workers, **env)
        started.append(cluster)
        return cluster

    yield start
    for cluster in started:
        cluster.kill()


# --- Webhooks: the local receiver and the SSRF exemption for it ------------------------------
from tests.webhook_support import local_ok, receiver  # noqa: E402, F401
