"""Streaming benchmark: token-to-client latency, idle streams per process, fan-out to many readers.

Starts its own processes (daphne, an executor, the fake model server in this process) and prints a
table. Production configuration (PostgreSQL + Redis) by default; --embedded for SQLite, no Redis.

  .venv/bin/python bench/stream_bench.py                      # PostgreSQL + Redis
  .venv/bin/python bench/stream_bench.py --embedded           # SQLite, in-memory layer, DB polling
  .venv/bin/python bench/stream_bench.py --hold 1000 --idle 5000 --fanout 1000 --runs 100

In order: `--hold` idle SSE streams are opened; with them open, `--runs` runs are streamed over SSE
and as many over WebSocket (each reader connects, sees `run.queued`, then the run is queued);
then idle streams are added up to `--idle` and the web process's memory is read; last, fan-out.
The model server stamps each token with the time it was sent (Unix ns); the reader subtracts that
from the time it parsed the token off the stream. SSE readers speak raw HTTP/1.1 over asyncio
streams (thousands of idle sockets are cheap that way; an httpx pool is not built for 5,000).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime
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
    p.add_argument("--embedded", action="store_true", help="SQLite and no Redis")
    p.add_argument("--port", type=int, default=0, help="daphne (default: a free port)")
    p.add_argument("--runs", type=int, default=100, help="runs streamed per protocol for latency")
    p.add_argument("--tokens", type=int, default=20, help="tokens per latency run")
    p.add_argument("--coalesce-ms", type=int, default=None, help="STREAM_COALESCE_MS (executor)")
    p.add_argument("--hold", type=int, default=1000, help="idle streams open during latency")
    p.add_argument("--idle", type=int, default=5000, help="idle SSE streams to hold open in all")
    p.add_argument("--fanout", type=int, default=1000, help="readers of one run (0: skip)")
    p.add_argument("--fanout-tokens", type=int, default=200)
    p.add_argument("--json", help="write the results here")
    return p.parse_args()


ARGS = parse_args()
exit_on_sigterm()
ARGS.port = ARGS.port or free_port()
DATA_DIR = tempfile.mkdtemp(prefix="stream-bench-")
ENV = config_env("embedded" if ARGS.embedded else "production", Path(DATA_DIR))
ENV.update(
    DJANGO_SETTINGS_MODULE="agentsvc.settings",
    SECRET_KEY="bench-secret-key",
    STREAMS_PER_KEY="100000",
    STREAMS_MAX="100000",
)
if ARGS.coalesce_ms is not None:
    ENV["STREAM_COALESCE_MS"] = str(ARGS.coalesce_ms)
reset_database(ENV)
os.environ.clear()
os.environ.update(ENV)

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402
from websockets.asyncio.client import connect as ws_connect  # noqa: E402

from agentsvc.demo_model_server import start_in_thread  # noqa: E402
from agentsvc.services import api_key_create  # noqa: E402
from runs.chains import chain_publish  # noqa: E402
from runs.models import Run, RunStatus  # noqa: E402

HOST = "127.0.0.1"


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# --- a raw SSE reader ------------------------------------------------------------------------
class Sse:
    """One SSE response over a raw socket: chunked body, split into (event, data) frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.buffer = b""

    @classmethod
    async def open(cls, method: str, path: str, key: str, body: dict | None = None) -> Sse:
        reader, writer = await asyncio.open_connection(HOST, ARGS.port, limit=2**20)
        payload = json.dumps(body).encode() if body is not None else b""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {key}\r\n"
            f"Accept: text/event-stream\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        )
        writer.write(head.encode() + payload)
        status = await reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"{path}: {status!r}")
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        return cls(reader, writer)

    async def frames(self):
        """(event, data, parsed_at_ns) per event; None for comments and the retry line."""
        while True:
            while b"\n\n" not in self.buffer:
                size = int((await self.reader.readline()).strip() or b"0", 16)
                if size == 0:
                    return
                self.buffer += (await self.reader.readexactly(size + 2))[:-2]
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            now = time.time_ns()
            event = data = None
            for line in block.decode().split("\n"):
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
            yield (event, data, now) if event else None

    def close(self) -> None:
        self.writer.close()


def token_latencies(data: dict, now_ns: int) -> list[float]:
    return [(now_ns - int(tok)) / 1e6 for tok in data["chunk"].split()]


TERMINAL = {"run.completed", "run.failed", "run.cancelled", "run.timed_out"}


def ts_ns(data: dict) -> int:
    return int(datetime.fromisoformat(data["ts"].replace("Z", "+00:00")).timestamp() * 1e9)


async def follow(sse: Sse, samples: list[float], split: list | None = None) -> int:
    """Reads to the terminal event. `split` gets (token -> event ts, event ts -> client) in ms."""
    count = 0
    async for frame in sse.frames():
        if frame is None:
            continue
        event, data, now = frame
        count += 1
        if event == "agent.output":
            samples.extend(token_latencies(data, now))
            if split is not None:
                at = ts_ns(data)
                split += [((at - int(t)) / 1e6, (now - at) / 1e6) for t in data["chunk"].split()]
        if event in TERMINAL:
            break
    sse.close()
    return count


# --- scenarios ---------------------------------------------------------------------------------
async def sse_run(raw: str, run_id: str, samples: list[float], split: list) -> None:
    sse = await Sse.open("GET", f"/api/v1/runs/{run_id}/events", raw)
    async for frame in sse.frames():  # replayed up to run.queued: the stream is live now
        if frame is not None and frame[0] == "run.queued":
            break
    await asyncio.to_thread(enqueue, run_id)
    await follow(sse, samples, split)


async def ws_run(raw: str, run_id: str, samples: list[float], split: list) -> None:
    url = f"ws://{HOST}:{ARGS.port}/ws/v1/runs/{run_id}"
    async with ws_connect(url, additional_headers={"Authorization": f"Bearer {raw}"}) as ws:
        while json.loads(await ws.recv())["event"] != "run.queued":
            pass
        await asyncio.to_thread(enqueue, run_id)
        async for message in ws:
            now = time.time_ns()
            frame = json.loads(message)
            if frame["event"] == "agent.output":
                samples.extend(token_latencies(frame["data"], now))
                at = ts_ns(frame["data"])
                split += [
                    ((at - int(t)) / 1e6, (now - at) / 1e6) for t in frame["data"]["chunk"].split()
                ]
            if frame["event"] in TERMINAL:
                break


async def latency(raw: str, run_ids: list[str], reader) -> dict:
    """Token -> client over one protocol, one run at a time, split at the event's `ts` into the
    worker's part (token -> event written) and the stream's (event -> client)."""
    samples: list[float] = []
    split: list = []
    for run_id in run_ids:
        await reader(raw, run_id, samples, split)
    worker_side = [a for a, _ in split]
    stream_side = [b for _, b in split]
    return {
        "tokens": len(samples),
        "token_to_client_p50_ms": pct(samples, 50),
        "token_to_client_p99_ms": pct(samples, 99),
        "token_to_client_max_ms": max(samples),
        "token_to_event_p50_ms": pct(worker_side, 50),
        "token_to_event_p99_ms": pct(worker_side, 99),
        "event_to_client_p50_ms": pct(stream_side, 50),
        "event_to_client_p99_ms": pct(stream_side, 99),
    }


async def open_idle(raw: str, run_ids: list[str], n: int) -> list[Sse]:
    """n more SSE streams over the silent runs, 40 opening at a time; each has its first bytes."""
    streams: list[Sse] = []
    for i in range(0, n, 40):
        batch = [
            Sse.open("GET", f"/api/v1/runs/{run_ids[j % len(run_ids)]}/events", raw)
            for j in range(i, min(i + 40, n))
        ]
        streams += await asyncio.gather(*batch)
    for sse in streams:  # the retry line: every stream is really open
        await sse.frames().__anext__()
    return streams


async def fanout(raw: str, run_id: str) -> dict:
    streams = []
    for i in range(0, ARGS.fanout, 40):
        n = min(40, ARGS.fanout - i)
        streams += await asyncio.gather(
            *[Sse.open("GET", f"/api/v1/runs/{run_id}/events", raw) for _ in range(n)]
        )
    samples: list[float] = []
    tasks = [asyncio.create_task(follow(s, samples)) for s in streams]
    await asyncio.sleep(1)
    started = time.monotonic()
    await asyncio.to_thread(enqueue, run_id)
    counts = await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    return {
        "readers": len(streams),
        "events_per_reader": statistics.median(counts),
        "deliveries": sum(counts),
        "seconds": elapsed,
        "deliveries_per_s": sum(counts) / elapsed,
        "token_p50_ms": pct(samples, 50),
        "token_p99_ms": pct(samples, 99),
    }


async def scenarios(key, raw: str, latency_chain, fan_chain, web_pid: int) -> dict:
    results: dict = {}
    runs = await asyncio.to_thread(idle_runs, key, latency_chain, 2 * ARGS.runs + 10)
    warm, sse_ids, ws_ids = runs[:10], runs[10 : 10 + ARGS.runs], runs[10 + ARGS.runs :]
    await latency(raw, warm[:5], sse_run)  # warm-up: connections, first imports
    await latency(raw, warm[5:], ws_run)
    silent = await asyncio.to_thread(idle_runs, key, fan_chain, 50)
    rss_before = rss_kb(web_pid)
    started = time.monotonic()
    streams = await open_idle(raw, silent, ARGS.hold)
    opened_s = time.monotonic() - started
    results["sse"] = {"open_streams": len(streams), **await latency(raw, sse_ids, sse_run)}
    results["ws"] = {"open_streams": len(streams), **await latency(raw, ws_ids, ws_run)}
    if ARGS.idle > len(streams):
        started = time.monotonic()
        more = ARGS.idle - len(streams)
        streams += await open_idle(raw, silent, more)
        opened_s += time.monotonic() - started
    if streams:
        await asyncio.sleep(3)
        rss_after = rss_kb(web_pid)
        probe = time.monotonic()
        check = await Sse.open("GET", f"/api/v1/runs/{silent[0]}/events", raw)
        probe_ms = (time.monotonic() - probe) * 1000
        check.close()
        results["idle"] = {
            "open": len(streams),
            "opened_per_s": len(streams) / opened_s,
            "rss_before_mb": rss_before / 1024,
            "rss_after_mb": rss_after / 1024,
            "kb_per_stream": (rss_after - rss_before) / len(streams),
            "new_stream_ms_while_held": probe_ms,
        }
    for sse in streams:
        sse.close()
    await asyncio.to_thread(
        lambda: Run.objects.filter(pk__in=silent).update(status=RunStatus.CANCELLED)
    )
    if ARGS.fanout:
        fan_run = (await asyncio.to_thread(idle_runs, key, fan_chain, 1))[0]
        results["fanout"] = await fanout(raw, fan_run)
    return results


def main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    call_command("migrate", verbosity=0)
    model = start_in_thread(HOST, 0)
    key, raw = api_key_create(
        owner_name=f"bench-{uuid.uuid4().hex[:6]}",
        name="bench",
        requests_per_minute=100_000_000,  # every stream opened is a request
        runs_per_minute=100_000_000,
        tokens_per_minute=2_000_000_000,
        max_active_runs=100_000_000,
    )

    def chain(name: str, model_name: str):
        return chain_publish(
            definition={
                "name": name,
                "timeout_s": 600,
                "input_schema": {"type": "object"},
                "agents": [
                    {"name": "a", "provider": "local", "model": model_name,
                     "base_url": model.base_url, "prompt": "go"}
                ],
            }
        )[0]  # fmt: skip

    latency_chain = chain("bench-latency", f"fake?tokens={ARGS.tokens}&stamp=1")
    fan_chain = chain("bench-fanout", f"fake?tokens={ARGS.fanout_tokens}&latency_ms=5&stamp=1")
    daphne = [PY, "-m", "daphne", "-b", HOST, "-p", str(ARGS.port), "agentsvc.asgi:application"]
    try:
        with processes(executor_command(), daphne, env=ENV, log_dir=Path(DATA_DIR)) as procs:
            wait_http(f"http://{HOST}:{ARGS.port}/healthz")
            results = asyncio.run(scenarios(key, raw, latency_chain, fan_chain, procs[1].pid))
    finally:
        model.shutdown()
    write_json(ARGS.json, results)
    mode = "embedded (SQLite, no Redis)" if ARGS.embedded else "PostgreSQL + Redis"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nstream benchmark, {mode}, {os.cpu_count()} cores (load average {load})")
    print(f"logs in {DATA_DIR}\n")
    for section, values in results.items():
        print(f"[{section}]")
        for name, value in values.items():
            shown = f"{value:12.2f}" if isinstance(value, float) else f"{value:>12}"
            print(f"  {name:28} {shown}")


if __name__ == "__main__":
    main()
