"""One command for the embedded default: migrate, load the demo chains, start web + worker."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from agentsvc.services import api_key_authenticate, api_key_create


class Command(BaseCommand):
    help = "Run web (daphne) and worker (qcluster) together, with the demo chains and a demo key."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument(
            "--no-demo-model",
            action="store_true",
            help="do not start the scripted demo model server at LOCAL_MODEL_URL",
        )

    def handle(self, *args, **options):
        call_command("migrate", interactive=False, verbosity=0)
        call_command("loadchains", str(settings.BASE_DIR / "chains" / "demo.yaml"))
        key = self._demo_key()
        python = sys.executable
        children: list[subprocess.Popen] = []
        model_url = settings.PROVIDERS["local"]["base_url"]
        if not options["no_demo_model"]:
            parts = urlsplit(model_url)
            children.append(
                subprocess.Popen(
                    [
                        python,
                        "-m",
                        "tests.fakes.openai_server",
                        "--host",
                        parts.hostname or "127.0.0.1",
                        "--port",
                        str(parts.port or 80),
                    ],
                    cwd=settings.BASE_DIR,
                )
            )
        children.append(subprocess.Popen([python, "manage.py", "qcluster"], cwd=settings.BASE_DIR))
        children.append(
            subprocess.Popen(
                [
                    python,
                    "-m",
                    "daphne",
                    "-b",
                    options["host"],
                    "-p",
                    str(options["port"]),
                    "agentsvc.asgi:application",
                ],
                cwd=settings.BASE_DIR,
            )
        )

        def stop(*_):
            for child in children:
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
            for child in children:
                try:
                    child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    child.kill()

        signal.signal(signal.SIGTERM, lambda *_: (stop(), sys.exit(0)))
        base = f"http://{options['host']}:{options['port']}"
        try:
            self._wait_for(f"{base}/healthz", children)
            self._banner(base, key, model_url, options["no_demo_model"])
            while all(child.poll() is None for child in children):
                time.sleep(0.5)
            dead = next(c for c in children if c.poll() is not None)
            stop()
            raise CommandError(
                f"{' '.join(dead.args[1:3])} exited with {dead.returncode}; "
                "stopped the other processes."
            )
        except KeyboardInterrupt:
            stop()

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

    def _wait_for(self, url: str, children: list[subprocess.Popen]) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(child.poll() is not None for child in children):
                raise CommandError("a process exited during start-up; see the messages above")
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise CommandError(f"{url} did not answer within 60 s")

    def _banner(self, base: str, key: str, model_url: str, no_demo_model: bool) -> None:
        model = (
            f"{model_url} (your server)"
            if no_demo_model
            else f"{model_url} (scripted demo model that echoes its prompt; set LOCAL_MODEL_URL "
            "and --no-demo-model to use a real OpenAI-compatible server)"
        )
        body = '{"input": {"topic": "tides"}}'
        self.stdout.write(
            f"""
agentsvc is running (embedded default: SQLite in {settings.DATA_DIR}, no Redis).
  API     {base}/api/v1/chains
  admin   {base}/admin/  (create a login: python manage.py createsuperuser)
  model   {model}
  demo API key: {key}

Start a run, then poll it:
  curl -s -X POST {base}/api/v1/chains/research-brief/runs \\
    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\
    -d '{body}'
  curl -s {base}/api/v1/runs -H 'Authorization: Bearer {key}'

Ctrl-C stops everything.
""",
        )
        self.stdout.flush()
