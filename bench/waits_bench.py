"""Runs that wait for a person: what 10,000 waiting runs cost one executor host, and how fast
answers resume them.

    .venv/bin/python bench/waits_bench.py [--runs 10000] [--rate 100] [--webs 1] [--json PATH]

Production configuration (PostgreSQL + Redis), the fake model server, one daphne process
(`--webs N`: N on one port, `manage.py web --processes N`), ONE executor (its PostgreSQL
sessions tagged with application_name, as bench/common.py does). The chain has one agent with
an `approval` (asked before it runs), the agent 5 tokens.

1. idle: after a warm-up (200 runs asked, answered and completed), the executor's RSS and its
   PostgreSQL connections (max over 5 s) with nothing to do.
2. waiting: `--runs` runs created (batches of 100), executed by the executor to their request
   (`input_required`); then the same two figures over 5 s with every one of them waiting. The
   waiting runs hold no coroutine, no connection and no slot: the figures should be idle's,
   within 10 %.
3. answers: every run approved through the API (`POST /runs/{id}/input` on daphne), paced at
   `--rate` answers a second; for each, the time from its answer (`run.input_received`, written
   by the web process) to its next `agent.started` (written by the executor that resumed it):
   p50, p99, max, target p99 <= 1 s. Every run must complete, resumed once.
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
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (
    DATABASE_URL,
    EXECUTOR_APP,
    PY,
    PgSampler,
    config_env,
    executor_command,
    executor_env,
    exit_on_sigterm,
    free_port,
    model_command,
    pct,
    processes,
    reset_database,
    rss_kb,
    wait_http,
    write_json,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10_000)
    p.add_argument("--rate", type=float, default=100, help="answers per second")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--webs", type=int, default=1, help="web processes answering")
    p.add_argument("--json", help="write the results here")
    return p.parse_args()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds so far of a process and its children (the web processes of
    `manage.py web`)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return own + sum(cpu_s(int(child)) for child in children)


def held(pid: int, sampler: PgSampler, seconds: float = 5) -> dict:
    """The executor's RSS (max) and PostgreSQL connections (max, median) over `seconds`."""
    started, rss = time.time(), []
    while time.time() - started < seconds:
        rss.append(rss_kb(pid))
        time.sleep(0.25)
    window = sampler.window(started, time.time())
    return {
        "rss_mb": round(max(rss) / 1024, 1),
        "pg_connections_max": window["connections_max"],
        "pg_connections_p50": window["connections_p50"],
    }


async def answer_all(base: str, key: str, requests: dict[str, str], rate: float) -> dict:
    """POST an approval of every run, one every 1/rate s (each in its own task, so a slow
    answer does not delay the next): their final HTTP statuses and latencies. A 429 or 503 is
    retried after its Retry-After, as a client would (counted)."""
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    statuses: list[int] = []
    latencies: list[float] = []
    retried: list[int] = []
    async with httpx.AsyncClient(
        base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60, limits=limits
    ) as http:

        async def one(run_id: str, request_id: str) -> None:
            body = {"request_id": request_id, "approve": True}
            for _ in range(10):
                started = time.perf_counter()
                response = await http.post(f"/api/v1/runs/{run_id}/input", json=body)
                latencies.append(time.perf_counter() - started)
                if response.status_code not in (429, 503):
                    break
                retried.append(response.status_code)
                await asyncio.sleep(float(response.headers.get("Retry-After", 1)))
            statuses.append(response.status_code)

        tasks = []
        began = time.perf_counter()
        for i, (run_id, request_id) in enumerate(requests.items()):
            due = began + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(one(run_id, request_id)))
        await asyncio.gather(*tasks)
        spent = time.perf_counter() - began
    return {
        "statuses": statuses,
        "retried": len(retried),
        "rate_achieved": round(len(requests) / spent, 1),
        "http_p50_ms": round(pct(latencies, 50) * 1000, 1),
        "http_p99_ms": round(pct(latencies, 99) * 1000, 1),
    }


def main() -> None:
    args = parse_args()
    exit_on_sigterm()
    tmp = Path(tempfile.mkdtemp(prefix="waits-bench-"))
    env = config_env("production", tmp / "data")
    model_port, web_port = free_port(), free_port()
    env.update(
        LOCAL_MODEL_URL=f"http://127.0.0.1:{model_port}/v1",
        QUEUE_MAX="100000000",
        DJANGO_SETTINGS_MODULE="agentsvc.settings",
    )
    reset_database(env)
    os.environ.clear()
    os.environ.update(env)
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import transaction

    from agentsvc.services import api_key_create
    from runs.chains import chain_publish
    from runs.models import Run, RunEvent, RunStatus
    from runs.services import NewRun, run_create_batch

    call_command("migrate", verbosity=0)
    key, raw_key = api_key_create(
        owner_name="bench",
        name="bench",
        requests_per_minute=100_000_000,
        runs_per_minute=100_000_000,
        tokens_per_minute=2_000_000_000,
        max_active_runs=100_000_000,
    )
    chain, _ = chain_publish(
        definition={
            "name": "gate",
            "timeout_s": 600,
            "agents": [
                {
                    "name": "writer",
                    "provider": "local",
                    "model": "fake?tokens=5",
                    "prompt": "Write on {{ input.topic }}",
                    "approval": {"prompt": "Publish {{ input.topic }}?"},
                }
            ],
        }
    )

    def create(n: int, tag: str) -> list:
        ids = []
        for start in range(0, n, 100):
            items = [NewRun({"topic": f"{tag}{i}"}, {}) for i in range(start, min(n, start + 100))]
            with transaction.atomic():
                ids += [r.id for r in run_create_batch(api_key=key, chain=chain, items=items)]
        return ids

    def count(ids, status) -> int:
        found = 0
        for start in range(0, len(ids), 5000):
            found += Run.objects.filter(pk__in=ids[start : start + 5000], status=status).count()
        return found

    def wait_for(ids, status, timeout: float) -> float:
        began = time.monotonic()
        while count(ids, status) < len(ids):
            if time.monotonic() - began > timeout:
                raise SystemExit(f"{len(ids) - count(ids, status)} runs not {status} in time")
            time.sleep(0.5)
        return time.monotonic() - began

    def pending_requests(ids) -> dict[str, str]:
        rows = Run.objects.filter(pk__in=ids).values_list("id", "input_request")
        return {str(run_id): request["request_id"] for run_id, request in rows}

    base = f"http://127.0.0.1:{web_port}"
    web_command = [PY, "-m", "daphne", "-b", "127.0.0.1", "-p", str(web_port)]
    web_command.append("agentsvc.asgi:application")
    if args.webs > 1:
        web_command = [PY, "manage.py", "web", "--processes", str(args.webs)]
        web_command += ["--port", str(web_port)]
    results: dict = {"config": vars(args)}
    with processes(model_command(model_port), env=env, log_dir=tmp) as _:
        wait_http(f"http://127.0.0.1:{model_port}/v1/models")
        (tmp / "web").mkdir()
        with processes(web_command, env=env, log_dir=tmp / "web") as (web,):
            wait_http(f"{base}/healthz")
            (tmp / "x").mkdir()
            with (
                processes(executor_command(), env=executor_env(env), log_dir=tmp / "x") as (ex,),
                PgSampler(DATABASE_URL, EXECUTOR_APP) as sampler,
            ):
                # Warm-up: the whole cycle, so idle is an executor that has done this before.
                warm = create(args.warmup, "w")
                wait_for(warm, RunStatus.INPUT_REQUIRED, 120)
                asyncio.run(answer_all(base, raw_key, pending_requests(warm), args.rate))
                wait_for(warm, RunStatus.COMPLETED, 120)
                time.sleep(2)
                results["idle"] = held(ex.pid, sampler)

                created = time.monotonic()
                ids = create(args.runs, "r")
                create_s = time.monotonic() - created
                to_wait_s = wait_for(ids, RunStatus.INPUT_REQUIRED, 1800) + create_s
                time.sleep(2)
                results["waiting"] = {
                    "runs": args.runs,
                    "seconds_to_all_waiting": round(to_wait_s, 1),
                    **held(ex.pid, sampler),
                }

                requests = pending_requests(ids)
                cpu = {"web": cpu_s(web.pid), "executor": cpu_s(ex.pid)}
                load = os.getloadavg()[0]
                answers = asyncio.run(answer_all(base, raw_key, requests, args.rate))
                wait_for(ids, RunStatus.COMPLETED, 1800)
                answers["cpu_ms_per_answer"] = {
                    name: round((cpu_s(proc.pid) - cpu[name]) / len(ids) * 1000, 2)
                    for name, proc in (("web", web), ("executor", ex))
                }
                answers["load_average"] = [round(load, 2), round(os.getloadavg()[0], 2)]

    gaps, resumed = [], 0
    for start in range(0, len(ids), 2000):
        batch = ids[start : start + 2000]
        rows = RunEvent.objects.filter(
            run_id__in=batch, type__in=["run.input_received", "agent.started", "run.resumed"]
        ).values_list("run_id", "type", "created_at", "seq")
        by_run: dict = {}
        for run_id, kind, at, seq in rows:
            by_run.setdefault(run_id, []).append((seq, kind, at))
        for events in by_run.values():
            events.sort()
            answered = next(at for _, kind, at in events if kind == "run.input_received")
            agent = next(at for _, kind, at in events if kind == "agent.started" and at >= answered)
            gaps.append((agent - answered).total_seconds())
            resumed += sum(1 for _, kind, _ in events if kind == "run.resumed")
    statuses = answers.pop("statuses")
    idle, waiting = results["idle"], results["waiting"]
    results["answers"] = {
        **answers,
        "accepted": statuses.count(202),
        "completed": count(ids, RunStatus.COMPLETED),
        "resumed": resumed,
        "answer_to_agent_p50_ms": round(statistics.median(gaps) * 1000, 1),
        "answer_to_agent_p99_ms": round(pct(gaps, 99) * 1000, 1),
        "answer_to_agent_max_ms": round(max(gaps) * 1000, 1),
    }
    results["ratios"] = {
        "rss": round(waiting["rss_mb"] / idle["rss_mb"], 3),
        "pg_connections_max": f"{waiting['pg_connections_max']} vs {idle['pg_connections_max']}",
    }
    print(json.dumps(results, indent=2))
    write_json(args.json, results)
    assert results["answers"]["completed"] == len(ids), results
    assert results["answers"]["resumed"] == len(ids), results


if __name__ == "__main__":
    main()
