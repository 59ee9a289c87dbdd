"""One command for the embedded default: migrate, load the demo chains, start the local model,
the executor, the worker and the web server together, and print a demo key with a curl to
paste."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from agentsvc.health import processes_not_ready
from agentsvc.local_model import model_command
from agentsvc.services import api_key_authenticate, api_key_create

MODEL_READY_TIMEOUT_S = 180


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _StopRequested(Exception):
    """Ctrl-C, SIGTERM or SIGHUP: stop every process, and exit 0."""


def _stop_requested(signum, frame) -> None:
    for stop in _STOP_SIGNALS:  # a second Ctrl-C while stopping changes nothing
        signal.signal(stop, signal.SIG_IGN)
    raise _StopRequested


class _Children:
    """The processes the command runs, each in a process group of its own."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}

    def _popen(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        self.procs[name] = subprocess.Popen(args, cwd=settings.BASE_DIR, env=env, process_group=0)

    def start(self, model_cmd: list[str] | None, host: str, port: int, env: dict[str, str]):
        python = sys.executable
        if model_cmd:
            self._popen("model", model_cmd)
        self._popen("executor", [python, "manage.py", "executor"], env)
        self._popen("worker", [python, "manage.py", "qcluster"], env)
        self._popen(
            "web",
            [python, "-m", "daphne", "-b", host, "-p", str(port), "agentsvc.asgi:application"],
            env,
        )

    def stop(self) -> list[str]:
        """SIGTERM to each, then wait (the executor drains its runs); returns the names of
        those that had to be killed."""
        for signum in _STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        for child in self.procs.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        killed = []
        for name, child in self.procs.items():
            try:
                child.wait(timeout=settings.WORKER_DRAIN_S + 10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                killed.append(f"the {name}")
        return killed


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class Command(BaseCommand):
    help = (
        "Run the local model, the executor, the worker (qcluster) and web (daphne) with a demo key."
    )

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)

    def handle(self, *args, **options):
        host, port = options["host"], options["port"]
        if not _port_free(host, port):
            raise CommandError(
                f"{host}:{port} is in use: stop what is listening there or pass --port."
            )
        model_url = settings.PROVIDERS["local"]["base_url"]
        model_cmd = model_command(model_url)  # checks the model files before anything starts
        if model_cmd:
            parts = urlsplit(model_url)
            if not _port_free(parts.hostname or "127.0.0.1", parts.port or 80):
                raise CommandError(
                    f"{parts.hostname}:{parts.port} (LOCAL_MODEL_URL) is in use: stop what is "
                    "listening there, or set LOCAL_MODEL_URL to a free port, or LOCAL_MODEL=off "
                    "to use the server already there."
                )
        call_command("migrate", interactive=False, verbosity=0)
        for name in ("demo.yaml", "code.yaml"):
            call_command("loadchains", str(settings.BASE_DIR / "chains" / name))
        key = self._demo_key()

        # The executor (webhooks) and the web process must know the web port: webhooks may not be
        # sent to it (webhooks/ssrf.py).
        env = {
            **os.environ,
            "SERVICE_PORTS": ",".join(map(str, sorted({*settings.SERVICE_PORTS, port}))),
        }
        children = _Children()
        # Ctrl-C, SIGTERM and a closed terminal (SIGHUP) are the normal ways to leave: each child
        # is stopped once, by SIGTERM from here (they run in process groups of their own, so a
        # terminal's Ctrl-C reaches this process alone: a second signal while stopping made the
        # worker hang). Installed explicitly: a job that a script starts in the background
        # inherits SIGINT ignored, and Python then raises no KeyboardInterrupt.
        for signum in _STOP_SIGNALS:
            signal.signal(signum, _stop_requested)
        try:
            children.start(model_cmd, host, port, env)
            self._serve(children.procs, model_cmd, model_url, f"http://{host}:{port}", key)
        except _StopRequested:
            self._say(f"\nStopping: runs in progress get {settings.WORKER_DRAIN_S:g} s to finish…")
            killed = children.stop()
            self._say(
                "agentsvc stopped"
                + (f" ({', '.join(killed)} did not stop in time: killed)." if killed else ".")
            )
        finally:
            children.stop()  # whatever ended serving: none of them outlives this command

    def _say(self, text: str) -> None:
        """A line that may find no reader (`make run | tee log`, the tee stopped by the same
        Ctrl-C): stopping goes on without it."""
        try:
            self.stdout.write(text)
            self.stdout.flush()
        except OSError:
            pass

    def _serve(self, children, model_cmd, model_url: str, base: str, key: str) -> None:
        """Wait for the processes to come up, print the banner, then watch them until a stop is
        requested (or one of them ends: CommandError)."""
        self._wait_for(f"{base}/healthz", children, 60, "the web server")
        if model_cmd:
            self.stdout.write("Loading the local model…")
            self._wait_for(
                f"{model_url.rstrip('/')}/models",
                children,
                MODEL_READY_TIMEOUT_S,
                "the local model server",
            )
        # The banner comes last: the executor and the worker are up (and have said so) first.
        missing = self._wait(
            lambda: "; ".join(f"{n}: {d}" for n, d in processes_not_ready().items()),
            children,
            60,
            "the executor and the worker",
        )
        if missing:
            raise CommandError(f"not ready within 60 s: {missing}")
        self._banner(base, key, model_url)
        model_reported = False
        while True:
            time.sleep(0.5)
            for name in ("web", "executor", "worker"):
                if children[name].poll() is not None:
                    raise CommandError(
                        f"the {name} process exited with "
                        f"{children[name].returncode}; stopped the others."
                    )
            model = children.get("model")
            if model and model.poll() is not None and not model_reported:
                model_reported = True
                self.stderr.write(
                    f"\nThe local model server exited with {model.returncode} (see the "
                    "messages above). Runs on the demo chains now fail with "
                    "provider_unavailable and /readyz says so. Restart with `make run`.\n"
                )

    def _demo_key(self) -> str:
        """The demo key, kept in DATA_DIR so it stays the same across restarts."""
        path = Path(settings.DATA_DIR) / "demo-api-key"
        if path.exists():
            raw = path.read_text().strip()
            if api_key_authenticate(raw=raw) is not None:
                return raw
        _, raw = api_key_create(owner_name="demo", name="demo")
        path.write_text(raw)
        path.chmod(0o600)
        return raw

    def _wait_for(
        self, url: str, children: dict[str, subprocess.Popen], timeout: float, what: str
    ) -> None:
        def answers() -> str | None:
            try:
                return None if httpx.get(url, timeout=1).status_code == 200 else "not yet"
            except httpx.HTTPError:
                return "not yet"

        missing = self._wait(answers, children, timeout, what)
        if missing:
            raise CommandError(f"{what} did not answer at {url} within {timeout:g} s")

    def _wait(self, missing, children: dict[str, subprocess.Popen], timeout: float, what: str):
        """Poll `missing()` (what is not there yet, or None) until it is all there, a child
        exits (CommandError) or `timeout` passes; returns what is still missing."""
        deadline = time.monotonic() + timeout
        while True:
            for name, child in children.items():
                if child.poll() is not None:
                    raise CommandError(
                        f"the {name} process exited with {child.returncode} "
                        f"while waiting for {what}; see the messages above."
                    )
            left = missing()
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.3)

    def _banner(self, base: str, key: str, model_url: str) -> None:
        model = {
            "smollm2": f"SmolLM2-135M-Instruct on llama.cpp at {model_url}",
            "demo": f"scripted demo model (echoes its prompt) at {model_url}",
            "off": f"your OpenAI-compatible server at {model_url}",
        }[settings.LOCAL_MODEL]
        body = '{"input": {"topic": "tides"}}'
        self.stdout.write(
            f"""
agentsvc is running ({
                "embedded default: SQLite in " + str(settings.DATA_DIR) + ", no Redis"
                if settings.EMBEDDED
                else "PostgreSQL" + (" + Redis" if settings.REDIS_URL else "")
            }).
  API     {base}/api/v1/chains        docs {base}/api/docs
  admin   {base}/admin/  (create a login: .venv/bin/python manage.py createsuperuser)
  model   {model}
  demo API key: {key}

Start a run, then poll it:
  curl -s -X POST {base}/api/v1/chains/research-brief/runs \\
    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\
    -d '{body}'
  curl -s {base}/api/v1/runs -H 'Authorization: Bearer {key}'

Ctrl-C stops everything.
"""
        )
        self.stdout.flush()
