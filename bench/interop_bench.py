"""A2A against the REST API on the same daphne process: run starts per second, and the time from
an agent's token to a stream reader.

  .venv/bin/python bench/interop_bench.py [--window 10] [--rounds 2] [--connections 64]
                                          [--runs 30] [--tokens 20] [--hold 0]

1. Starts: one daphne process, no executor (accepted runs stay queued), `--connections` keep-alive
   connections posting as fast as answers come back, in `--window`-second windows taken in turn,
   `--rounds` times: REST `POST /api/v1/chains/bench/runs`, A2A `message:send` with
   return_immediately (HTTP+JSON), A2A JSON-RPC `SendMessage` with it. The clients speak raw
   HTTP/1.1 over asyncio streams, so the load generator costs the server's two cores little.
2. Token -> client: daphne and one executor; the fake model stamps each token with its send
   time (Unix ns); `--runs` runs one at a time read over SSE (`GET /api/v1/runs/{id}/events`) and
   as many over A2A (`tasks/{id}:subscribe`), each reader connected before its run is queued,
   with `--hold` idle SSE streams open meanwhile.

PostgreSQL and Redis: BENCH_DATABASE_URL (recreated) and BENCH_REDIS_URL (emptied), as every
benchmark here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import (  # noqa: E402
    PY,
    config_env,
    enqueue,
    executor_command,
    exit_on_sigterm,
    free_port,
    idle_runs,
    pct,
    processes,
    reset_database,
    wait_http,
    write_json,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--window", type=int, default=10, help="seconds per protocol and round")
    p.add_argument("--rounds", type=int, default=2, help="rounds of the three protocols")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--runs", type=int, default=30, help="runs streamed per protocol")
    p.add_argument("--tokens", type=int, default=20, help="tokens per streamed run")
    p.add_argument("--hold", type=int, default=0, help="idle SSE streams open while streaming")
    p.add_argument("--json", help="write the results here")
    return p.parse_args()


ARGS = parse_args()
exit_on_sigterm()
DATA_DIR = tempfile.mkdtemp(prefix="interop-bench-")
for phase in ("starts", "latency"):
    (Path(DATA_DIR) / phase).mkdir()
ENV = config_env("production", Path(DATA_DIR))
ENV.update(
    DJANGO_SETTINGS_MODULE="agentsvc.settings",
    SECRET_KEY="bench-secret-key",
    QUEUE_MAX="100000000",
    STREAMS_PER_KEY="100000",
    STREAMS_MAX="100000",
)
reset_database(ENV)
os.environ.clear()
os.environ.update(ENV)

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402

from agentsvc.demo_model_server import start_in_thread  # noqa: E402
from agentsvc.services import api_key_create  # noqa: E402
from runs.chains import chain_publish  # noqa: E402

HOST = "127.0.0.1"
INPUT = {"topic": "benchmark"}
MESSAGE = {
    "message": {"messageId": "bench", "role": "ROLE_USER", "parts": [{"data": INPUT}]},
    "configuration": {"returnImmediately": True},
}


# --- a raw HTTP/1.1 keep-alive client ----------------------------------------------------------
class Conn:
    """One keep-alive connection: a request out, its status and body back."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, head: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        self.writer.write(head)
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def post(path: str, body: dict, key: str, **headers: str) -> bytes:
    payload = json.dumps(body).encode()
    extra = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    return (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n{extra}\r\n"
    ).encode() + payload


async def load(port: int, head: bytes, ok: int, seconds: float) -> dict:
    """`--connections` connections sending `head` for `seconds`: answers/s and latency."""
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds

    async def one() -> None:
        nonlocal errors
        conn = Conn(port)
        try:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                status, _ = await conn.request(head)
                latencies.append((time.perf_counter() - started) * 1000)
                errors += status != ok
        finally:
            conn.close()

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(ARGS.connections)))
    elapsed = time.monotonic() - started
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": pct(latencies, 50),
        "p99_ms": pct(latencies, 99),
        "errors": errors,
    }


async def starts(port: int, key: str) -> dict:
    cases = {
        "rest": (post("/api/v1/chains/bench/runs", {"input": INPUT}, key), 202),
        "a2a": (post("/a2a/v1/chains/bench/message:send", MESSAGE, key, A2A_Version="1.0"), 200),
        "jsonrpc": (
            post(
                "/a2a/v1/chains/bench/jsonrpc",
                {"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": MESSAGE},
                key,
                A2A_Version="1.0",
            ),
            200,
        ),
    }
    for head, ok in cases.values():  # warm-up: connections, pools, first imports
        await load(port, head, ok, 2)
    windows: dict[str, list[dict]] = {name: [] for name in cases}
    for _ in range(ARGS.rounds):
        for name, (head, ok) in cases.items():
            windows[name].append(await load(port, head, ok, ARGS.window))
    return {
        name: {
            "rps": statistics.mean(w["rps"] for w in ws),
            "p50_ms": statistics.median(w["p50_ms"] for w in ws),
            "p99_ms": max(w["p99_ms"] for w in ws),
            "errors": sum(w["errors"] for w in ws),
            "windows": ws,
        }
        for name, ws in windows.items()
    }


# --- stream readers ----------------------------------------------------------------------------
class Stream:
    """An SSE response over a raw socket (chunked), as (data, parsed_at_ns) per event."""

    def __init__(self, reader, writer) -> None:
        self.reader, self.writer, self.buffer = reader, writer, b""

    @classmethod
    async def open(cls, port: int, path: str, key: str, **headers: str) -> Stream:
        reader, writer = await asyncio.open_connection(HOST, port, limit=2**20)
        extra = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {key}\r\n"
            f"Accept: text/event-stream\r\n{extra}\r\n".encode()
        )
        status = await reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"{path}: {status!r}")
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        return cls(reader, writer)

    async def events(self):
        while True:
            while b"\n\n" not in self.buffer:
                size = int((await self.reader.readline()).strip() or b"0", 16)
                if size == 0:
                    return
                chunk = (await self.reader.readexactly(size + 2))[:-2]
                self.buffer += chunk.replace(b"\r\n", b"\n")  # sse-starlette ends lines \r\n
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            now = time.time_ns()
            fields = dict(
                line.split(": ", 1) for line in block.decode().split("\n") if ": " in line
            )
            if "data" in fields:
                yield fields.get("event", "message"), json.loads(fields["data"]), now

    def close(self) -> None:
        self.writer.close()


def tokens_ms(text: str, now_ns: int) -> list[float]:
    return [(now_ns - int(token)) / 1e6 for token in text.split()]


TERMINAL_EVENTS = {"run.completed", "run.failed", "run.cancelled", "run.timed_out"}
TERMINAL_STATES = {"TASK_STATE_COMPLETED", "TASK_STATE_FAILED", "TASK_STATE_CANCELED"}


async def sse_reader(port: int, key: str, run_id: str, samples: list[float]) -> None:
    stream = await Stream.open(port, f"/api/v1/runs/{run_id}/events", key)
    events = stream.events()
    async for event, _, _ in events:  # replayed up to run.queued: the stream is live now
        if event == "run.queued":
            break
    await asyncio.to_thread(enqueue, run_id)
    async for event, data, now in events:
        if event == "agent.output":
            samples += tokens_ms(data["chunk"], now)
        if event in TERMINAL_EVENTS:
            break
    stream.close()


async def a2a_reader(port: int, key: str, run_id: str, samples: list[float]) -> None:
    path = f"/a2a/v1/chains/bench-latency/tasks/{run_id}:subscribe"
    stream = await Stream.open(port, path, key, A2A_Version="1.0")
    events = stream.events()
    async for _, data, _ in events:  # the task first: the stream is live now
        assert "task" in data, data
        break
    await asyncio.to_thread(enqueue, run_id)
    async for _, data, now in events:
        update = data.get("artifactUpdate")
        if update and update["metadata"]["event"] == "agent.output":
            samples += tokens_ms(update["artifact"]["parts"][0]["text"], now)
        status = data.get("statusUpdate")
        if status and status["status"]["state"] in TERMINAL_STATES:
            break
    stream.close()


async def latency(port: int, key, raw: str, chain, silent_chain) -> dict:
    ids = await asyncio.to_thread(idle_runs, key, chain, 2 * ARGS.runs + 6)
    held: list[Stream] = []
    if ARGS.hold:
        silent = await asyncio.to_thread(idle_runs, key, silent_chain, 20)
        for i in range(0, ARGS.hold, 40):  # 40 opening at a time
            batch = range(i, min(i + 40, ARGS.hold))
            held += await asyncio.gather(
                *(Stream.open(port, f"/api/v1/runs/{silent[j % 20]}/events", raw) for j in batch)
            )
    results = {}
    readers = {"sse": sse_reader, "a2a": a2a_reader}
    for warm, reader in zip(ids[:6:2], readers.values(), strict=False):  # warm-up
        await reader(port, raw, warm, [])
    for i, (name, reader) in enumerate(readers.items()):
        samples: list[float] = []
        for run_id in ids[6 + i :: 2]:
            await reader(port, raw, run_id, samples)
        results[name] = {
            "tokens": len(samples),
            "p50_ms": pct(samples, 50),
            "p99_ms": pct(samples, 99),
            "max_ms": max(samples),
        }
    for stream in held:
        stream.close()
    results["open_streams"] = len(held)
    return results


def main() -> None:
    call_command("migrate", verbosity=0)
    model = start_in_thread(HOST, 0)
    key, raw = api_key_create(
        owner_name=f"bench-{uuid.uuid4().hex[:6]}",
        name="bench",
        requests_per_minute=100_000_000,
        runs_per_minute=100_000_000,
        tokens_per_minute=2_000_000_000,
        max_active_runs=100_000_000,
    )

    def chain(name: str, model_name: str):
        return chain_publish(
            definition={
                "name": name,
                "timeout_s": 600,
                "input_schema": {
                    "type": "object",
                    "required": ["topic"],
                    "properties": {"topic": {"type": "string"}},
                },
                "agents": [
                    {"name": "a", "provider": "local", "model": model_name,
                     "base_url": model.base_url, "prompt": "{{ input.topic }}"}
                ],
            }
        )[0]  # fmt: skip

    chain("bench", "fake?tokens=5")
    latency_chain = chain("bench-latency", f"fake?tokens={ARGS.tokens}&stamp=1")
    silent_chain = chain("bench-silent", "fake?tokens=1")

    def daphne(port: int) -> list[str]:
        return [PY, "-m", "daphne", "-b", HOST, "-p", str(port), "agentsvc.asgi:application"]

    results: dict = {"config": vars(ARGS) | {"json": None}}
    try:
        port = free_port()
        with processes(daphne(port), env=ENV, log_dir=Path(DATA_DIR) / "starts"):
            wait_http(f"http://{HOST}:{port}/healthz")
            results["starts"] = asyncio.run(starts(port, raw))
        port = free_port()
        logs = Path(DATA_DIR) / "latency"
        with processes(executor_command(), daphne(port), env=ENV, log_dir=logs):
            wait_http(f"http://{HOST}:{port}/healthz")
            results["latency"] = asyncio.run(latency(port, key, raw, latency_chain, silent_chain))
    finally:
        model.shutdown()
    write_json(ARGS.json, results)
    s, lat = results["starts"], results["latency"]
    load_avg = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"\ninterop benchmark, {os.cpu_count()} cores (load average {load_avg}); logs in {DATA_DIR}"
    )
    print(f"\nrun starts, {ARGS.connections} connections, {ARGS.rounds} x {ARGS.window} s each")
    print(f"{'protocol':<10} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'vs REST':>8}")
    for name, r in s.items():
        print(
            f"{name:<10} {r['rps']:8.0f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['errors']:7d} "
            f"{r['rps'] / s['rest']['rps']:7.2f}x"
        )
    print(f"\ntoken -> client, {ARGS.runs} runs of {ARGS.tokens} tokens each, "
          f"{lat['open_streams']} idle streams open")  # fmt: skip
    for name in ("sse", "a2a"):
        r = lat[name]
        print(
            f"{name:<10} p50 {r['p50_ms']:6.2f}  p99 {r['p99_ms']:6.2f}  max {r['max_ms']:6.2f} ms"
        )
    print(f"A2A p99 - SSE p99: {lat['a2a']['p99_ms'] - lat['sse']['p99_ms']:+.2f} ms")


if __name__ == "__main__":
    main()
