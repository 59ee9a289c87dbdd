"""Runs per second a worker sustains, with 1 and then 2 worker processes (production config).

    .venv/bin/python bench/worker_bench.py [--runs 600] [--workers 1,2]

For each worker count: N runs of a one-agent chain on the zero-latency fake model (5 tokens) are
created through `run_create` (the API's path: limits, the run, its first event, the task pushed
to Redis on commit) while no worker runs; then a qcluster with Q_WORKERS=n starts and the clock
runs from the first run's `started_at` to the last one's `finished_at`. Worker start-up is not
counted. Before that, a few runs are executed in this process under CaptureQueriesContext to
count the SQL statements one run costs the worker.
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
    PY,
    config_env,
    exit_on_sigterm,
    free_port,
    processes,
    reset_database,
    write_json,
)

TOKENS = 5


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=600, help="runs per worker count")
    parser.add_argument("--workers", default="1,2", help="worker counts to measure")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    exit_on_sigterm()

    tmp = Path(tempfile.mkdtemp(prefix="worker-bench-"))
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
    from django.db.models import Max, Min
    from django.test.utils import CaptureQueriesContext

    from agentsvc.services import api_key_create
    from runs.chains import chain_publish
    from runs.models import Run, RunStatus
    from runs.services import run_create
    from runs.tasks import run_execute

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
    model = [PY, "-m", "tests.fakes.openai_server", "--port", str(model_port)]
    with processes(model, env=env, log_dir=tmp):
        time.sleep(1)
        # Queries one run costs the worker, executed here (the tasks pushed meanwhile are
        # dropped with the queue below).
        counts = []
        for run_id in create(6):
            with CaptureQueriesContext(connection) as queries:
                run_execute(str(run_id))
            counts.append(len(queries))
        results["queries_per_run"] = statistics.median(counts[1:])
        import redis

        redis.Redis.from_url(env["REDIS_URL"]).flushdb()

        for workers in [int(w) for w in args.workers.split(",")]:
            ids = create(args.runs)
            worker_env = dict(env, Q_WORKERS=str(workers))
            log_dir = tmp / f"w{workers}"
            log_dir.mkdir()
            with processes([PY, "manage.py", "qcluster"], env=worker_env, log_dir=log_dir):
                deadline = time.monotonic() + 600
                pending = Run.objects.filter(pk__in=ids, status__in=["queued", "running"])
                while pending.exists():
                    if time.monotonic() > deadline:
                        sys.exit(f"{pending.count()} runs unfinished after 600 s")
                    time.sleep(0.2)
            done = Run.objects.filter(pk__in=ids)
            span = done.aggregate(first=Min("started_at"), last=Max("finished_at"))
            seconds = (span["last"] - span["first"]).total_seconds()
            completed = done.filter(status=RunStatus.COMPLETED).count()
            results[f"{workers}w"] = {
                "workers": workers,
                "completed": completed,
                "seconds": seconds,
                "runs_per_s": completed / seconds,
            }
    one, two = results.get("1w"), results.get("2w")
    if one and two:
        results["scaling_2w_over_1w"] = two["runs_per_s"] / one["runs_per_s"]
    write_json(args.json, results)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nruns per second, {args.runs} runs each, load average {load}")
    print(f"SQL statements per run in the worker: {results['queries_per_run']}")
    for name, r in results.items():
        if isinstance(r, dict):
            rate = r["runs_per_s"]
            print(f"{name}: {r['completed']} runs in {r['seconds']:.1f} s = {rate:.0f}/s")
    if "scaling_2w_over_1w" in results:
        print(f"2 workers / 1 worker: {results['scaling_2w_over_1w']:.2f}x")


if __name__ == "__main__":
    main()
