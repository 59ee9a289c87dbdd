"""Webhook delivery benchmark: deliveries/s one worker sustains, and completion-to-receipt latency.

Needs PostgreSQL and Redis (the production configuration). Reproduce with:
    .venv/bin/python bench/webhook_bench.py --workers 1 --deliveries 2000 --runs 200
It recreates the database BENCH_DATABASE_URL (default agentsvc_bench), starts a real qcluster
with Q_WORKERS=--workers, and a real receiver (tests/fakes/webhook_receiver.py) on a free port.

1. Throughput: N pending deliveries are enqueued at once (as on commit); the clock runs from the
   first to the last request the receiver gets.
2. Latency: runs end one at a time through `event_append` (the engine's path: the terminal event
   and the webhook messages in one transaction, tasks enqueued on commit); latency is from the
   commit to the receiver reading the request.
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
from bench.common import PY, config_env, exit_on_sigterm, pct, processes, reset_database, write_json


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--deliveries", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--port", type=int, default=0, help="the receiver (default: a free port)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    exit_on_sigterm()
    tmp = Path(tempfile.mkdtemp(prefix="webhook-bench-"))
    env = config_env("production", tmp / "data")
    env.update(WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8", DJANGO_SETTINGS_MODULE="agentsvc.settings")
    reset_database(env)
    os.environ.clear()
    os.environ.update(env)
    import django

    django.setup()
    from django.core.management import call_command
    from django.db.models import Q
    from django.utils import timezone

    from agentsvc.models import ApiKey
    from agentsvc.services import api_key_create
    from runs.chains import chain_publish
    from runs.models import Run, RunStatus
    from runs.services import event_append
    from tests.fakes.webhook_receiver import start_in_thread
    from webhooks.models import WebhookDelivery, WebhookMessage
    from webhooks.services.deliveries import _enqueue, deliveries_sweep

    call_command("migrate", verbosity=0)
    receiver = start_in_thread(port=args.port)
    secret = "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
    key = (
        ApiKey.objects.filter(name="bench").first()
        or api_key_create(owner_name="bench", name="bench")[0]
    )
    chain, _ = chain_publish(
        definition={
            "name": "bench",
            "agents": [{"name": "a", "provider": "local", "model": "m", "prompt": "x"}],
        }
    )

    def make_runs(n: int, path: str) -> list[Run]:
        now = timezone.now()
        return Run.objects.bulk_create(
            [
                Run(
                    owner_id=key.owner_id,
                    chain=chain,
                    status=RunStatus.RUNNING,
                    started_at=now,
                    heartbeat_at=now,
                    last_seq=1,
                    webhook_url=f"{receiver.base_url}{path}",
                    webhook_secret=secret,
                    webhook_events=["run.completed"],
                )
                for _ in range(n)
            ]
        )

    worker_env = dict(env, Q_WORKERS=str(args.workers))
    with processes([PY, "manage.py", "qcluster"], env=worker_env, log_dir=tmp):
        time.sleep(4)  # cluster start-up

        # 1. Throughput: one task per delivery (runs ending one by one), then a backlog.
        def throughput(path: str, backlog: bool) -> float:
            runs = make_runs(args.deliveries, path)
            now = timezone.now()
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
            deliveries = WebhookDelivery.objects.bulk_create(
                [
                    WebhookDelivery(message=m, url=runs[0].webhook_url, next_attempt_at=now)
                    for m in messages
                ]
            )
            if backlog:  # what the sweep does after an outage: batches of WEBHOOK_BATCH_SIZE
                while deliveries_sweep():
                    pass
            else:  # what run ends do: one task each
                for d in deliveries:
                    _enqueue([d.id])
            deadline = time.monotonic() + 300
            while len(receiver.requests_for(path)) < args.deliveries:
                if time.monotonic() > deadline:
                    raise SystemExit(f"only {len(receiver.requests_for(path))} delivered")
                time.sleep(0.05)
            got = receiver.requests_for(path)
            while WebhookDelivery.objects.filter(status="pending", url__endswith=path).exists():
                time.sleep(0.05)
            span = got[-1].at - got[0].at
            return (len(got) - 1) / span if span > 0 else float("nan")

        per_task = throughput("/bench/per-task", backlog=False)
        per_batch = throughput("/bench/backlog", backlog=True)

        # 2. Completion-to-receipt latency, one run ending at a time.
        path = "/bench/latency"
        latencies = []
        for run in make_runs(args.runs, path):
            before = len(receiver.requests_for(path))
            finished = timezone.now()
            event_append(
                run_id=run.id,
                event="run.completed",
                data={"output": "ok"},
                when=Q(status=RunStatus.RUNNING),
                status=RunStatus.COMPLETED,
                finished_at=finished,
                output="ok",
            )
            committed = time.time()
            while len(receiver.requests_for(path)) == before:
                time.sleep(0.0005)
            latencies.append((receiver.requests_for(path)[-1].at - committed) * 1000)
            time.sleep(0.02)
    receiver.shutdown()
    results = {
        "workers": args.workers,
        "per_task_per_s": per_task,
        "backlog_per_s": per_batch,
        "latency_p50_ms": statistics.median(latencies),
        "latency_p95_ms": pct(latencies, 95),
        "latency_p99_ms": pct(latencies, 99),
    }
    write_json(args.json, results)

    print(f"\nwebhook delivery, qcluster Q_WORKERS={args.workers}, {os.cpu_count()} cores")
    print(f"{'metric':<44}{'value':>12}{'target':>12}")
    print(f"{'deliveries/s, one task per run end':<44}{per_task:>12.0f}{'300':>12}")
    print(f"{'deliveries/s, backlog swept in batches':<44}{per_batch:>12.0f}{'300':>12}")
    print(f"{'run completion -> receipt, median ms':<44}{statistics.median(latencies):>12.1f}")
    print(f"{'run completion -> receipt, p95 ms':<44}{pct(latencies, 95):>12.1f}{'< 50':>12}")
    print(f"{'run completion -> receipt, p99 ms':<44}{pct(latencies, 99):>12.1f}")
    print(f"{'(' + str(args.runs) + ' runs, one at a time)':<44}")


if __name__ == "__main__":
    main()
