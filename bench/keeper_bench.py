"""Keeper benchmark: the cost of a quiet keeper pass, retention's delete rate, and marking a run
seen (the write on GET /runs/{id}, the events page and streams).

Needs PostgreSQL. Reproduce with:
    .venv/bin/python bench/keeper_bench.py --active 2000 --expired 5000 --events 20
It drops and recreates the database BENCH_DATABASE_URL (default agentsvc_bench).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import DATABASE_URL, REDIS_URL, pct, reset_database

ENV = dict(
    DATABASE_URL=DATABASE_URL,
    REDIS_URL=REDIS_URL,
    SECRET_KEY="bench",
    LOG_LEVEL="WARNING",
    DJANGO_SETTINGS_MODULE="agentsvc.settings",
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--active", type=int, default=2000, help="active runs needing nothing")
    parser.add_argument("--expired", type=int, default=5000, help="runs past retention")
    parser.add_argument("--events", type=int, default=20, help="events per expired run")
    args = parser.parse_args()
    reset_database(ENV)
    os.environ.update(ENV)
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection
    from django.utils import timezone

    from agentsvc.services import api_key_create
    from runs import keeper
    from runs.chains import chain_publish
    from runs.models import Run, RunEvent, RunStatus
    from runs.seen import _touched, run_seen
    from webhooks.models import WebhookAttempt, WebhookDelivery, WebhookMessage

    call_command("migrate", verbosity=0)
    key, _ = api_key_create(owner_name="bench", name="bench")
    chain, _ = chain_publish(
        definition={
            "name": "bench",
            "agents": [{"name": "a", "provider": "local", "model": "m", "prompt": "x"}],
        }
    )
    now = timezone.now()
    common = {"owner_id": key.owner_id, "api_key": key, "chain": chain, "input": {"topic": "x"}}
    Run.objects.bulk_create(
        [
            Run(
                status=RunStatus.RUNNING,
                worker="w",
                heartbeat_at=now,
                deadline_at=now + timedelta(hours=1),
                last_seen_at=now,
                **common,
            )
            for _ in range(args.active)
        ],
        batch_size=1000,
    )
    old = now - timedelta(days=40)
    expired = [
        Run(
            id=uuid.uuid4(), status=RunStatus.COMPLETED, finished_at=old, output="y" * 500, **common
        )
        for _ in range(args.expired)
    ]
    Run.objects.bulk_create(expired, batch_size=1000)
    RunEvent.objects.bulk_create(
        [
            RunEvent(run=r, seq=s, type="agent.output", data={"chunk": "z" * 100}, created_at=old)
            for r in expired
            for s in range(1, args.events + 1)
        ],
        batch_size=5000,
    )
    messages = WebhookMessage.objects.bulk_create(
        [
            WebhookMessage(
                id=WebhookMessage.new_id(),
                run=r,
                event_type="run.completed",
                seq=args.events,
                payload={"p": 1},
                created_at=old,
            )
            for r in expired
        ],
        batch_size=1000,
    )
    deliveries = WebhookDelivery.objects.bulk_create(
        [WebhookDelivery(message=m, url="https://x.example", status="succeeded") for m in messages],
        batch_size=1000,
    )
    WebhookAttempt.objects.bulk_create(
        [
            WebhookAttempt(delivery=d, number=1, at=old, duration_ms=1, trigger="auto")
            for d in deliveries
        ],
        batch_size=1000,
    )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")

    # 1. Retention: passes until everything expired is gone.
    started = time.perf_counter()
    deleted = 0
    passes = 0
    while True:
        n = keeper.runs_delete_expired()
        passes += 1
        deleted += n
        if not n:
            break
    delete_s = time.perf_counter() - started
    assert deleted == args.expired and not RunEvent.objects.filter(created_at=old).exists()

    # 2. A quiet pass over the active runs (nothing to do): the steady-state cost per minute.
    quiet = []
    for _ in range(20):
        t = time.perf_counter()
        done = keeper.keeper_pass()
        quiet.append((time.perf_counter() - t) * 1000)
        assert not any(done.values()), done

    # 3. Marking seen: a write (first touch), and the skip (within the resolution).
    ids = list(Run.objects.filter(status=RunStatus.RUNNING).values_list("id", flat=True)[:500])
    Run.objects.filter(pk__in=ids).update(last_seen_at=None)
    _touched.clear()
    writes, skips = [], []
    for run_id in ids:
        t = time.perf_counter()
        assert run_seen(run_id=run_id, status=RunStatus.RUNNING)
        writes.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        assert not run_seen(run_id=run_id, status=RunStatus.RUNNING)
        skips.append((time.perf_counter() - t) * 1000)

    print(f"\nkeeper benchmark ({os.cpu_count()} cores, PostgreSQL)\n")
    print("| measure | result |")
    print("|---|---|")
    print(
        f"| retention: {args.expired} runs x {args.events} events + message/delivery/attempt "
        f"| {delete_s:.1f} s in {passes} passes, {args.expired / delete_s:.0f} runs/s |"
    )
    print(
        f"| quiet keeper pass over {args.active} active runs, median / p99 "
        f"| {statistics.median(quiet):.1f} ms / {pct(quiet, 99):.1f} ms |"
    )
    print(
        f"| mark seen, write (conditional UPDATE), median / p99 "
        f"| {statistics.median(writes):.2f} ms / {pct(writes, 99):.2f} ms |"
    )
    print(
        f"| mark seen, skipped (within 5 s), median / p99 "
        f"| {statistics.median(skips) * 1000:.1f} µs / {pct(skips, 99) * 1000:.1f} µs |"
    )


if __name__ == "__main__":
    main()
