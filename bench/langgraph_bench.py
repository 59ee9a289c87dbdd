"""A LangGraph graph of two nodes through one executor, against the same graph's `ainvoke`.

    .venv/bin/python bench/langgraph_bench.py [--runs 1000] [--tokens 10] [--latency-ms 100]
                                              [--skip agentsvc,reference] [--json PATH]

The graph is bench/langgraph_graph.py: `researcher` then `writer`, each one model call of
`--tokens` tokens at `--latency-ms` a token from the fake OpenAI-compatible model
(agentsvc/demo_model_server.py, in its own process), so a run is about 2 s of model time. Its
model is made once, at import, as a chain owner's module would.

1. agentsvc: production configuration (PostgreSQL + Redis), ONE executor (`manage.py executor
   --concurrency RUNS`, through bench/executor_probe.py). After a warm-up, `--runs` runs are
   queued in one transaction (all claimable at once); drain time is the first run's
   `created_at` to the last one's `finished_at`. Each run streams its tokens as `agent.output`
   events, records each node as a step and writes its checkpoints to PostgreSQL (durability
   "sync"). Also: start latency (`started_at - created_at`), run duration, runs in flight, the
   executor's event loop and CPU, its PostgreSQL connections and the database's commits/s.
2. reference: the same graph object's `ainvoke` (no checkpointer, no events), `--runs` at once
   with `asyncio.gather` in this process, on the same model server: wall time from the gather's
   start to its end, and each invocation's duration.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (
    DATABASE_URL,
    PgSampler,
    config_env,
    executor_command,
    executor_env,
    exit_on_sigterm,
    free_port,
    in_flight_stats,
    loop_window,
    model_command,
    pct,
    processes,
    read_samples,
    reset_database,
    wait_http,
    write_json,
)

ENTRYPOINT = "bench.langgraph_graph:graph"
WARMUP = 5


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--tokens", type=int, default=10, help="tokens per model call")
    p.add_argument("--latency-ms", type=int, default=100, help="model latency per token")
    p.add_argument("--skip", default="", help="parts to skip: agentsvc,reference")
    p.add_argument("--json", help="write the results here")
    return p.parse_args()


def wait_ended(ids: list, timeout: float) -> None:
    from runs.models import Run

    deadline = time.monotonic() + timeout
    while Run.objects.filter(pk__in=ids, status__in=["queued", "running"]).exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"runs unfinished after {timeout:.0f} s")
        time.sleep(0.1)


def wait_executor(stats: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not any("in_flight" in s for s in read_samples(stats)):
        if time.monotonic() > deadline:
            raise SystemExit("the executor did not start")
        time.sleep(0.1)


def queue_runs(key, chain, n: int) -> list:
    from django.db import transaction

    from runs.services import run_create

    with transaction.atomic():  # all claimable at once
        return [
            run_create(
                api_key=key,
                chain=chain,
                run_input={"topic": f"run {i}"},
                metadata={},
            ).id
            for i in range(n)
        ]


def agentsvc(args, key, chain, env: dict, tmp: Path, pg: PgSampler) -> dict:
    from runs.models import Run, RunEvent, RunStep

    stats = tmp / "probe.jsonl"
    log_dir = tmp / "executor"
    log_dir.mkdir()
    command = executor_command(concurrency=args.runs, stats=stats)
    with processes(command, env=executor_env(env), log_dir=log_dir):
        wait_executor(stats)
        wait_ended(queue_runs(key, chain, WARMUP), 60)  # imports, checkpoint pool
        ids = queue_runs(key, chain, args.runs)
        wait_ended(ids, 600)
        samples = read_samples(stats)
    rows = list(
        Run.objects.filter(pk__in=ids).values_list(
            "created_at", "started_at", "finished_at", "status"
        )
    )
    statuses = {s: sum(1 for r in rows if r[3] == s) for s in {r[3] for r in rows}}
    done = [(c.timestamp(), s.timestamp(), f.timestamp()) for c, s, f, _ in rows if s and f]
    start, end = min(c for c, _, _ in done), max(f for _, _, f in done)
    start_latency = [(s - c) * 1000 for c, s, _ in done]
    duration = [(f - s) * 1000 for _, s, f in done]
    flight = in_flight_stats([(s, f) for _, s, f in done])
    inside = [x for x in samples if start <= x["t"] <= end]
    cpu_s = inside[-1]["cpu_s"] - inside[0]["cpu_s"] if len(inside) >= 2 else float("nan")
    return {
        "runs": len(ids),
        "status": statuses,
        "drain_s": end - start,
        "start_latency_p50_ms": statistics.median(start_latency),
        "start_latency_p99_ms": pct(start_latency, 99),
        "run_duration_p50_ms": statistics.median(duration),
        "run_duration_p99_ms": pct(duration, 99),
        "in_flight_peak": flight["peak"],
        "in_flight_average": flight["average"],
        "events_per_run": RunEvent.objects.filter(run_id__in=ids).count() / len(ids),
        "steps_per_run": RunStep.objects.filter(run_id__in=ids).count() / len(ids),
        "cpu_ms_per_run": cpu_s * 1000 / len(ids),
        **pg.window(start, end),
        **loop_window(samples, start, end),
    }


def reference(args) -> dict:
    from bench.langgraph_graph import graph

    async def invoke(i: int) -> float:
        began = time.monotonic()
        state = await graph.ainvoke({"topic": f"run {i}"})
        assert state["brief"], state
        return time.monotonic() - began

    async def main() -> tuple[float, float, list[float]]:
        await asyncio.gather(*(invoke(i) for i in range(WARMUP)))
        began, cpu = time.monotonic(), time.process_time()
        durations = await asyncio.gather(*(invoke(i) for i in range(args.runs)))
        return time.monotonic() - began, time.process_time() - cpu, durations

    wall, cpu_s, durations = asyncio.run(main())
    ms = [d * 1000 for d in durations]
    return {
        "runs": args.runs,
        "drain_s": wall,
        "cpu_ms_per_run": cpu_s * 1000 / args.runs,
        "run_duration_p50_ms": statistics.median(ms),
        "run_duration_p99_ms": pct(ms, 99),
    }


def main() -> None:
    args = parse_args()
    exit_on_sigterm()
    skip = set(filter(None, args.skip.split(",")))
    tmp = Path(tempfile.mkdtemp(prefix="langgraph-bench-"))
    env = config_env("production", tmp / "data")
    model_port = free_port()
    model_url = f"http://127.0.0.1:{model_port}/v1"
    model = f"fake?tokens={args.tokens}&latency_ms={args.latency_ms}"
    env.update(
        LANGGRAPH_BENCH_MODEL=model,
        LOCAL_MODEL_URL=model_url,
        QUEUE_MAX="100000000",
        DJANGO_SETTINGS_MODULE="agentsvc.settings",
    )
    reset_database(env)
    os.environ.clear()
    os.environ.update(env)
    import django

    django.setup()
    from django.core.management import call_command

    from agentsvc.services import api_key_create
    from runs.chains import chain_publish

    call_command("migrate", verbosity=0)
    key, _ = api_key_create(
        owner_name="bench",
        name="bench",
        runs_per_minute=100_000_000,
        tokens_per_minute=2_000_000_000,
        max_active_runs=100_000_000,
    )
    chain, _ = chain_publish(
        definition={"name": "langgraph-bench", "entrypoint": ENTRYPOINT, "timeout_s": 600}
    )
    results: dict = {
        "config": {
            "runs": args.runs,
            "nodes": 2,
            "tokens": args.tokens,
            "latency_ms": args.latency_ms,
            "model_s_per_run": 2 * args.tokens * args.latency_ms / 1000,
        }
    }
    model_log = tmp / "model"
    model_log.mkdir()
    with (
        processes(model_command(model_port), env=env, log_dir=model_log),
        PgSampler(DATABASE_URL) as pg,
    ):
        wait_http(f"{model_url}/models")
        if "agentsvc" not in skip:
            results["agentsvc"] = agentsvc(args, key, chain, env, tmp, pg)
            print("agentsvc", results["agentsvc"], flush=True)
        if "reference" not in skip:
            results["reference"] = reference(args)
            print("reference", results["reference"], flush=True)
    write_json(args.json, results)
    report(results)


def report(r: dict) -> None:
    c = r["config"]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"\nLangGraph: {c['runs']} runs of 2 nodes x {c['tokens']} tokens at {c['latency_ms']} ms"
        f" ({c['model_s_per_run']:.1f} s of model time); load average {load}"
    )
    a, ref = r.get("agentsvc"), r.get("reference")
    if a:
        print(
            f"agentsvc  drain {a['drain_s']:.1f} s; start latency p50 "
            f"{a['start_latency_p50_ms']:.0f} / p99 {a['start_latency_p99_ms']:.0f} ms; run "
            f"p50 {a['run_duration_p50_ms']:.0f} / p99 {a['run_duration_p99_ms']:.0f} ms; in "
            f"flight avg {a['in_flight_average']:.0f} peak {a['in_flight_peak']}; "
            f"{a['events_per_run']:.0f} events, {a['steps_per_run']:.0f} steps a run; "
            f"PG connections max {a.get('connections_max')}, commits/s "
            f"{a.get('commits_per_s', float('nan')):.0f}; executor CPU "
            f"{a.get('process_cpu', float('nan')):.2f} cores, {a['cpu_ms_per_run']:.1f} ms a run"
        )
    if ref:
        print(
            f"reference drain {ref['drain_s']:.1f} s; run p50 {ref['run_duration_p50_ms']:.0f} "
            f"/ p99 {ref['run_duration_p99_ms']:.0f} ms; CPU {ref['cpu_ms_per_run']:.1f} ms a run"
        )
    if a and ref:
        print(f"drain agentsvc / ainvoke gathered: {a['drain_s'] / ref['drain_s']:.2f}x")


if __name__ == "__main__":
    main()
