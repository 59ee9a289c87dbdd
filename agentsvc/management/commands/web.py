"""`python manage.py web`: several daphne processes behind one port, without a balancer.

The command binds the listening socket once and starts WEB_PROCESSES daphne processes on it
(`daphne --fd`): the kernel hands each new connection to one of them. A process that exits is
started again; SIGTERM or SIGINT stops them all (each closes its listener and its streams,
whose clients resume on another process with Last-Event-ID).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

RESTART_BACKOFF_S = (0.5, 1, 2, 5)
STOP_TIMEOUT_S = 20


def listening_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise CommandError(f"cannot listen on {host}:{port}: {e}") from None
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


class Command(BaseCommand):
    help = "Serve the API, streams and admin from several daphne processes on one port."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--processes", type=int, default=None, help="default: WEB_PROCESSES")
        parser.add_argument(
            "--proxy-headers",
            action="store_true",
            help="trust X-Forwarded-For / X-Forwarded-Proto from the balancer in front",
        )

    def handle(self, *args, **options):
        processes = options["processes"] or settings.WEB_PROCESSES
        if processes < 1:
            raise CommandError("--processes must be at least 1")
        sock = listening_socket(options["host"], options["port"])
        command = [sys.executable, "-m", "daphne", "--fd", str(sock.fileno())]
        if options["proxy_headers"]:
            command.append("--proxy-headers")
        command.append("agentsvc.asgi:application")

        def start() -> subprocess.Popen:
            return subprocess.Popen(command, cwd=settings.BASE_DIR, pass_fds=(sock.fileno(),))

        children = [start() for _ in range(processes)]
        restarts = [0] * processes
        stopping = False

        def stop(*_):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        self.stdout.write(
            f"agentsvc web: {processes} daphne processes on "
            f"{options['host']}:{options['port']} (pids {', '.join(str(c.pid) for c in children)})"
        )
        self.stdout.flush()
        try:
            while not stopping:
                time.sleep(0.2)
                for i, child in enumerate(children):
                    if child.poll() is None or stopping:
                        continue
                    delay = RESTART_BACKOFF_S[min(restarts[i], len(RESTART_BACKOFF_S) - 1)]
                    self.stderr.write(
                        f"web process {child.pid} exited with {child.returncode}; "
                        f"starting another in {delay:g} s"
                    )
                    time.sleep(delay)
                    restarts[i] += 1
                    children[i] = start()
        finally:
            for child in children:
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            for child in children:
                try:
                    child.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
            sock.close()
