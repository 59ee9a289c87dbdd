"""Runs in flight in one executor process, against the seed article's FastAPI pattern.

    .venv/bin/python bench/inflight_bench.py [--runs 1000] [--connections 16]
                                             [--levels 10,100,1000] [--waves 3] [--json PATH]

The model is the fake OpenAI-compatible server (agentsvc/demo_model_server.py) at `--latency-ms`
(100) a token; a run is a chain of `--agents` (2) agents of `--tokens` (10) tokens each, the
second prompted with the first's output: about 2 s of model time. Production configuration
(PostgreSQL + Redis), one daphne process, ONE executor (`manage.py executor`, through
bench/executor_probe.py, which samples its counters and RSS every 100 ms).

1. agentsvc: `--runs` runs created as fast as the API takes them (POST
   /api/v1/chains/inflight/runs over `--connections` client connections); drain time is the
   first run's `created_at` to the last one's `finished_at`. Also: start latency
   (`started_at - created_at`), runs in flight (exact, from the runs' start and finish times),
   the executor's RSS (idle after a warm-up, and peak), PostgreSQL connections of the executor
   (pg_stat_activity, application_name set through PGAPPNAME) and commits/s of the bench
   database (pg_stat_database.xact_commit, read from the maintenance database so the readings
   are not counted).
2. seed: bench/refs/seed_fastapi.py (dict + BackgroundTasks, one uvicorn process) calling the
   same model with the same chain shape, created by the same client: drain time the same way.
3. levels: for each of `--levels` C, an executor started with `--concurrency C` is warmed up and
   left idle, then C x `--waves` runs are queued through `run_create` in one transaction (so they
   all become claimable at once) and executed; while C runs are in flight (90 % or more):
   connections, commits/s, group commits/s, RSS.

For part 1 the probe's event-loop figures are reported too (bench/common.py loop_window): the
loop's lag, and how much of the time its thread ran on a CPU or waited on a run queue for one,
which tells a busy executor from a machine whose other processes hold the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (
    DATABASE_URL,
    PY,
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
    rss_kb,
    wait_http,
    write_json,
)

WARMUP = 5


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=1000, help="runs created through the API")
    p.add_argument("--connections", type=int, default=16, help="client connections creating")
    p.add_argument("--levels", default="10,100,1000", help="runs in flight for the sub-runs")
    p.add_argument("--waves", type=int, default=3, help="runs per sub-run: level x waves")
    p.add_argument("--tokens", type=int, default=10, help="tokens per agent")
    p.add_argument("--latency-ms", type=int, default=100, help="model latency per token")
    p.add_argument("--agents", type=int, default=2)
    p.add_argument("--skip", default="", help="parts to skip: agentsvc,seed,levels")
    p.add_argument("--json", help="write the results here")
    return p.parse_args()


async def create_many(
    base: str, path: str, n: int, connections: int, headers: dict[str, str]
) -> tuple[list[str], Counter]:
    """POST n creations over `connections` connections; ids accepted, other statuses counted
    (each retried at most 3 times, 0.2 s apart)."""
    ids: list[str] = []
    errors: Counter = Counter()
    todo = iter(range(n))
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60, limits=limits) as http:

        async def worker() -> None:
            for i in todo:
                for _ in range(4):
                    try:
                        r = await http.post(path, json={"input": {"topic": f"run {i}"}})
                    except httpx.HTTPError as e:
                        errors[type(e).__name__] += 1
                        await asyncio.sleep(0.2)
                        continue
                    if r.status_code == 202:
                        body = r.json()
                        ids.append(body.get("run_id") or body.get("job_id"))
                        break
                    errors[r.status_code] += 1
                    await asyncio.sleep(0.2)

        await asyncio.gather(*(worker() for _ in range(connections)))
    return ids, errors


def wait_probe(stats: Path, started: int, deadline_s: float) -> list[dict]:
    """Until the executor has started `started` runs and holds none; its samples."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        samples = read_samples(stats)
        last = samples[-1] if samples else {}
        if last.get("started_runs", 0) >= started and last.get("in_flight", 1) == 0:
            return samples
        time.sleep(0.1)
    raise SystemExit(f"runs unfinished after {deadline_s:.0f} s: {read_samples(stats)[-1:]}")


def wait_executor(stats: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any("in_flight" in s for s in read_samples(stats)):
            return
        time.sleep(0.1)
    raise SystemExit("the executor did not start")


def run_times(ids: list) -> dict:
    """created/started/finished (epoch seconds) and status of the given runs, from the database."""
    from runs.models import Run

    rows = Run.objects.filter(pk__in=ids).values_list(
        "created_at", "started_at", "finished_at", "status"
    )
    out = {"created": [], "started": [], "finished": [], "status": Counter()}
    for created, started, finished, status in rows:
        out["status"][status] += 1
        if started and finished:
            out["created"].append(created.timestamp())
            out["started"].append(started.timestamp())
            out["finished"].append(finished.timestamp())
    return out


def summarise(times: dict, n: int) -> dict:
    created, started, finished = times["created"], times["started"], times["finished"]
    start_latency = [(s - c) * 1000 for c, s in zip(created, started, strict=True)]
    duration = [(f - s) * 1000 for s, f in zip(started, finished, strict=True)]
    flight = in_flight_stats(list(zip(started, finished, strict=True)))
    return {
        "runs": n,
        "finished": len(finished),
        "drain_s": max(finished) - min(created),
        "create_span_s": max(created) - min(created),
        "after_last_create_s": max(finished) - max(created),
        "start_latency_p50_ms": statistics.median(start_latency),
        "start_latency_p99_ms": pct(start_latency, 99),
        "start_latency_max_ms": max(start_latency),
        "run_duration_p50_ms": statistics.median(duration),
        "run_duration_p99_ms": pct(duration, 99),
        "in_flight_peak": flight["peak"],
        "in_flight_average": flight["average"],
        "window": (min(created), max(finished)),
    }


def rss_window(samples: list[dict], start: float, end: float) -> int:
    return max((s["rss_kb"] for s in samples if start <= s["t"] <= end), default=0)


def idle_rss(stats: Path, seconds: float = 1.5) -> int:
    """The executor's RSS idle: the median of its samples over `seconds` from now."""
    time.sleep(seconds)
    now = time.time()
    values = [s["rss_kb"] for s in read_samples(stats) if now - seconds <= s["t"] <= now]
    return int(statistics.median(values))


def wait_runs_done(ids: list, timeout: float = 60) -> None:
    from runs.models import Run

    deadline = time.monotonic() + timeout
    while Run.objects.filter(pk__in=ids, status__in=["queued", "running"]).exists():
        if time.monotonic() > deadline:
            raise SystemExit("warm-up runs unfinished")
        time.sleep(0.1)


def main() -> None:
    args = parse_args()
    exit_on_sigterm()
    skip = set(filter(None, args.skip.split(",")))
    tmp = Path(tempfile.mkdtemp(prefix="inflight-bench-"))
    env = config_env("production", tmp / "data")
    model_port, web_port, seed_port = free_port(), free_port(), free_port()
    model_url = f"http://127.0.0.1:{model_port}/v1"
    model_name = f"fake?tokens={args.tokens}&latency_ms={args.latency_ms}"
    env.update(
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
    from django.db import transaction

    from agentsvc.services import api_key_create
    from runs.chains import chain_publish
    from runs.services import run_create

    call_command("migrate", verbosity=0)
    key, raw = api_key_create(
        owner_name="bench",
        name="bench",
        requests_per_minute=100_000_000,
        runs_per_minute=100_000_000,
        tokens_per_minute=2_000_000_000,
        max_active_runs=100_000_000,
    )
    agents = [
        {"name": "a0", "provider": "local", "model": model_name, "prompt": "{{ input.topic }}"}
    ] + [
        {"name": f"a{i}", "provider": "local", "model": model_name, "prompt": "{{ previous }}"}
        for i in range(1, args.agents)
    ]
    chain, _ = chain_publish(definition={"name": "inflight", "timeout_s": 600, "agents": agents})

    results: dict = {
        "config": {
            "runs": args.runs,
            "connections": args.connections,
            "agents": args.agents,
            "tokens": args.tokens,
            "latency_ms": args.latency_ms,
            "model_s_per_run": args.agents * args.tokens * args.latency_ms / 1000,
        }
    }
    headers = {"Authorization": f"Bearer {raw}"}
    daphne = [PY, "-m", "daphne", "-b", "127.0.0.1", "-p"]

    with processes(model_command(model_port), env=env, log_dir=tmp), PgSampler(DATABASE_URL) as pg:
        wait_http(f"{model_url}/models")

        # 1. agentsvc: runs created through the API, one executor.
        if "agentsvc" not in skip:
            stats = tmp / "agentsvc-probe.jsonl"
            log_dir = tmp / "agentsvc"
            (log_dir / "x").mkdir(parents=True)
            base = f"http://127.0.0.1:{web_port}"
            path = f"/api/v1/chains/{chain.name}/runs"
            with (
                processes(
                    [*daphne, str(web_port), "agentsvc.asgi:application"], env=env, log_dir=log_dir
                ) as procs,
                processes(
                    executor_command(stats=stats), env=executor_env(env), log_dir=log_dir / "x"
                ),
            ):
                wait_http(f"{base}/healthz")
                wait_executor(stats)
                warm, _ = asyncio.run(create_many(base, path, WARMUP, 2, headers))
                wait_runs_done(warm)
                idle = idle_rss(stats)
                t0 = time.time()
                ids, errors = asyncio.run(
                    create_many(base, path, args.runs, args.connections, headers)
                )
                created_s = time.time() - t0
                samples = wait_probe(stats, WARMUP + len(ids), 600)
                daphne_rss = rss_kb(procs[0].pid)
            times = run_times(ids)
            a = summarise(times, len(ids))
            start, end = a.pop("window")
            peak = rss_window(samples, start, end)
            a.update(
                status=dict(times["status"]),
                errors={str(k): v for k, v in errors.items()},
                create_rps=len(ids) / created_s,
                rss_idle_kb=idle,
                rss_peak_kb=peak,
                rss_per_run_kb=(peak - idle) / a["in_flight_peak"] if a["in_flight_peak"] else 0,
                daphne_rss_kb=daphne_rss,
                **pg.window(start, end),
                **loop_window(samples, start, end),
            )
            results["agentsvc"] = a
            print("agentsvc", a, flush=True)

        # 2. The seed article's pattern on the same model, the same client.
        if "seed" not in skip:
            log_dir = tmp / "seed"
            log_dir.mkdir()
            base = f"http://127.0.0.1:{seed_port}"
            seed_env = dict(env, SEED_MODEL_URL=model_url, SEED_MODEL=model_name)
            seed_env["SEED_AGENTS"] = str(args.agents)
            # uvicorn, as the seed article runs it: daphne kills an application instance 10 s
            # after its response (application_close_timeout), background task and all.
            uvicorn = [PY, "-m", "uvicorn", "--host", "127.0.0.1", "--log-level", "warning"]
            with processes(
                [*uvicorn, "--port", str(seed_port), "bench.refs.seed_fastapi:app"],
                env=seed_env,
                log_dir=log_dir,
            ) as procs:
                wait_http(f"{base}/_bench/stats")
                http = httpx.Client(base_url=base, timeout=30)
                warm, _ = asyncio.run(create_many(base, "/agent/tasks", WARMUP, 2, {}))
                deadline = time.monotonic() + 60
                while http.get("/_bench/stats").json()["completed"] < WARMUP:
                    if time.monotonic() > deadline:
                        raise SystemExit("seed: warm-up jobs unfinished after 60 s")
                    time.sleep(0.1)
                time.sleep(1)
                seed_idle = rss_kb(procs[0].pid)
                seed_peak = seed_idle
                t0 = time.time()
                ids, errors = asyncio.run(
                    create_many(base, "/agent/tasks", args.runs, args.connections, {})
                )
                created_s = time.time() - t0
                deadline = time.monotonic() + 600
                while True:
                    seed_peak = max(seed_peak, rss_kb(procs[0].pid))
                    stats_body = http.get("/_bench/stats").json()
                    if stats_body["completed"] >= WARMUP + len(ids):
                        break
                    if time.monotonic() > deadline:
                        raise SystemExit(f"seed: {stats_body['completed']} jobs completed")
                    time.sleep(0.1)
                http.close()
            jobs = [t for t in stats_body["times"] if t[0] >= t0 - 1]
            times = {
                "created": [j[0] for j in jobs],
                "started": [j[1] for j in jobs],
                "finished": [j[2] for j in jobs],
            }
            s = summarise(times, len(ids))
            s.pop("window")
            s.update(
                errors={str(k): v for k, v in errors.items()},
                create_rps=len(ids) / created_s,
                rss_idle_kb=seed_idle,
                rss_peak_kb=seed_peak,
                rss_per_run_kb=(seed_peak - seed_idle) / s["in_flight_peak"],
            )
            results["seed"] = s
            print("seed", s, flush=True)

        # 3. Fixed levels of runs in flight: connections and commits.
        if "levels" not in skip:
            results["levels"] = {}
            for level in [int(x) for x in args.levels.split(",")]:
                stats = tmp / f"level{level}-probe.jsonl"
                log_dir = tmp / f"level{level}"
                log_dir.mkdir()
                with processes(
                    executor_command(concurrency=level, stats=stats),
                    env=executor_env(env),
                    log_dir=log_dir,
                ):
                    wait_executor(stats)
                    warm = [
                        run_create(
                            api_key=key, chain=chain, run_input={"topic": "w"}, metadata={}
                        ).id
                        for _ in range(3)
                    ]
                    wait_runs_done(warm)
                    idle = idle_rss(stats)
                    n = level * args.waves
                    with transaction.atomic():  # all claimable at once
                        ids = [
                            run_create(
                                api_key=key, chain=chain, run_input={"topic": f"{i}"}, metadata={}
                            ).id
                            for i in range(n)
                        ]
                    samples = wait_probe(stats, 3 + n, 600)
                times = run_times(ids)
                lv = summarise(times, n)
                lv.pop("window")
                full = [s for s in samples if s.get("in_flight", 0) >= 0.9 * level]
                if len(full) >= 2:
                    start, end = full[0]["t"], full[-1]["t"]
                    first, last = full[0], full[-1]
                    span = last["t"] - first["t"]
                    lv.update(
                        full_window_s=span,
                        group_commits_per_s=(last["commits"] - first["commits"]) / span,
                        events_per_s=(last["events_written"] - first["events_written"]) / span,
                        **pg.window(start, end),
                    )
                peak = max(s["rss_kb"] for s in samples)
                lv.update(
                    level=level,
                    status=dict(times["status"]),
                    probe_in_flight_max=max(s.get("in_flight", 0) for s in samples),
                    rss_idle_kb=idle,
                    rss_peak_kb=peak,
                    rss_per_run_kb=(peak - idle) / lv["in_flight_peak"],
                )
                results["levels"][str(level)] = lv
                print("level", level, lv, flush=True)

    write_json(args.json, results)
    report(results)


def report(r: dict) -> None:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    c = r["config"]
    print(
        f"\nruns in flight: {c['runs']} runs of {c['agents']} agents x {c['tokens']} tokens at "
        f"{c['latency_ms']} ms ({c['model_s_per_run']:.1f} s of model time), one executor; "
        f"load average {load}"
    )
    for name in ("agentsvc", "seed"):
        if name in r:
            x = r[name]
            print(
                f"{name:<9} drain {x['drain_s']:.1f} s (created over {x['create_span_s']:.1f} s at"
                f" {x['create_rps']:.0f}/s, last created -> last done "
                f"{x['after_last_create_s']:.1f} s); start latency p50 "
                f"{x['start_latency_p50_ms']:.0f} / p99 "
                f"{x['start_latency_p99_ms']:.0f} ms; in flight avg {x['in_flight_average']:.0f}"
                f" peak {x['in_flight_peak']}; RSS idle {x['rss_idle_kb'] / 1024:.0f} MB peak "
                f"{x['rss_peak_kb'] / 1024:.0f} MB = {x['rss_per_run_kb']:.1f} KB/run"
            )
    x = r.get("agentsvc", {})
    if "loop_lag_p50_ms" in x:
        print(
            f"executor event loop: lag p50 {x['loop_lag_p50_ms']:.0f} / p99 "
            f"{x['loop_lag_p99_ms']:.0f} / max {x['loop_lag_max_ms']:.0f} ms; its thread on a CPU "
            f"{x['loop_on_cpu']:.0%} of the time, waiting for one {x['loop_waiting_for_cpu']:.0%};"
            f" process CPU {x['process_cpu']:.2f} cores"
        )
    if "agentsvc" in r and "seed" in r:
        print(f"drain agentsvc / seed: {r['agentsvc']['drain_s'] / r['seed']['drain_s']:.2f}x")
    for level, x in r.get("levels", {}).items():
        print(
            f"level {level:>5}: in flight avg {x['in_flight_average']:.0f} peak "
            f"{x['in_flight_peak']}; PG connections max {x.get('connections_max')} "
            f"p50 {x.get('connections_p50')}; commits/s {x.get('commits_per_s', float('nan')):.0f}"
            f" (group commits/s {x.get('group_commits_per_s', float('nan')):.0f}, events/s "
            f"{x.get('events_per_s', float('nan')):.0f}, over {x.get('full_window_s', 0):.1f} s);"
            f" start p99 {x['start_latency_p99_ms']:.0f} ms; RSS/run {x['rss_per_run_kb']:.1f} KB"
        )


if __name__ == "__main__":
    main()
