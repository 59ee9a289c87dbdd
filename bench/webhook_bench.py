"""Webhook delivery benchmark: deliveries/s one executor's delivery pump sustains, and run end to
receipt latency.

Needs PostgreSQL and Redis (the production configuration). Reproduce with:
    .venv/bin/python bench/webhook_bench.py --deliveries 1000 --runs 100
It recreates the database BENCH_DATABASE_URL (default agentsvc_bench), starts ONE executor
(`manage.py executor`: its delivery pump, webhooks/pump.py, attempts deliveries on
WEBHOOK_CONCURRENCY threads), a real receiver (tests/fakes/webhook_receiver.py) and the
zero-latency fake model, both in this process.

1. Backlog: N due deliveries are written at once (as after an outage, or resends); the pump
   claims them (within WEBHOOK_POLL_S) in batches of its free slots; the clock runs from the
   first to the last request the receiver gets.
2. Run ends: N runs with a webhook (one-agent chain, zero-latency model) are queued at once;
   the executor runs them, each terminal event writes its delivery in its transaction and wakes
   the pump; deliveries/s from the first to the last receipt (bounded by run throughput too).
3. Latency: runs with a webhook created one at a time; from the run's `finished_at` (stamped
   by the executor just before the group commit of its terminal event) to the receiver reading
   the request.
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
    config_env,
    executor_command,
    exit_on_sigterm,
    pct,
    processes,
    reset_database,
    write_json,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deliveries", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--port", type=int, default=0, help="the receiver (default: a free port)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    exit_on_sigterm()
    tmp = Path(tempfile.mkdtemp(prefix="webhook-bench-"))
    env = config_env("production", tmp / "data")
    env.update(
        WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8",
        QUEUE_MAX="100000000",
        DJANGO_SETTINGS_MODULE="agentsvc.settings",
    )
    from agentsvc.demo_model_server import start_in_thread as model_in_thread

    model = model_in_thread()
    env["LOCAL_MODEL_URL"] = model.base_url
    reset_database(env)
    os.environ.clear()
    os.environ.update(env)
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.db import transaction
    from django.utils import timezone

    from agentsvc.services import api_key_create
    from runs.chains import chain_publish
    from runs.models import Run, RunStatus
    from runs.services import run_create
    from tests.fakes.webhook_receiver import start_in_thread
    from webhooks.models import WebhookDelivery, WebhookMessage

    call_command("migrate", verbosity=0)
    receiver = start_in_thread(port=args.port)
    secret = "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
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
            "agents": [{"name": "a", "provider": "local", "model": "fake?tokens=3", "prompt": "x"}],
        }
    )

    def webhook(path: str) -> dict:
        return {"url": f"{receiver.base_url}{path}", "secret": secret, "events": ["run.completed"]}

    def wait_receipts(path: str, n: int) -> list:
        deadline = time.monotonic() + 300
        while len(receiver.requests_for(path)) < n:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {len(receiver.requests_for(path))} delivered")
            time.sleep(0.05)
        while WebhookDelivery.objects.filter(status="pending", url__endswith=path).exists():
            time.sleep(0.05)
        return receiver.requests_for(path)

    def rate(got: list) -> float:
        span = got[-1].at - got[0].at
        return (len(got) - 1) / span if span > 0 else float("nan")

    with processes(executor_command(), env=env, log_dir=tmp):
        time.sleep(4)  # executor start-up

        # 1. A backlog of due deliveries, written at once.
        path = "/bench/backlog"
        now = timezone.now()
        runs = Run.objects.bulk_create(
            [
                Run(
                    owner_id=key.owner_id,
                    chain=chain,
                    status=RunStatus.COMPLETED,
                    started_at=now,
                    finished_at=now,
                    last_seq=2,
                    webhook_url=f"{receiver.base_url}{path}",
                    webhook_secret=secret,
                    webhook_events=["run.completed"],
                )
                for _ in range(args.deliveries)
            ]
        )
        with transaction.atomic():
            messages = WebhookMessage.objects.bulk_create(
                [
                    WebhookMessage(
                        id=WebhookMessage.new_id(),
                        run=r,
                        event_type="run.completed",
                        seq=2,
                        payload={"type": "run.completed", "data": {"run_id": str(r.id)}},
                        created_at=now,
                    )
                    for r in runs
                ]
            )
            WebhookDelivery.objects.bulk_create(
                [
                    WebhookDelivery(message=m, url=runs[0].webhook_url, next_attempt_at=now)
                    for m in messages
                ]
            )
        backlog = rate(wait_receipts(path, args.deliveries))

        # 2. Runs with a webhook, queued at once, executed and delivered by the executor.
        path = "/bench/run-ends"
        with transaction.atomic():
            for i in range(args.deliveries):
                run_create(
                    api_key=key,
                    chain=chain,
                    run_input={"topic": f"{i}"},
                    metadata={},
                    webhook=webhook(path),
                )
        run_ends = rate(wait_receipts(path, args.deliveries))

        # 3. Run end -> receipt, one run at a time.
        path = "/bench/latency"
        latencies = []
        for i in range(args.runs + 5):
            before = len(receiver.requests_for(path))
            run = run_create(
                api_key=key, chain=chain, run_input={"topic": f"{i}"}, metadata={},
                webhook=webhook(path),
            )  # fmt: skip
            deadline = time.monotonic() + 30
            while len(receiver.requests_for(path)) == before:
                if time.monotonic() > deadline:
                    raise SystemExit("a delivery did not arrive within 30 s")
                time.sleep(0.0005)
            received = receiver.requests_for(path)[-1].at
            finished = Run.objects.values_list("finished_at", flat=True).get(pk=run.id)
            if i >= 5:  # warm-up
                latencies.append((received - finished.timestamp()) * 1000)
            time.sleep(0.02)
    receiver.shutdown()
    model.shutdown()
    results = {
        "concurrency": settings.WEBHOOK_CONCURRENCY,
        "backlog_per_s": backlog,
        "run_ends_per_s": run_ends,
        "latency_p50_ms": statistics.median(latencies),
        "latency_p95_ms": pct(latencies, 95),
        "latency_p99_ms": pct(latencies, 99),
    }
    write_json(args.json, results)

    print(f"\nwebhook delivery, one executor (WEBHOOK_CONCURRENCY={settings.WEBHOOK_CONCURRENCY}),"
          f" {os.cpu_count()} cores")  # fmt: skip
    print(f"{'metric':<44}{'value':>12}{'target':>12}")
    print(f"{'deliveries/s, a backlog':<44}{backlog:>12.0f}{'300':>12}")
    print(f"{'deliveries/s, runs ending (run + delivery)':<44}{run_ends:>12.0f}{'300':>12}")
    print(f"{'run end -> receipt, median ms':<44}{statistics.median(latencies):>12.1f}")
    print(f"{'run end -> receipt, p95 ms':<44}{pct(latencies, 95):>12.1f}{'< 50':>12}")
    print(f"{'run end -> receipt, p99 ms':<44}{pct(latencies, 99):>12.1f}")
    print(f"{'(' + str(args.runs) + ' runs, one at a time)':<44}")


if __name__ == "__main__":
    main()
