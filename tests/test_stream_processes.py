"""Streams across real processes: the embedded default (SQLite, no Redis) and the stream caps."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.conftest import ROOT, Proc, fake, free_port, process_env, wait_until
from tests.sse_client import events, parse_lines
from tests.test_sse import settle

SSE = {"Accept": "text/event-stream"}

SETUP = """
from agentsvc.services import api_key_create
from runs.chains import chain_publish
_, raw = api_key_create(owner_name="embedded", name="embedded")
chain_publish(definition={
    "name": "demo", "timeout_s": 60,
    "input_schema": {"type": "object"},
    "agents": [{"name": "a", "provider": "local", "model": "MODEL", "base_url": "BASE",
                "prompt": "Go {{ input.topic }}"}],
})
print(raw)
"""


def _daphne(env: dict, log) -> tuple[Proc, str]:
    port = free_port()
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
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return proc.proc.poll() is not None

    wait_until(up, 30, message="daphne start")
    assert proc.proc.poll() is None, proc.output()
    return proc, url


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, fake_model):
    """daphne + executor on the embedded default: SQLite in a temporary DATA_DIR, no Redis."""
    data = tmp_path_factory.mktemp("embedded")
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(DATA_DIR=str(data), Q_CLUSTER_NAME=f"embedded-{uuid.uuid4().hex[:8]}")
    run = {"cwd": ROOT, "env": env, "check": True, "capture_output": True, "text": True}
    subprocess.run([sys.executable, "manage.py", "migrate", "--verbosity=0"], **run)
    script = SETUP.replace("MODEL", fake(tokens=20, latency_ms=40)).replace(
        "BASE", fake_model.base_url
    )
    key = subprocess.run([sys.executable, "manage.py", "shell", "-c", script], **run)
    key = key.stdout.strip().splitlines()[-1]
    worker = Proc([sys.executable, "manage.py", "executor"], env, data / "executor.log")
    web, url = _daphne(env, data / "daphne.log")
    yield url, key, data
    web.stop()
    worker.stop()


@pytest.mark.slow
def test_embedded_default_streams_live_across_processes(embedded):
    """No Redis: the executor's events reach the web process's reader while the run goes."""
    url, key, data = embedded
    arrivals = []
    with (
        httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {key}"}) as http,
        http.stream("POST", "/api/v1/chains/demo/stream", json={"input": {"topic": "x"}}) as r,
    ):
        assert r.status_code == 200
        for frame in events(r.iter_lines()):
            arrivals.append((time.monotonic(), frame))
    frames = [f for _, f in arrivals]
    assert [f.id for f in frames] == list(range(1, len(frames) + 1))
    assert frames[-1].event == "run.completed"
    outputs = [t for t, f in arrivals if f.event == "agent.output"]
    assert len(outputs) > 3
    # Live, not all at the end: the first chunk came well before the last (20 tokens, 40 ms apart).
    assert arrivals[-1][0] - outputs[0] > 0.3
    # The worker woke the reader over the web process's socket, not only by database polling.
    assert (data / "stream-wakeup.sock").exists()


@pytest.mark.slow
def test_embedded_default_without_the_socket_falls_back_to_polling(embedded):
    """The worker cannot reach the web process's socket: readers still get every event, live."""
    url, key, data = embedded
    with (
        httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {key}"}) as http,
        http.stream("POST", "/api/v1/chains/demo/stream", json={"input": {"topic": "x"}}) as r,
    ):
        arrivals = []
        for frame in events(r.iter_lines()):
            if not arrivals:  # the stream is following: its hub has bound the socket by now
                (data / "stream-wakeup.sock").unlink()  # wake-ups now go nowhere
            arrivals.append((time.monotonic(), frame))
    frames = [f for _, f in arrivals]
    assert [f.id for f in frames] == list(range(1, len(frames) + 1))
    assert frames[-1].event == "run.completed"
    outputs = [t for t, f in arrivals if f.event == "agent.output"]
    assert len(outputs) > 3 and arrivals[-1][0] - outputs[0] > 0.3


@pytest.fixture(scope="module")
def limited(live_server_url, tmp_path_factory):
    """A second web process with small stream caps and quick pings, sharing the database and
    Redis."""
    env = process_env(STREAMS_PER_KEY="2", STREAMS_MAX="3", SSE_PING_S="0.3")
    proc, url = _daphne(env, tmp_path_factory.mktemp("limited") / "daphne.log")
    yield url
    proc.stop()


def _open(stack: contextlib.ExitStack, base: str, api, run_id: str):
    client = stack.enter_context(
        httpx.Client(base_url=base, timeout=30, headers={"Authorization": f"Bearer {api.raw_key}"})
    )
    response = stack.enter_context(
        client.stream("GET", f"/api/v1/runs/{run_id}/events", headers=SSE)
    )
    if response.status_code == 200:
        # Keep the iterator: dropping it would close the connection (and the stream).
        response.lines = response.iter_lines()
        next(response.lines)  # the retry line: the stream is open
    else:
        response.read()
    return response


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_stream_caps_per_key_and_per_process(
    limited, live_server_url, worker, alice, bob, make_chain
):
    make_chain("demo", models=[fake(tokens=60, latency_ms=100)])
    run_a = httpx.post(
        f"{limited}/api/v1/chains/demo/runs",
        json={"input": {"topic": "x"}},
        headers={"Authorization": f"Bearer {alice.raw_key}"},
    ).json()["run_id"]
    run_b = httpx.post(
        f"{limited}/api/v1/chains/demo/runs",
        json={"input": {"topic": "x"}},
        headers={"Authorization": f"Bearer {bob.raw_key}"},
    ).json()["run_id"]
    with contextlib.ExitStack() as stack:
        # One of alice's streams on the other web process counts too: the count is in Redis.
        assert _open(stack, live_server_url, alice, run_a).status_code == 200
        assert _open(stack, limited, alice, run_a).status_code == 200
        over = _open(stack, limited, alice, run_a)
        assert over.status_code == 429
        assert over.headers["Content-Type"] == "application/problem+json"
        assert over.json()["code"] == "concurrency_limit" and "Retry-After" in over.headers
        with connect(
            f"{limited.replace('http', 'ws')}/ws/v1/runs",
            additional_headers={"Authorization": f"Bearer {alice.raw_key}"},
        ) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
            assert closed.value.rcvd.code == 4429
        # bob has his own allowance, but this process holds at most 3 streams.
        assert _open(stack, limited, bob, run_b).status_code == 200
        assert _open(stack, limited, bob, run_b).status_code == 200
        full = _open(stack, limited, bob, run_b)
        assert full.status_code == 503 and "Retry-After" in full.headers
        assert full.json()["code"] == "streams_full"
    # Streams hung up give their places back.
    with contextlib.ExitStack() as stack:

        def reopened():
            return _open(stack, limited, alice, run_a).status_code == 200

        wait_until(reopened, 10, 0.2, "a place to free up")
    httpx.post(
        f"{limited}/api/v1/runs/{run_a}/cancel",
        headers={"Authorization": f"Bearer {alice.raw_key}"},
    )
    httpx.post(
        f"{limited}/api/v1/runs/{run_b}/cancel", headers={"Authorization": f"Bearer {bob.raw_key}"}
    )
    settle()


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_leases_left_by_a_dead_process_expire(limited, alice, make_chain):
    """A web process killed with streams open leaves leases that stop counting once expired."""
    import redis

    make_chain("demo", models=[fake(tokens=30, latency_ms=100)])
    run_id = httpx.post(
        f"{limited}/api/v1/chains/demo/runs",
        json={"input": {"topic": "x"}},
        headers={"Authorization": f"Bearer {alice.raw_key}"},
    ).json()["run_id"]
    leases = redis.Redis.from_url(os.environ["REDIS_URL"])
    expired = time.time() - 1
    leases.zadd(f"agentsvc:streams:key:{alice.key.pk}", {"dead:1:a": expired, "dead:1:b": expired})
    with contextlib.ExitStack() as stack:
        assert _open(stack, limited, alice, run_id).status_code == 200
        assert _open(stack, limited, alice, run_id).status_code == 200
    httpx.post(
        f"{limited}/api/v1/runs/{run_id}/cancel",
        headers={"Authorization": f"Bearer {alice.raw_key}"},
    )


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_idle_stream_sends_pings_then_events(limited, alice, make_chain):
    """A run nobody executes yet: the stream stays open with `: ping` comments."""
    from runs.models import Run
    from runs.services import run_cancel

    chain = make_chain("demo", models=[fake(tokens=3)])
    run = Run.objects.create(owner=alice.key.owner, api_key=alice.key, chain=chain, input={})
    with (
        httpx.Client(base_url=limited, timeout=30) as http,
        http.stream(
            "GET",
            f"/api/v1/runs/{run.id}/events",
            headers={**SSE, "Authorization": f"Bearer {alice.raw_key}"},
        ) as response,
    ):
        frames = parse_lines(response.iter_lines())
        assert next(frames).retry == 1000
        assert next(frames).comments == ["ping"]
        assert next(frames).comments == ["ping"]
        run_cancel(run=run, reason="api")  # written here, in the test process
        last = next(frames)
        assert (last.id, last.event, last.data["reason"]) == (1, "run.cancelled", "api")
        assert list(frames) == []  # and the stream ends


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_an_event_without_a_wake_up_still_arrives(live_server_url, alice, make_chain):
    """A lost wake-up only delays: the web process re-checks the database on its own."""
    from django.db.models import F
    from django.utils import timezone

    from runs.models import Run, RunEvent

    chain = make_chain("demo", models=[fake(tokens=3)])
    run = Run.objects.create(owner=alice.key.owner, api_key=alice.key, chain=chain, input={})
    with (
        httpx.Client(base_url=live_server_url, timeout=30) as http,
        http.stream(
            "GET",
            f"/api/v1/runs/{run.id}/events",
            headers={**SSE, "Authorization": f"Bearer {alice.raw_key}"},
        ) as response,
    ):
        frames = parse_lines(response.iter_lines())
        assert next(frames).retry is not None
        time.sleep(0.5)  # the reader has read (nothing) and waits
        # Written behind the service's back: no wake-up is published for it.
        Run.objects.filter(pk=run.id).update(last_seq=F("last_seq") + 1, status="cancelled")
        RunEvent.objects.create(
            run=run, seq=1, type="run.cancelled", created_at=timezone.now(), data={"seq": 1}
        )
        frame = next(frames)
        assert (frame.id, frame.event) == (1, "run.cancelled")


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_streams_hand_database_connections_back(tmp_path, alice, make_chain):
    """Streams read in executor threads; each read hands its connection back to the pool, so
    threads left idle when the streams close hold none. With a pool of two, a dozen streams
    opened at once and closed leave the API usable."""
    from concurrent.futures import ThreadPoolExecutor

    from runs.models import Run

    chain = make_chain("demo", models=[fake(tokens=3)])
    run = Run.objects.create(owner=alice.key.owner, api_key=alice.key, chain=chain, input={})
    proc, url = _daphne(process_env(DB_POOL_MAX="2", DB_POOL_TIMEOUT_S="1"), tmp_path / "web.log")
    ws_base = url.replace("http://", "ws://")
    paths = ["/ws/v1/runs"] * 6 + [f"/ws/v1/runs/{run.id}"] * 6
    headers = {"Authorization": f"Bearer {alice.raw_key}"}

    def open_socket(path: str):
        return stack.enter_context(connect(f"{ws_base}{path}", additional_headers=headers))

    try:
        with contextlib.ExitStack() as stack, ThreadPoolExecutor(len(paths)) as pool:
            sockets = list(pool.map(open_socket, paths))
            for ws in sockets:
                with pytest.raises(TimeoutError):
                    ws.recv(timeout=0.2)  # open, with nothing to say
        time.sleep(0.5)  # closed: nothing runs in the executor any more
        for _ in range(3):
            response = httpx.get(f"{url}/api/v1/runs", headers=headers, timeout=10)
            assert response.status_code == 200, response.text
    finally:
        proc.stop()
