"""The README's run command: the embedded default (SQLite, no Redis) in one command."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import httpx
import pytest

from tests.conftest import ROOT, free_port, wait_until

pytestmark = pytest.mark.slow


def embedded_env(tmp_path, **extra) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "REDIS_URL", "SECRET_KEY", "Q_CLUSTER_NAME")
    }
    env.update(
        DATA_DIR=str(tmp_path / "data"),
        LOCAL_MODEL="demo",
        LOCAL_MODEL_URL=f"http://127.0.0.1:{free_port()}/v1",
        **extra,
    )
    return env


def test_serve_runs_a_chain_end_to_end(tmp_path):
    port = free_port()
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--port", str(port)],
        cwd=ROOT,
        env=embedded_env(tmp_path),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        def banner():
            text = (tmp_path / "serve.log").read_text()
            assert proc.poll() is None, text
            return re.search(r"demo API key: (ak_\S+)", text)

        key = wait_until(banner, 90, 0.3, "the banner").group(1)
        text = (tmp_path / "serve.log").read_text()
        assert f"curl -s -X POST http://127.0.0.1:{port}/api/v1/chains/research-brief/runs" in text
        http = httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            timeout=10,
            headers={"Authorization": f"Bearer {key}"},
        )
        created = http.post(
            "/api/v1/chains/research-brief/runs", json={"input": {"topic": "tides"}}
        )
        assert created.status_code == 202, created.text
        run_id = created.json()["run_id"]

        def finished():
            body = http.get(f"/api/v1/runs/{run_id}").json()
            return body if body["status"] not in ("queued", "running") else None

        body = wait_until(finished, 30, 0.1, "the run")
        assert body["status"] == "completed"
        assert "tides" in body["output"]
        assert body["usage"]["output_tokens"] > 0
        # The example LangGraph chain (chains/code.yaml), its checkpoints in memory on SQLite.
        created = http.post(
            "/api/v1/chains/langgraph-brief/runs", json={"input": {"topic": "tides"}}
        )
        assert created.status_code == 202, created.text
        run_id = created.json()["run_id"]
        body = wait_until(finished, 30, 0.1, "the LangGraph run")
        assert body["status"] == "completed", body
        assert body["output"]["topic"] == "tides" and body["output"]["brief"]
        assert http.get("/readyz").status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    # Stopping the command stops every process it started.

    def group_empty():
        return subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True).stdout == b""

    try:
        wait_until(group_empty, 20, 0.2, "the children to exit")
    finally:
        if not group_empty():
            os.killpg(proc.pid, signal.SIGKILL)


def test_serve_says_when_the_port_is_taken(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "manage.py", "serve", "--port", str(port)],
            cwd=ROOT,
            env=embedded_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode != 0
    assert f"127.0.0.1:{port} is in use" in result.stderr


@pytest.mark.django_db(transaction=True)
def test_web_serves_one_port_from_several_processes(tmp_path):
    """`manage.py web`: one listening socket, several daphne processes on it; a process that
    dies is replaced while the others keep answering; SIGTERM stops them all."""
    from tests.conftest import process_env

    port = free_port()
    log = (tmp_path / "web.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "web", "--port", str(port), "--processes", "2"],
        cwd=ROOT,
        env=process_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/healthz"

    def up() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, 60, 0.2, "the web processes")
        log.seek(0)
        pids = [int(p) for p in re.search(r"pids ([\d, ]+)", log.read()).group(1).split(", ")]
        assert len(pids) == 2
        os.kill(pids[0], signal.SIGKILL)
        # The survivor answers meanwhile; the supervisor starts a replacement.
        for _ in range(20):
            assert httpx.get(url, timeout=5).status_code == 200
        wait_until(lambda: "starting another" in log_text(tmp_path), 20, 0.2, "a replacement")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not up()
        with pytest.raises(ProcessLookupError):
            os.kill(pids[1], 0)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def log_text(tmp_path) -> str:
    return (tmp_path / "web.log").read_text()
