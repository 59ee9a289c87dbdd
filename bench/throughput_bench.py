"""Runs per second one executor process sustains on the zero-latency model (production config).

    .venv/bin/python bench/throughput_bench.py [--runs 1000] [--concurrency N] [--profile]

N runs of a one-agent chain on the zero-latency fake model (5 tokens) are created through
`run_create` (the API's path: limits, the run, its first event, the wake-up on commit) while no
executor runs; then ONE executor (`manage.py executor`, through bench/executor_probe.py) starts
and the clock runs from the first run's `started_at` to the last one's `finished_at` (start-up
not counted; the time from the process's start is reported too). Also measured: commits of the
bench database per run (pg_stat_database), the executor's group commits and events per commit,
its PostgreSQL connections; and before that, the SQL statements one run costs when it is
executed alone (`run_execute` in this process, under CaptureQueriesContext). `--profile` samples
the executor with py-spy while it works and prints where its threads spend their time.
"""

from __future__ import annotations

import argparse
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
    model_command,
    processes,
    pyspy_record,
    pyspy_top,
    read_samples,
    reset_database,
    wait_http,
    write_json,
)

TOKENS = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=None, help="default RUN_CONCURRENCY")
    parser.add_argument("--profile", action="store_true", help="py-spy the executor")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    exit_on_sigterm()

    tmp = Path(tempfile.mkdtemp(prefix="throughput-bench-"))
    env = config_env("production", tmp / "data")
    model_port = free_port()
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
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from agentsvc.services import api_key_create
    from runs.chains import chain_publish
    from runs.execution.executor import run_execute
    from runs.models import Run, RunStatus
    from runs.services import run_create

    call_command("migrate", verbosity=0)
    key, _raw = api_key_create(
        owner_name="bench",
        name="bench",
        requests_per_minute=100_000_000,
        runs_per_minute=100_000_000,
        tokens_per_minute=2_000_000_000,
        max_active_runs=100_000_000,
    )
    chain, _ = chain_publish(
        definition={
            "name": "bench",
            "agents": [
                {"name": "a", "provider": "local", "model": f"fake?tokens={TOKENS}", "prompt": "x"}
            ],
        }
    )

    def create(n: int) -> list:
        return [
            run_create(api_key=key, chain=chain, run_input={"topic": "t"}, metadata={}).id
            for _ in range(n)
        ]

    results: dict = {"runs": args.runs, "tokens_per_run": TOKENS}
    with processes(model_command(model_port), env=env, log_dir=tmp):
        wait_http(f"{env['LOCAL_MODEL_URL']}/models")
        # Statements one run costs executed alone (its own flushes, not a group commit).
        counts = []
        for run_id in create(6):
            with CaptureQueriesContext(connection) as queries:
                run_execute(run_id=run_id)
            counts.append(len(queries))
        results["queries_per_run_alone"] = statistics.median(counts[1:])

        t0 = time.monotonic()
        ids = create(args.runs)
        results["create_per_s"] = args.runs / (time.monotonic() - t0)
        stats = tmp / "probe.jsonl"
        spy = None
        with (
            PgSampler(DATABASE_URL) as pg,
            processes(
                executor_command(args.concurrency, stats=stats),
                env=executor_env(env),
                log_dir=tmp,
            ) as procs,
        ):
            launched = time.time()
            deadline = time.monotonic() + 600
            pending = Run.objects.filter(pk__in=ids, status__in=["queued", "running"])
            while True:
                samples = read_samples(stats)
                last = samples[-1] if samples else {}
                if args.profile and spy is None and last.get("started_runs"):
                    spy = pyspy_record(procs[0].pid, 8, tmp / "profile.txt")
                if last.get("started_runs", 0) >= args.runs and last.get("in_flight", 1) == 0:
                    break
                if time.monotonic() > deadline:
                    sys.exit(f"{pending.count()} runs unfinished after 600 s")
                time.sleep(0.1)
            if spy is not None:
                spy.wait(timeout=30)
        rows = list(Run.objects.filter(pk__in=ids).values_list("started_at", "finished_at"))
        first = min(s for s, _ in rows).timestamp()
        last_done = max(f for _, f in rows).timestamp()
        seconds = last_done - first
        completed = Run.objects.filter(pk__in=ids, status=RunStatus.COMPLETED).count()
        busy = [s for s in samples if s.get("in_flight")]
        commits = busy[-1]["commits"] - busy[0]["commits"] if len(busy) > 1 else 0
        events = busy[-1]["events_written"] - busy[0]["events_written"] if len(busy) > 1 else 0
        window = pg.window(first, last_done)
        flight = in_flight_stats([(s.timestamp(), f.timestamp()) for s, f in rows])
        results["executor"] = {
            "completed": completed,
            "seconds": seconds,
            "runs_per_s": completed / seconds,
            "from_process_start_s": last_done - launched,
            "in_flight_peak": flight["peak"],
            "in_flight_average": flight["average"],
            "db_commits_per_run": window["commits_per_s"] * window.get("seconds", 0) / completed,
            "db_commits_per_s": window["commits_per_s"],
            "group_commits": commits,
            "events_per_group_commit": events / commits if commits else float("nan"),
            "pg_connections_max": window["connections_max"],
            "rss_peak_kb": max(s["rss_kb"] for s in samples),
        }
        if spy is not None:
            results["profile"] = pyspy_top(tmp / "profile.txt", 60)
    write_json(args.json, results)
    report(results)


def report(r: dict) -> None:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    x = r["executor"]
    print(f"\none executor, zero-latency model, {r['runs']} runs of {r['tokens_per_run']} tokens;"
          f" load average {load}")  # fmt: skip
    print(f"runs/s {x['runs_per_s']:.0f} ({x['completed']} in {x['seconds']:.1f} s; "
          f"{x['from_process_start_s']:.1f} s from the process's start); in flight avg "
          f"{x['in_flight_average']:.0f} peak {x['in_flight_peak']}")  # fmt: skip
    print(f"SQL statements per run executed alone: {r['queries_per_run_alone']}")
    print(f"database commits per run {x['db_commits_per_run']:.2f} ({x['db_commits_per_s']:.0f}/s)"
          f"; group commits {x['group_commits']}, {x['events_per_group_commit']:.1f} events each;"
          f" PostgreSQL connections max {x['pg_connections_max']}")  # fmt: skip
    p = r.get("profile")
    if p:
        total = sum(p["samples"].values())
        kinds = sorted(p["samples"].items(), key=lambda kv: -kv[1])
        print(f"\npy-spy, {total} samples: " + ", ".join(f"{k} {v}" for k, v in kinds))
        for kind in sorted(p["samples"], key=lambda k: -p["samples"][k])[:2]:
            n = p["samples"][kind]
            print(f"[{kind}] self:")
            for name, c in p["self"][kind][:10]:
                print(f"  {100 * c / n:5.1f}%  {name}")
            print(f"[{kind}] inclusive:")
            shown = [(name, c) for name, c in p["inclusive"][kind] if c < 0.9 * n]
            for name, c in shown[:25]:
                print(f"  {100 * c / n:5.1f}%  {name}")


if __name__ == "__main__":
    main()
