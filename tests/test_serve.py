"""The README's run command: the embedded default (SQLite, no Redis) in one command."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading

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


def start_serve(
    tmp_path, *, sigint_ignored: bool = False, **env: str
) -> tuple[subprocess.Popen, int]:
    """`manage.py serve` in a process group of its own, as a terminal runs a command; with
    `sigint_ignored`, as a script runs a job in the background (SIGINT inherited ignored)."""
    port = free_port()
    log = (tmp_path / "serve.log").open("w+")

    def ignore_sigint():
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    proc = subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--port", str(port)],
        cwd=ROOT,
        env=embedded_env(tmp_path, **env),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=ignore_sigint if sigint_ignored else None,
    )
    return proc, port


def serve_output(tmp_path) -> str:
    return (tmp_path / "serve.log").read_text()


def wait_for_banner(tmp_path, proc) -> str:
    """The demo key, once the banner is out."""

    def banner():
        text = serve_output(tmp_path)
        assert proc.poll() is None, text
        return re.search(r"demo API key: (ak_\S+)", text)

    return wait_until(banner, 90, 0.3, "the banner").group(1)


def children_of(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in found.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def ctrl_c(tmp_path, proc) -> tuple[int, str]:
    """What a terminal does on Ctrl-C (SIGINT to the foreground process group); returns the
    exit code and the output. Every process the command started is gone by then."""
    children = children_of(proc.pid)
    assert len(children) == 4, children  # the model, the executor, the worker, the web server
    try:
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=60)
        assert not [pid for pid in children if alive(pid)], serve_output(tmp_path)
    finally:
        kill_all(proc, children)
    return code, serve_output(tmp_path)


def kill_all(proc, children: list[int]) -> None:
    """After a failed test: nothing it started may outlive it."""
    for pid in [*children, proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def assert_stopped_normally(code: int, text: str) -> None:
    assert code == 0, text
    after_banner = text[text.index("Ctrl-C stops everything.") :]
    assert "Stopping: runs in progress get" in after_banner
    assert after_banner.rstrip().endswith("agentsvc stopped."), after_banner
    assert "exited with" not in text and "Error" not in text, text


def test_serve_runs_a_chain_end_to_end_and_stops_on_ctrl_c(tmp_path):
    proc, port = start_serve(tmp_path)
    try:
        key = wait_for_banner(tmp_path, proc)
        text = serve_output(tmp_path)
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
        code, text = ctrl_c(tmp_path, proc)
    assert_stopped_normally(code, text)


def test_ctrl_c_on_a_job_started_in_the_background_stops_it_too(tmp_path):
    """A script's background job inherits SIGINT ignored: the children (which stop on SIGINT)
    ended, and the command reported each as a crash and exited 1."""
    proc, _ = start_serve(tmp_path, sigint_ignored=True)
    try:
        wait_for_banner(tmp_path, proc)
    finally:
        code, text = ctrl_c(tmp_path, proc)
    assert_stopped_normally(code, text)


def test_an_idle_service_prints_nothing_after_its_banner(tmp_path):
    """The banner is the last thing a user reads until they make a request: the processes say
    they are up before it, and the scheduled tasks (the keeper and the purge, every 30 s) write
    nothing while there is nothing to do."""
    proc, _ = start_serve(tmp_path, Q_SCHEDULER="true")  # as make run has it (the suite's: off)
    database = tmp_path / "data" / "agentsvc.sqlite3"

    def ticks() -> int:
        with contextlib.closing(sqlite3.connect(database)) as db:
            return db.execute(
                "SELECT count(*) FROM django_q_task WHERE success AND func IN "
                "('runs.tasks.keeper_pass', 'agentsvc.tasks.purge_expired')"
            ).fetchone()[0]

    try:
        wait_for_banner(tmp_path, proc)
        wait_until(lambda: ticks() >= 2, 90, 0.5, "a scheduled tick")
        text = serve_output(tmp_path)
        assert text.rstrip().endswith("Ctrl-C stops everything."), text
    finally:
        code, text = ctrl_c(tmp_path, proc)
    assert_stopped_normally(code, text)


def test_sigterm_stops_everything_and_exits_0(tmp_path):
    proc, _ = start_serve(tmp_path)
    children: list[int] = []
    try:
        wait_for_banner(tmp_path, proc)
        children = children_of(proc.pid)
        proc.send_signal(signal.SIGTERM)  # a service manager stops the command alone
        assert proc.wait(timeout=60) == 0, serve_output(tmp_path)
        assert not [pid for pid in children if alive(pid)]
    finally:
        kill_all(proc, children)
    assert serve_output(tmp_path).rstrip().endswith("agentsvc stopped.")


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


def test_ctrl_c_stops_everything_when_its_output_has_no_reader(tmp_path):
    """`make run | tee log`: the same Ctrl-C stops tee, and the command's last lines find a
    closed pipe. The children stopped anyway (they had been left running, holding the port)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--port", str(port)],
        cwd=ROOT,
        env=embedded_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    children: list[int] = []
    try:
        seen: list[str] = []

        def read_to_banner() -> None:
            for line in iter(proc.stdout.readline, b""):
                seen.append(line.decode(errors="replace"))
                if b"Ctrl-C stops everything." in line:
                    return

        reader = threading.Thread(target=read_to_banner, daemon=True)
        reader.start()
        reader.join(120)
        assert any("Ctrl-C stops everything." in line for line in seen), "".join(seen)
        children = children_of(proc.pid)
        assert children
        proc.stdout.close()  # the reader is gone
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
        wait_until(lambda: not [p for p in children if alive(p)], 30, 0.1, "the children to end")
    finally:
        kill_all(proc, children)
