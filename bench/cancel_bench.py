"""Cancellation latency: runs in flight on one executor, cancelled through the API.

    .venv/bin/python bench/cancel_bench.py [--runs 100] [--rounds 3] [--window 5]
                                           [--via db|api] [--poll-ms 5] [--json PATH]

The demand: "Cancellation reaches a running run within 200 ms p99, also while the model is
silent". Production configuration (PostgreSQL + Redis), one daphne process, ONE executor
(`manage.py executor` through bench/executor_probe.py) at its defaults (EXECUTOR_CANCEL_POLL_MS
100, EXECUTOR_FLUSH_MS 5 unless the environment says otherwise). The model is the fake
OpenAI-compatible server (agentsvc/demo_model_server.py); two one-agent chains:

  stream  the model streams a token every `--latency-ms` (100) for far longer than the round
  silent  the model sends its headers and first token, then nothing (`hang=1`)

Each round creates `--runs` (100) runs through the API, half on each chain, waits until the
executor holds all of them (status `running`), then cancels each with POST
/api/v1/runs/{id}/cancel at a random moment within `--window` seconds, and waits until the
run reads `cancelled`: by default from the database (one query for all the runs waited for,
every `--poll-ms`, so the waiting does not load the web process the cancels go through), or
with `--via api` by GET /api/v1/runs/{id} every `--poll-ms` per run. Measured per run:

  server  finished_at - cancel_requested_at (from the database): the cancel request's commit to
          the moment the executor writes the run's end (before that write commits)
  client  cancel POST sent -> the run read `cancelled` (includes the POST, the commit of the
          end, and up to one poll interval)
  post    the cancel POST's round trip
  after_answer  finished_at - the moment the POST's answer arrived: the executor's share once
          the cancel had committed (a lower bound of it)
  end_visible   finished_at -> the client read `cancelled`: the commit of the run's end, and
          the read (up to one poll interval)

and, while cancelling, the executor's and the web process's CPU and the executor's event-loop
lag (from bench/executor_probe.py).

p50/p99 of each, by model kind and for all; target client p99 <= 200 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (
    PY,
    config_env,
    executor_command,
    executor_env,
    exit_on_sigterm,
    free_port,
    loop_window,
    model_command,
    pct,
    processes,
    read_samples,
    reset_database,
    wait_http,
    write_json,
)

TARGET_MS = 200


def wait_executor(stats: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any("in_flight" in s for s in read_samples(stats)):
            return
        time.sleep(0.1)
    raise SystemExit("the executor did not start")


def wait_status(ids: list, statuses: set[str], timeout: float) -> Counter:
    """Until every run of `ids` has one of `statuses` (read from the database)."""
    from runs.models import Run

    deadline = time.monotonic() + timeout
    while True:
        counts = Counter(Run.objects.filter(pk__in=ids).values_list("status", flat=True))
        if sum(counts[s] for s in statuses) == len(ids):
            return counts
        if time.monotonic() > deadline:
            raise SystemExit(f"runs not {sorted(statuses)} after {timeout:.0f} s: {counts}")
        time.sleep(0.05)


async def create(http: httpx.AsyncClient, chains: list[str]) -> list[tuple[str, str]]:
    """One run per entry of `chains`, 8 at a time: [(run id, chain)]."""
    sem = asyncio.Semaphore(8)

    async def one(i: int, chain: str) -> tuple[str, str]:
        async with sem:
            r = await http.post(f"/api/v1/chains/{chain}/runs", json={"input": {"topic": f"{i}"}})
            r.raise_for_status()
            return r.json()["run_id"], chain

    return await asyncio.gather(*(one(i, c) for i, c in enumerate(chains)))


class Watcher:
    """The client's view without loading the web process: one task reads, every `poll` s, the
    status of the runs being waited for (one query for all of them) and wakes their waiters
    when the database says `cancelled`."""

    def __init__(self, poll: float) -> None:
        self.poll = poll
        self.waiting: dict[str, asyncio.Future] = {}

    def wait(self, run_id: str) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.waiting[run_id] = fut
        return fut

    @staticmethod
    def _read(ids: list[str]) -> list[str]:
        from runs.models import Run

        return [
            str(i)
            for i in Run.objects.filter(pk__in=ids, status="cancelled").values_list("id", flat=True)
        ]

    async def run(self) -> None:
        while True:
            if self.waiting:
                done = await asyncio.to_thread(self._read, list(self.waiting))
                now = time.monotonic()
                for run_id in done:
                    fut = self.waiting.pop(run_id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(now)
            await asyncio.sleep(self.poll)


async def cancel_all(
    http: httpx.AsyncClient, runs: list[tuple[str, str]], window: float, poll: float, via: str
) -> list[dict]:
    """Cancel each run at a random moment within `window` s; then wait until it reads
    cancelled: through GET every `poll` s (`via` api), or the database watcher (`via` db)."""
    t0 = time.monotonic()
    watcher = Watcher(poll)
    watching = asyncio.create_task(watcher.run())

    async def one(run_id: str, chain: str, at: float) -> dict:
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        sent_wall = time.time()
        sent = time.monotonic()
        if via == "db":
            seen_db = watcher.wait(run_id)
        r = await http.post(f"/api/v1/runs/{run_id}/cancel")
        answered = time.monotonic()
        answered_wall = time.time()
        status = r.json().get("status")
        seen = answered
        seen_wall = answered_wall
        if status != "cancelled" and via == "db":
            try:
                seen = await asyncio.wait_for(seen_db, 30)
                seen_wall = time.time() - (time.monotonic() - seen)
                status = "cancelled"
            except TimeoutError:
                pass
        elif status != "cancelled":
            deadline = sent + 30
            while status != "cancelled" and time.monotonic() < deadline:
                await asyncio.sleep(poll)
                status = (await http.get(f"/api/v1/runs/{run_id}")).json().get("status")
            seen = time.monotonic()
            seen_wall = time.time()
        watcher.waiting.pop(run_id, None)
        return {
            "run_id": run_id,
            "chain": chain,
            "post_code": r.status_code,
            "post_ms": (answered - sent) * 1000,
            "client_ms": (seen - sent) * 1000 if status == "cancelled" else None,
            "status_seen": status,
            "sent_wall": sent_wall,
            "answered_wall": answered_wall,
            "seen_wall": seen_wall,
        }

    try:
        return await asyncio.gather(*(one(i, c, random.uniform(0, window)) for i, c in runs))
    finally:
        watching.cancel()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50_ms": statistics.median(values),
        "p90_ms": pct(values, 90),
        "p99_ms": pct(values, 99),
        "max_ms": max(values),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=100, help="runs in flight per round (half silent)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--window", type=float, default=5.0, help="cancels spread over this many s")
    p.add_argument("--poll-ms", type=float, default=5, help="client's reads after a cancel")
    p.add_argument(
        "--via",
        choices=["db", "api"],
        default="db",
        help="the client reads the run's status"
        " from the database (one query for all runs, every poll) or with GET (one per run)",
    )
    p.add_argument("--latency-ms", type=int, default=100, help="streaming model, per token")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    exit_on_sigterm()
    random.seed(args.seed)

    tmp = Path(tempfile.mkdtemp(prefix="cancel-bench-"))
    env = config_env("production", tmp / "data")
    model_port, web_port = free_port(), free_port()
    model_url = f"http://127.0.0.1:{model_port}/v1"
    # Long enough that no streaming run ends before its cancel: the round's set-up and window,
    # several times over.
    tokens = int((args.window + 60) * 1000 / args.latency_ms)
    models = {
        "stream": f"fake?tokens={tokens}&latency_ms={args.latency_ms}",
        "silent": "fake?tokens=10&hang=1",
    }
    env.update(LOCAL_MODEL_URL=model_url, DJANGO_SETTINGS_MODULE="agentsvc.settings")
    reset_database(env)
    os.environ.clear()
    os.environ.update(env)
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    from agentsvc.services import api_key_create
    from runs.chains import chain_publish
    from runs.models import Run

    call_command("migrate", verbosity=0)
    _, raw = api_key_create(
        owner_name="bench",
        name="bench",
        requests_per_minute=100_000_000,
        runs_per_minute=100_000_000,
        tokens_per_minute=2_000_000_000,
        max_active_runs=100_000_000,
    )
    for kind, model in models.items():
        agent = {"name": "a0", "provider": "local", "model": model, "prompt": "{{ input.topic }}"}
        chain_publish(definition={"name": kind, "timeout_s": 600, "agents": [agent]})

    results: dict = {
        "config": {
            "runs": args.runs,
            "rounds": args.rounds,
            "window_s": args.window,
            "poll_ms": args.poll_ms,
            "via": args.via,
            "latency_ms": args.latency_ms,
            "cancel_poll_ms": settings.EXECUTOR_CANCEL_POLL_MS,
            "flush_ms": settings.EXECUTOR_FLUSH_MS,
            "target_p99_ms": TARGET_MS,
        }
    }
    headers = {"Authorization": f"Bearer {raw}"}
    base = f"http://127.0.0.1:{web_port}"
    stats_path = tmp / "probe.jsonl"
    (tmp / "x").mkdir()
    (tmp / "e").mkdir()
    daphne = [PY, "-m", "daphne", "-b", "127.0.0.1", "-p", str(web_port)]
    samples: list[dict] = []
    windows: list[tuple[float, float, float]] = []  # cancel phases: start, end, web CPU s
    with (
        processes(model_command(model_port), env=env, log_dir=tmp),
        processes([*daphne, "agentsvc.asgi:application"], env=env, log_dir=tmp / "x") as (web,),
        processes(executor_command(stats=stats_path), env=executor_env(env), log_dir=tmp / "e"),
    ):
        wait_http(f"{model_url}/models")
        wait_http(f"{base}/healthz")
        wait_executor(stats_path)

        async def rounds() -> None:
            limits = httpx.Limits(max_connections=args.runs, max_keepalive_connections=args.runs)
            async with httpx.AsyncClient(
                base_url=base, headers=headers, timeout=30, limits=limits
            ) as http:
                for n in range(args.rounds):
                    kinds = ["stream", "silent"] * (args.runs // 2) + ["stream"] * (args.runs % 2)
                    runs = await create(http, kinds)
                    ids = [r for r, _ in runs]
                    await asyncio.to_thread(wait_status, ids, {"running"}, 60)
                    await asyncio.sleep(0.5)  # the silent models have said their first token
                    t_start = time.time()
                    web_cpu = cpu_s(web.pid)
                    got = await cancel_all(http, runs, args.window, args.poll_ms / 1000, args.via)
                    await asyncio.to_thread(wait_status, ids, {"cancelled"}, 60)
                    windows.append((t_start, time.time(), cpu_s(web.pid) - web_cpu))
                    for g in got:
                        g["round"] = n
                    samples.extend(got)
                    print(f"round {n}: {len(got)} cancelled", flush=True)

        asyncio.run(rounds())

    rows = {
        str(r["id"]): r
        for r in Run.objects.filter(pk__in=[s["run_id"] for s in samples]).values(
            "id", "status", "cancel_requested_at", "finished_at", "started_at"
        )
    }
    for s in samples:
        row = rows[s["run_id"]]
        s["status"] = row["status"]
        if row["finished_at"] and row["cancel_requested_at"]:
            server = row["finished_at"] - row["cancel_requested_at"]
            s["server_ms"] = server.total_seconds() * 1000
            # The executor's share once the web process has answered (the cancel committed
            # before that): a lower bound of the time from commit to finished_at.
            s["after_answer_ms"] = (row["finished_at"].timestamp() - s["answered_wall"]) * 1000
            # finished_at -> the client read `cancelled`: the commit of the end, and the read.
            s["end_visible_ms"] = (s["seen_wall"] - row["finished_at"].timestamp()) * 1000

    def part(kind: str | None) -> dict:
        chosen = [s for s in samples if kind is None or s["chain"] == kind]
        return {
            "server": stats([s["server_ms"] for s in chosen if "server_ms" in s]),
            "after_answer": stats([s["after_answer_ms"] for s in chosen if "server_ms" in s]),
            "end_visible": stats([s["end_visible_ms"] for s in chosen if "server_ms" in s]),
            "client": stats([s["client_ms"] for s in chosen if s["client_ms"] is not None]),
            "post": stats([s["post_ms"] for s in chosen]),
            "statuses": dict(Counter(s["status"] for s in chosen)),
            "post_codes": dict(Counter(str(s["post_code"]) for s in chosen)),
        }

    probe = read_samples(stats_path)
    inside = [[x for x in probe if a <= x["t"] <= b] for a, b, _ in windows]
    parts = [loop_window(probe, a, b) for a, b, _ in windows]
    parts = [x for x in parts if x]
    lags = [x["loop_lag_ms"] for w in inside for x in w if "loop_lag_ms" in x]

    def mean(key: str) -> float:
        return statistics.mean(x[key] for x in parts) if parts else float("nan")

    results["during_cancels"] = {
        "seconds": sum(b - a for a, b, _ in windows),
        "executor_cpu": mean("process_cpu"),
        "loop_on_cpu": mean("loop_on_cpu"),
        "loop_waiting_for_cpu": mean("loop_waiting_for_cpu"),
        "web_cpu": sum(c for *_, c in windows) / sum(b - a for a, b, _ in windows),
        "loop_lag_p50_ms": statistics.median(lags) if lags else float("nan"),
        "loop_lag_p99_ms": pct(lags, 99),
        "loop_lag_max_ms": max(lags, default=float("nan")),
        "in_flight_max": max((x.get("in_flight", 0) for w in inside for x in w), default=0),
        "load_average": os.getloadavg(),
    }
    results["all"] = part(None)
    results["stream"] = part("stream")
    results["silent"] = part("silent")
    results["met"] = results["all"]["client"].get("p99_ms", float("inf")) <= TARGET_MS
    results["samples"] = samples
    write_json(args.json, results)
    report(results)


def report(r: dict) -> None:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    c = r["config"]
    print(
        f"\ncancellation: {c['rounds']} rounds of {c['runs']} runs in flight on one executor "
        f"(half streaming at {c['latency_ms']} ms/token, half on a silent model), cancelled "
        f"through the API over {c['window_s']:.0f} s; EXECUTOR_CANCEL_POLL_MS "
        f"{c['cancel_poll_ms']}, EXECUTOR_FLUSH_MS {c['flush_ms']}; load average {load}"
    )
    for kind in ("all", "stream", "silent"):
        x = r[kind]
        print(f"{kind}: {x['statuses']}, cancel POST answered {x['post_codes']}")
        for name in ("client", "post", "server", "after_answer", "end_visible"):
            v = x[name]
            if v.get("n"):
                print(
                    f"  {name:<13} ms p50 {v['p50_ms']:7.1f}  p90 {v['p90_ms']:7.1f}  p99 "
                    f"{v['p99_ms']:7.1f}  max {v['max_ms']:7.1f}"
                )
    d = r["during_cancels"]
    print(
        f"while cancelling: executor CPU {d['executor_cpu']:.0%}, web CPU {d['web_cpu']:.0%} "
        f"of a core; executor loop lag (100 ms samples) p50 {d['loop_lag_p50_ms']:.1f} p99 "
        f"{d['loop_lag_p99_ms']:.1f} max {d['loop_lag_max_ms']:.1f} ms, its thread on a CPU "
        f"{d['loop_on_cpu']:.0%} of the time, waiting for one {d['loop_waiting_for_cpu']:.0%};"
        f" in flight max {d['in_flight_max']}"
    )
    print(f"target client p99 <= {c['target_p99_ms']} ms: {'met' if r['met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
