"""A real webhook receiver for tests and benchmarks: records every request, answers as told.

Behaviour is chosen per request by the query string, so parallel tests never share state
(add a unique `tag`): `/hook?tag=ab&fail_times=2&fail_status=500` fails twice, then answers 200.
  status=N        answer N (default 200)
  fail_times=K    answer fail_status (default 500) to the first K requests of this exact path
  fail_status=N   the status of those failures
  retry_after=S   Retry-After header on every non-2xx answer
  redirect=1      answer 302 with Location: /ok
  delay_ms=MS     wait before answering
  control=VALUE   webhook-delivery header on every answer (Svix's delivery control: abort-message)
Run it: python -m tests.fakes.webhook_receiver --port 8290
"""

from __future__ import annotations

import argparse
import contextlib
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.time)


class WebhookReceiver(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _Handler)
        self.received: list[Received] = []
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def requests_for(self, path: str) -> list[Received]:
        """Requests whose path and query are exactly `path`."""
        with self.lock:
            return [r for r in self.received if r.path == path]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out as separate writes; without TCP_NODELAY, Nagle plus the client's
    # delayed ACK would add about 40 ms to every keep-alive request.
    disable_nagle_algorithm = True
    server: WebhookReceiver

    def log_message(self, format, *args):  # quiet
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        with self.server.lock:
            self.server.received.append(Received(self.path, dict(self.headers.items()), body))
            self.server.counts[self.path] += 1
            count = self.server.counts[self.path]
        opts = dict(parse_qsl(urlsplit(self.path).query))
        if opts.get("delay_ms"):
            time.sleep(int(opts["delay_ms"]) / 1000)
        status = int(opts.get("status", 200))
        if count <= int(opts.get("fail_times", 0)):
            status = int(opts.get("fail_status", 500))
        headers = {}
        if opts.get("redirect"):
            status, headers["Location"] = 302, "/ok"
        if opts.get("retry_after") and not 200 <= status < 300:
            headers["Retry-After"] = opts["retry_after"]
        if opts.get("control"):
            headers["webhook-delivery"] = opts["control"]
        reply = f"received {count}".encode()
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)
        except (BrokenPipeError, ConnectionResetError):
            pass


def start_in_thread(
    host: str = "127.0.0.1", port: int = 0, tls: tuple[str, str] | None = None
) -> WebhookReceiver:
    """With tls=(certfile, keyfile), the receiver speaks https."""
    server = WebhookReceiver((host, port))
    if tls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8290)
    args = parser.parse_args()
    server = WebhookReceiver((args.host, args.port))
    print(f"webhook receiver on {server.base_url}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


if __name__ == "__main__":
    main()
