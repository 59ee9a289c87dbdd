"""The scripted model: a real OpenAI-compatible chat completions server with no weights.

`LOCAL_MODEL=demo make run` serves it (so it ships in the package, not in tests/), and the tests
and benchmarks use it as their model provider. Behaviour is chosen per request by the model
name, so parallel tests never share state: `fake?tokens=20&latency_ms=5` streams 20 tokens 5 ms
apart. Parameters:
  tokens=N        completion length (default: echo the last user message, at most 64 words)
  latency_ms=MS   delay before each token
  fail=STATUS     answer STATUS (500, 503, 429, 401, ...) instead of streaming
  fail_times=K    fail only the first K requests for this exact model name, then stream
  retry_after=S   Retry-After header on failures
  malformed=1     send a chunk that is not JSON after the first token
  hang=1          send the headers and first token, then nothing
  drop=1          close the connection after the first token, without [DONE]
  no_usage=1      do not report usage
  stamp=1         each token is the time it was sent (Unix ns), for latency benchmarks
  json=1          answer a JSON object {"summary": <the words>, "words": <how many>} (in chunks of
                  a few characters), as a model asked for a json_schema response_format would
  json=bad        answer text that is not JSON (a truncated object)
  json=wrong      answer valid JSON that does not match that object's schema
  tools=N         when the request offers tools: call them for N rounds (a round per assistant
                  message with tool calls already in the conversation), then answer text that
                  echoes the last tool result; arguments are made from each tool's schema
                  (strings: the first word of the prompt, integers 2, numbers 1.5, booleans true)
  parallel=K      tool calls per round (default 1), the offered tools taken in turn
The last request body of each model name is kept (`server.bodies`), to check what was asked.
Run it: python -m agentsvc.demo_model_server --port 8089
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

FILLER = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
]


class FakeModelServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], models: list[str] | None = None) -> None:
        super().__init__(address, Handler)
        self.models = models or []
        self.requests: Counter[str] = Counter()
        self.bodies: dict[str, dict] = {}
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def count(self, model: str, body: dict | None = None) -> int:
        with self.lock:
            self.requests[model] += 1
            if body is not None:
                self.bodies[model] = body
            return self.requests[model]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Chunks are small writes: without TCP_NODELAY the last one waits for a delayed ACK
    # (about 40 ms on a kept-alive connection), which is not zero latency.
    disable_nagle_algorithm = True
    server: FakeModelServer

    def log_message(self, format, *args):  # quiet
        pass

    def _json(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            self._json(
                200,
                {
                    "object": "list",
                    "data": [{"id": m, "object": "model"} for m in self.server.models],
                },
            )
        elif self.path == "/_stats":
            with self.server.lock:
                self._json(200, dict(self.server.requests))
        else:
            self._json(404, {"error": {"message": "not found"}})

    def _chunk(self, payload: str) -> None:
        data = f"data: {payload}\n\n".encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def do_POST(self):
        if self.path != "/v1/chat/completions":
            self._json(404, {"error": {"message": "not found"}})
            return
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length))
            model = body["model"]
            messages = body["messages"]
        except (ValueError, KeyError):
            self._json(400, {"error": {"message": "bad request"}})
            return
        opts = dict(parse_qsl(urlsplit(model).query))
        n = self.server.count(model, body)
        fail = opts.get("fail")
        if fail and n <= int(opts.get("fail_times", 10**9)):
            headers = {"Retry-After": opts["retry_after"]} if "retry_after" in opts else {}
            self._json(int(fail), {"error": {"message": f"fake failure {fail}"}}, headers)
            return
        user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        rounds = sum(1 for m in messages if m["role"] == "assistant" and m.get("tool_calls"))
        if body.get("tools") and rounds < int(opts.get("tools", 0)):
            self._tool_calls(body, model, opts, user, rounds, latency_ms=opts.get("latency_ms"))
            return
        last = next((m for m in reversed(messages) if m["role"] in ("user", "tool")), None)
        words = str((last or {}).get("content") or "").split()[:64] or ["ok"]
        if "tokens" in opts:
            count = int(opts["tokens"])
            words = [(words + FILLER)[i % (len(words) + len(FILLER))] for i in range(count)]
        tokens = [w if i == 0 else " " + w for i, w in enumerate(words)]
        if "json" in opts:
            text = {
                "1": json.dumps({"summary": " ".join(words), "words": len(words)}),
                "wrong": json.dumps({"summary": len(words), "words": "many"}),
            }.get(opts["json"], '{"summary": "' + " ".join(words))
            tokens = [text[i : i + 8] for i in range(0, len(text), 8)]
        latency = float(opts.get("latency_ms", 0)) / 1000
        prompt_tokens = _prompt_tokens(messages)

        self._stream_start()
        try:
            for i, token in enumerate(tokens):
                if latency:
                    time.sleep(latency)
                if opts.get("stamp"):
                    token = f"{' ' if i else ''}{time.time_ns()}"
                self._chunk(
                    json.dumps(
                        {
                            "id": "chatcmpl-fake",
                            "object": "chat.completion.chunk",
                            "model": model,
                            "choices": [
                                {"index": 0, "delta": {"content": token}, "finish_reason": None}
                            ],
                        }
                    )
                )
                if i == 0 and opts.get("malformed"):
                    self._chunk("{not json")
                if i == 0 and opts.get("hang"):
                    time.sleep(3600)
                if i == 0 and opts.get("drop"):
                    self.close_connection = True
                    self.wfile.write(b"0\r\n\r\n")  # end the body early: no [DONE]
                    return
            self._chunk(
                json.dumps(
                    {
                        "id": "chatcmpl-fake",
                        "object": "chat.completion.chunk",
                        "model": model,
                        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                    }
                )
            )
            if not opts.get("no_usage"):
                self._chunk(
                    json.dumps(
                        {
                            "id": "chatcmpl-fake",
                            "choices": [],
                            "usage": {
                                "prompt_tokens": prompt_tokens,
                                "completion_tokens": len(tokens),
                                "total_tokens": prompt_tokens + len(tokens),
                            },
                        }
                    )
                )
            self._chunk("[DONE]")
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _stream_start(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _tool_calls(
        self, body: dict, model: str, opts: dict, user: str, rounds: int, latency_ms: str | None
    ) -> None:
        """One round of tool calls, streamed as OpenAI does: the name first, the arguments in
        pieces, then finish_reason tool_calls and the usage."""
        tools = [t["function"] for t in body["tools"] if t.get("type") == "function"]
        word = (user.split() or ["x"])[0]
        samples = {"string": word, "integer": 2, "number": 1.5, "boolean": True}
        calls = []
        for k in range(int(opts.get("parallel", 1))):
            tool = tools[(rounds * int(opts.get("parallel", 1)) + k) % len(tools)]
            props = (tool.get("parameters") or {}).get("properties") or {}
            args = {name: samples.get(p.get("type")) for name, p in props.items()}
            calls.append((f"call_{rounds}_{k}", tool["name"], json.dumps(args)))
        self._stream_start()
        try:
            if latency_ms:
                time.sleep(float(latency_ms) / 1000)
            for k, (call_id, name, args) in enumerate(calls):
                half = len(args) // 2
                for piece in (
                    {
                        "index": k,
                        "id": call_id,
                        "type": "function",
                        "function": {"name": name, "arguments": args[:half]},
                    },
                    {"index": k, "function": {"arguments": args[half:]}},
                ):
                    self._chunk(
                        json.dumps(
                            {
                                "id": "chatcmpl-fake",
                                "object": "chat.completion.chunk",
                                "model": model,
                                "choices": [
                                    {
                                        "index": 0,
                                        "delta": {"tool_calls": [piece]},
                                        "finish_reason": None,
                                    }
                                ],
                            }
                        )
                    )
            self._chunk(
                json.dumps(
                    {
                        "id": "chatcmpl-fake",
                        "model": model,
                        "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}],
                    }
                )
            )
            prompt_tokens = _prompt_tokens(body["messages"])
            completion = sum(len(args.split()) + 1 for _, _, args in calls)
            self._chunk(
                json.dumps(
                    {
                        "id": "chatcmpl-fake",
                        "choices": [],
                        "usage": {
                            "prompt_tokens": prompt_tokens,
                            "completion_tokens": completion,
                            "total_tokens": prompt_tokens + completion,
                        },
                    }
                )
            )
            self._chunk("[DONE]")
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass


def _prompt_tokens(messages: list[dict]) -> int:
    return sum(len(str(m.get("content") or "").split()) for m in messages)


def start_in_thread(
    host: str = "127.0.0.1", port: int = 0, models: list[str] | None = None
) -> FakeModelServer:
    server = FakeModelServer((host, port), models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    args = parser.parse_args()
    server = FakeModelServer((args.host, args.port))
    print(f"fake model server on {server.base_url}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


if __name__ == "__main__":
    main()
