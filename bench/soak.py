"""Soak: minutes of mixed traffic at a fixed arrival rate, then the books are checked.

    .venv/bin/python bench/soak.py [--minutes 10] [--rate 3] [--webs 2] [--executors 2]

Starts the fake model server (tokens 20 ms apart), a webhook receiver, N daphne processes, M
executors (runs and webhook deliveries) and one qcluster with the schedules on (the keeper), as
in production (PostgreSQL + Redis, database `agentsvc_scale_soak`, Redis db 14;
BENCH_DATABASE_URL / BENCH_REDIS_URL override).
One endpoint of the key's owner receives every run's end. Runs arrive at `--rate` a second
(open loop: a slow server does not slow the arrivals), each request to a web process picked at
random, each arrival one of:
  poll        create, then GET the run every 0.5 s until it ends
  idempotent  create with an Idempotency-Key, repeat the same request 1 to 3 times
  sse         create, follow its SSE stream; half are cut mid-way and resumed with Last-Event-ID
  ws          create, follow its WebSocket; half are cut mid-way and resumed with ?after=N
  cancel      create, cancel it 0 to 1 s later
After the traffic, a drain (runs and webhook deliveries to end), then from the database and the
receiver:
  lost        runs answered 202 but not in the database
  duplicates  runs started more often than their attempts (two executions of one run), and
              idempotent repeats answered with another run
  stuck       runs not ended after the drain
  webhooks    ended runs whose `run.*` message never reached the receiver
  streams     streams that missed, repeated or reordered an event, or did not reach the end
  errors      5xx answers or transport errors
It prints one summary line and exits 1 on any violation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import PY, config_env, free_port, manage, pct, processes, reset_database
from tests.fakes.webhook_receiver import start_in_thread as start_receiver

TERMINAL = {"completed", "failed", "cancelled", "timed_out"}
KINDS = ["poll"] * 3 + ["idempotent"] * 2 + ["sse"] * 2 + ["ws"] * 2 + ["cancel"]
CHAINS = """
chains:
  - name: soak
    timeout_s: 120
    agents:
      - {name: a, provider: local, model: "fake?tokens=15&latency_ms=20", prompt: "{{ input.n }}"}
      - {name: b, provider: local, model: "fake?tokens=15&latency_ms=20", prompt: "{{ previous }}"}
"""


class Soak:
    def __init__(self, webs: list[str], key: str) -> None:
        self.webs = webs
        self.key = key
        self.auth = {"Authorization": f"Bearer {key}"}
        self.accepted: set[str] = set()
        self.violations: Counter[str] = Counter()
        self.kinds: Counter[str] = Counter()
        self.requests = 0
        self.create_ms: list[float] = []
        self.notes: list[str] = []
        self.unfinished = 0

    def web(self) -> str:
        return random.choice(self.webs)

    def note(self, kind: str, text: str) -> None:
        self.violations[kind] += 1
        if len(self.notes) < 20:
            self.notes.append(f"{kind}: {text}")

    async def request(self, http: httpx.AsyncClient, method: str, path: str, **kw):
        self.requests += 1
        try:
            r = await http.request(
                method, self.web() + path, headers=self.auth | kw.pop("headers", {}), **kw
            )
        except httpx.HTTPError as e:
            self.note("errors", f"{method} {path}: {e!r}")
            return None
        if r.status_code >= 500:
            self.note("errors", f"{method} {path}: {r.status_code} {r.text[:200]}")
        return r

    async def create(self, http, n: int, headers: dict | None = None) -> str | None:
        started = time.perf_counter()
        r = await self.request(
            http,
            "POST",
            "/api/v1/chains/soak/runs",
            json={"input": {"n": n}},
            headers=headers or {},
        )
        if r is None or r.status_code != 202:
            if r is not None and r.status_code < 500:
                self.note("errors", f"create: {r.status_code} {r.text[:200]}")
            return None
        self.create_ms.append((time.perf_counter() - started) * 1000)
        run_id = r.json()["run_id"]
        self.accepted.add(run_id)
        return run_id

    async def poll(self, http, run_id: str) -> None:
        for _ in range(600):
            r = await self.request(http, "GET", f"/api/v1/runs/{run_id}")
            if r is not None and r.status_code == 200 and r.json()["status"] in TERMINAL:
                return
            await asyncio.sleep(0.5)

    def check_stream(self, kind: str, run_id: str, seqs: list[int], last_event: str | None):
        if seqs != list(range(1, len(seqs) + 1)) or last_event not in {
            f"run.{s}" for s in TERMINAL
        }:
            self.note(
                "streams", f"{kind} {run_id}: seqs {seqs[:3]}..{seqs[-3:]}, last {last_event}"
            )

    async def sse(self, http, run_id: str, cut: bool) -> None:
        seqs: list[int] = []
        last = None
        cut_after = random.randint(2, 6) if cut else None
        for _attempt in range(20):
            headers = self.auth | {"Accept": "text/event-stream"}
            if seqs:
                headers["Last-Event-ID"] = str(seqs[-1])
            self.requests += 1
            try:
                async with http.stream(
                    "GET", f"{self.web()}/api/v1/runs/{run_id}/events", headers=headers
                ) as r:
                    if r.status_code != 200:
                        self.note("errors", f"sse {run_id}: {r.status_code}")
                        return
                    event = None
                    async for line in r.aiter_lines():
                        if line.startswith("id: "):
                            seqs.append(int(line[4:]))
                        elif line.startswith("event: "):
                            event = last = line[7:]
                        elif line == "" and event:
                            event = None
                            if cut_after and len(seqs) >= cut_after:
                                cut_after = None
                                break  # hang up mid-stream, then resume
            except httpx.HTTPError as e:
                self.note("errors", f"sse {run_id}: {e!r}")
            if last and last.removeprefix("run.") in TERMINAL:
                break
        self.check_stream("sse", run_id, seqs, last)

    async def ws(self, run_id: str, cut: bool) -> None:
        seqs: list[int] = []
        last = None
        cut_after = random.randint(2, 6) if cut else None
        for _attempt in range(20):
            url = self.web().replace("http://", "ws://") + f"/ws/v1/runs/{run_id}?after={len(seqs)}"
            self.requests += 1
            try:
                async with websockets.connect(url, additional_headers=self.auth) as sock:
                    async for message in sock:
                        frame = json.loads(message)
                        seqs.append(frame["seq"])
                        last = frame["event"]
                        if cut_after and len(seqs) >= cut_after:
                            cut_after = None
                            break
            except (OSError, websockets.WebSocketException) as e:
                self.note("errors", f"ws {run_id}: {e!r}")
            if last and last.removeprefix("run.") in TERMINAL:
                break
        self.check_stream("ws", run_id, seqs, last)

    async def arrival(self, http, n: int) -> None:
        kind = random.choice(KINDS)
        self.kinds[kind] += 1
        if kind == "idempotent":
            headers = {"Idempotency-Key": f"soak-{uuid.uuid4().hex}"}
            run_id = await self.create(http, n, headers)
            if run_id is None:
                return
            for _ in range(random.randint(1, 3)):
                r = await self.request(
                    http,
                    "POST",
                    "/api/v1/chains/soak/runs",
                    json={"input": {"n": n}},
                    headers=headers,
                )
                if r is not None and r.status_code == 202 and r.json()["run_id"] != run_id:
                    self.note(
                        "duplicates", f"idempotent repeat gave {r.json()['run_id']} for {run_id}"
                    )
            await self.poll(http, run_id)
            return
        run_id = await self.create(http, n)
        if run_id is None:
            return
        if kind == "poll":
            await self.poll(http, run_id)
        elif kind == "sse":
            await self.sse(http, run_id, cut=random.random() < 0.5)
        elif kind == "ws":
            await self.ws(run_id, cut=random.random() < 0.5)
        elif kind == "cancel":
            await asyncio.sleep(random.random())
            r = await self.request(http, "POST", f"/api/v1/runs/{run_id}/cancel")
            if r is not None and r.status_code not in (200, 202, 409):
                self.note("errors", f"cancel {run_id}: {r.status_code} {r.text[:200]}")
            await self.poll(http, run_id)

    async def traffic(self, seconds: float, rate: float, drain: float) -> float:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
        async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=60), limits=limits) as http:
            tasks = set()
            started = time.monotonic()
            n = 0
            while (due := started + n / rate) < started + seconds:
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                task = asyncio.create_task(self.arrival(http, n))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                n += 1
            lag = time.monotonic() - (started + seconds)
            # Clients still waiting on a run after the drain are given up (the books count the
            # run as stuck).
            if tasks:
                _, pending = await asyncio.wait(set(tasks), timeout=drain)
                for task in pending:
                    task.cancel()
                self.unfinished = len(pending)
        return lag


def books(env: dict[str, str], accepted: set[str], receiver, drain_s: float) -> dict:
    """What the database and the receiver say, after waiting up to drain_s for runs to end and
    their webhooks to arrive."""
    import psycopg

    def received_runs() -> set[str]:
        with receiver.lock:
            bodies = [r.body for r in receiver.received]
        return {json.loads(b)["data"]["run_id"] for b in bodies}

    with psycopg.connect(env["DATABASE_URL"]) as conn:
        deadline = time.monotonic() + drain_s
        while True:
            rows = conn.execute("SELECT id::text, status, attempt FROM runs_run").fetchall()
            conn.commit()
            status = {r[0]: r[1] for r in rows}
            ended = {i for i, s in status.items() if s in TERMINAL}
            if (accepted <= ended and ended <= received_runs()) or time.monotonic() > deadline:
                break
            time.sleep(1)
        attempts = {r[0]: r[2] for r in rows}
        started = dict(
            conn.execute(
                "SELECT run_id::text, count(*) FROM runs_runevent WHERE type = 'run.started'"
                " GROUP BY run_id"
            ).fetchall()
        )
        timing = conn.execute(
            "SELECT extract(epoch FROM started_at - created_at) * 1000,"
            " extract(epoch FROM finished_at - created_at) * 1000"
            " FROM runs_run WHERE status = 'completed'"
        ).fetchall()
    with receiver.lock:
        webhook_ids = Counter(r.headers.get("webhook-id") for r in receiver.received)
    return {
        "found": len(status),
        "lost": sorted(accepted - status.keys()),
        "unacknowledged": len(status.keys() - accepted),
        "duplicates": sorted(i for i, n in started.items() if n > attempts.get(i, 1)),
        "stuck": sorted(i for i in accepted & status.keys() if status[i] not in TERMINAL),
        "webhooks_missing": sorted(ended - received_runs()),
        "webhook_redeliveries": sum(n - 1 for n in webhook_ids.values()),
        "statuses": Counter(status.values()),
        "queue_wait_ms": [float(t[0]) for t in timing],
        "run_ms": [float(t[1]) for t in timing],
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rate", type=float, default=3, help="runs arriving per second")
    parser.add_argument("--webs", type=int, default=2)
    parser.add_argument("--executors", "--workers", type=int, default=2, help="executor processes")
    parser.add_argument("--drain", type=float, default=120, help="seconds allowed to drain")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        env = config_env("production", tmp_path / "data")
        env["DATABASE_URL"] = env["DATABASE_URL"].rsplit("/", 1)[0] + "/agentsvc_scale_soak"
        env["REDIS_URL"] = env["REDIS_URL"].rsplit("/", 1)[0] + "/14"
        model_port = free_port()
        env.update(
            LOCAL_MODEL_URL=f"http://127.0.0.1:{model_port}/v1",
            WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8",
            STREAMS_PER_KEY="100000",
            Q_SCHEDULER="true",
            Q_WORKERS="2",
            DB_POOL_MAX="4",
        )
        reset_database(env)
        manage(env, "migrate", "-v0")
        (tmp_path / "chains.yaml").write_text(CHAINS)
        manage(env, "loadchains", str(tmp_path / "chains.yaml"))
        key = manage(
            env, "createapikey", "soak",
            "--requests-per-minute", "100000000", "--runs-per-minute", "1000000",
            "--tokens-per-minute", "1000000000", "--max-active-runs", "100000",
        )  # fmt: skip
        receiver = start_receiver()
        ports = [free_port() for _ in range(args.webs)]
        webs = [f"http://127.0.0.1:{p}" for p in ports]
        commands = [[PY, "-m", "agentsvc.demo_model_server", "--port", str(model_port)]]
        commands += [
            [PY, "-m", "daphne", "-b", "127.0.0.1", "-p", str(p), "agentsvc.asgi:application"]
            for p in ports
        ]
        commands += [[PY, "manage.py", "executor"] for _ in range(args.executors)]
        commands += [[PY, "manage.py", "qcluster"]]  # the schedules
        with processes(*commands, env=env, log_dir=tmp_path):
            from bench.common import wait_http

            for web in webs:
                wait_http(f"{web}/healthz")
            r = httpx.post(
                f"{webs[0]}/api/v1/webhook-endpoints",
                json={"url": f"{receiver.base_url}/soak"},
                headers={"Authorization": f"Bearer {key}"},
            )
            assert r.status_code == 201, r.text
            time.sleep(2)  # let the executors and the qcluster settle
            soak = Soak(webs, key)
            seconds = args.minutes * 60
            began = time.monotonic()
            lag = asyncio.run(soak.traffic(seconds, args.rate, args.drain))
            traffic_s = time.monotonic() - began
            result = books(env, soak.accepted, receiver, args.drain)
            logs = {p.name: p.read_text(errors="replace") for p in tmp_path.glob("proc*.log")}
        receiver.shutdown()

    violations = {
        "lost": len(result["lost"]),
        "duplicates": soak.violations["duplicates"] + len(result["duplicates"]),
        "stuck": len(result["stuck"]),
        "webhooks_missing": len(result["webhooks_missing"]),
        "streams": soak.violations["streams"],
        "errors": soak.violations["errors"],
    }
    completed = result["statuses"]["completed"]
    print(
        f"\nsoak: {args.minutes:g} min at {args.rate:g} runs/s arriving, {args.webs} web,"
        f" {args.executors} executors; arrivals {dict(soak.kinds)};"
        f" statuses {dict(result['statuses'])}; unacknowledged runs {result['unacknowledged']};"
        f" webhook redeliveries {result['webhook_redeliveries']}; arrival lag {lag:.2f} s;"
        f" clients given up after the drain {soak.unfinished}"
    )
    if result["queue_wait_ms"]:
        print(
            f"create p50 {pct(soak.create_ms, 50):.0f} / p99 {pct(soak.create_ms, 99):.0f} ms;"
            f" queue wait p50 {pct(result['queue_wait_ms'], 50):.0f} /"
            f" p99 {pct(result['queue_wait_ms'], 99):.0f} ms; run (created to finished)"
            f" p50 {pct(result['run_ms'], 50):.0f} / p99 {pct(result['run_ms'], 99):.0f} ms"
        )
    for note in soak.notes:
        print("  " + note)
    for kind in ("lost", "duplicates", "stuck", "webhooks_missing"):
        if result[kind]:
            print(f"  {kind}: {result[kind][:5]}")
    if any(violations.values()):
        for name, text in logs.items():
            tail = "\n".join(text.splitlines()[-15:])
            print(f"--- {name} (last lines)\n{tail}")
    held = len(soak.accepted) / seconds
    print(
        f"SOAK accepted {len(soak.accepted)} found {result['found']} in {seconds:.0f} s"
        f" ({held:.2f} runs/s, {soak.requests / traffic_s:.1f} requests/s),"
        f" completed {completed}, " + ", ".join(f"{k} {v}" for k, v in violations.items())
    )
    return 1 if any(violations.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
