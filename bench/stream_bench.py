"""Streaming benchmark: token-to-client latency, idle streams per process, fan-out to many readers.

Starts its own processes (daphne, qcluster, the fake model server in this process) and prints a
table. Production configuration (PostgreSQL + Redis) by default; --embedded for SQLite, no Redis.

  .venv/bin/python bench/stream_bench.py                      # PostgreSQL + Redis
  .venv/bin/python bench/stream_bench.py --embedded           # SQLite, in-memory layer, DB polling
  .venv/bin/python bench/stream_bench.py --idle 5000 --fanout 1000 --runs 100

The model server stamps each token with the time it was sent (Unix ns); the reader subtracts that
from the time it parsed the token off the SSE stream. Readers here speak raw HTTP/1.1 over asyncio
streams (thousands of idle sockets are cheap that way; an httpx pool is not built for 5,000).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embedded", action="store_true", help="SQLite and no Redis")
    p.add_argument(
        "--database-url", default="postgres://postgres@127.0.0.1:5432/agentsvc_stream_bench"
    )
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/10")
    p.add_argument("--port", type=int, default=8150, help="daphne; the fake model gets port+1")
    p.add_argument("--runs", type=int, default=100, help="runs streamed for the latency figure")
    p.add_argument("--tokens", type=int, default=20, help="tokens per latency run")
    p.add_argument("--coalesce-ms", type=int, default=None, help="STREAM_COALESCE_MS for workers")
    p.add_argument("--idle", type=int, default=5000, help="idle SSE streams to hold open")
    p.add_argument("--fanout", type=int, default=1000, help="readers of one run")
    p.add_argument("--fanout-tokens", type=int, default=200)
    return p.parse_args()


ARGS = parse_args()
DATA_DIR = tempfile.mkdtemp(prefix="stream-bench-")
ENV = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
ENV.update(
    DJANGO_SETTINGS_MODULE="agentsvc.settings",
    SECRET_KEY="bench-secret-key",
    DATA_DIR=DATA_DIR,
    Q_CLUSTER_NAME=f"bench-{uuid.uuid4().hex[:6]}",
    STREAMS_PER_KEY="100000",
    STREAMS_MAX="100000",
    LOG_LEVEL="WARNING",
)
if ARGS.coalesce_ms is not None:
    ENV["STREAM_COALESCE_MS"] = str(ARGS.coalesce_ms)
if not ARGS.embedded:
    ENV.update(DATABASE_URL=ARGS.database_url, REDIS_URL=ARGS.redis_url)
os.environ.clear()
os.environ.update(ENV)

import django  # noqa: E402

if not ARGS.embedded:
    import psycopg

    name = ARGS.database_url.rsplit("/", 1)[1]
    with psycopg.connect(ARGS.database_url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as c:
        if not c.execute("SELECT 1 FROM pg_database WHERE datname=%s", [name]).fetchone():
            c.execute(f'CREATE DATABASE "{name}"')
django.setup()

from django.core.management import call_command  # noqa: E402
from django_q.tasks import async_task  # noqa: E402

from agentsvc.services import api_key_create  # noqa: E402
from runs.chains import chain_publish  # noqa: E402
from runs.models import Run, RunEvent, RunStatus  # noqa: E402
from runs.timefmt import iso  # noqa: E402
from tests.fakes.openai_server import start_in_thread  # noqa: E402

HOST = "127.0.0.1"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


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
async def latency(key: str) -> tuple[list[float], list]:
    samples: list[float] = []
    split: list = []
    for _ in range(ARGS.runs):
        sse = await Sse.open("POST", "/api/v1/chains/bench-latency/stream", key, {"input": {}})
        await follow(sse, samples, split)
    return samples, split


def idle_runs(key, chain, n: int) -> list[str]:
    """Queued runs that no worker will take: their streams stay open and silent."""
    runs = []
    for _ in range(n):
        run = Run.objects.create(
            owner=key.owner, api_key=key, chain=chain, input={}, agents_total=1, last_seq=1
        )
        RunEvent.objects.create(
            run=run, seq=1, type="run.queued", created_at=run.created_at,
            data={"run_id": str(run.id), "seq": 1, "ts": iso(run.created_at)},
        )  # fmt: skip
        runs.append(str(run.id))
    return runs


async def idle(raw: str, run_ids: list[str], pid: int) -> dict:
    before = rss_kb(pid)
    streams: list[Sse] = []
    started = time.monotonic()
    for i in range(0, ARGS.idle, 40):
        batch = [
            Sse.open("GET", f"/api/v1/runs/{run_ids[j % len(run_ids)]}/events", raw)
            for j in range(i, min(i + 40, ARGS.idle))
        ]
        streams += await asyncio.gather(*batch)
    for sse in streams:  # the retry line: every stream is really open
        await sse.frames().__anext__()
    opened_s = time.monotonic() - started
    await asyncio.sleep(3)
    after = rss_kb(pid)
    probe = time.monotonic()
    check = await Sse.open("GET", f"/api/v1/runs/{run_ids[0]}/events", raw)
    probe_ms = (time.monotonic() - probe) * 1000
    check.close()
    for sse in streams:
        sse.close()
    return {
        "open": len(streams),
        "open_s": opened_s,
        "rss_before_mb": before / 1024,
        "rss_after_mb": after / 1024,
        "kb_per_stream": (after - before) / len(streams),
        "new_stream_ms_while_held": probe_ms,
    }


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
    await asyncio.to_thread(async_task, "runs.tasks.run_execute", run_id, save=False)
    counts = await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    return {
        "readers": len(streams),
        "events_per_reader": statistics.median(counts),
        "deliveries": sum(counts),
        "seconds": elapsed,
        "deliveries_per_s": sum(counts) / elapsed,
        "token_p50_ms": pct(samples, 0.5),
        "token_p99_ms": pct(samples, 0.99),
    }


def start(args: list[str], log: str) -> subprocess.Popen:
    return subprocess.Popen(
        args, cwd=ROOT, env=ENV, stdout=open(Path(DATA_DIR) / log, "wb"), stderr=subprocess.STDOUT
    )


def wait_http(url: str) -> None:
    import httpx

    for _ in range(600):
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    call_command("migrate", verbosity=0)
    model = start_in_thread(HOST, ARGS.port + 1)
    key, raw = api_key_create(owner_name=f"bench-{uuid.uuid4().hex[:6]}", name="bench")

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

    chain("bench-latency", f"fake?tokens={ARGS.tokens}&stamp=1")
    fan_chain = chain("bench-fanout", f"fake?tokens={ARGS.fanout_tokens}&latency_ms=5&stamp=1")
    procs = [start([sys.executable, "manage.py", "qcluster"], "qcluster.log")]
    web = start(
        [sys.executable, "-m", "daphne", "-b", HOST, "-p", str(ARGS.port),
         "agentsvc.asgi:application"], "daphne.log",
    )  # fmt: skip
    procs.append(web)
    results: dict = {}
    try:
        wait_http(f"http://{HOST}:{ARGS.port}/healthz")
        asyncio.run(latency(raw))  # warm-up: connections, first imports
        samples, split = asyncio.run(latency(raw))
        worker_side = [a for a, _ in split]
        stream_side = [b for _, b in split]
        results["latency"] = {
            "tokens": len(samples),
            "token_to_client_p50_ms": pct(samples, 0.5),
            "token_to_client_p99_ms": pct(samples, 0.99),
            "token_to_client_max_ms": max(samples),
            "token_to_event_p50_ms": pct(worker_side, 0.5),
            "token_to_event_p99_ms": pct(worker_side, 0.99),
            "event_to_client_p50_ms": pct(stream_side, 0.5),
            "event_to_client_p99_ms": pct(stream_side, 0.99),
        }
        if ARGS.fanout:
            fan_run = idle_runs(key, fan_chain, 1)[0]
            results["fanout"] = asyncio.run(fanout(raw, fan_run))
        if ARGS.idle:
            ids = idle_runs(key, fan_chain, 50)
            results["idle"] = asyncio.run(idle(raw, ids, web.pid))
            Run.objects.filter(pk__in=ids).update(status=RunStatus.CANCELLED)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=20)
        model.shutdown()
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
