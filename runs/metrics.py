"""The figures of runs on /metrics (agentsvc/metrics.py): registered at start-up (runs/apps.py)."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db.models import Count, Min, Sum
from django.utils import timezone
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from runs.models import ACTIVE_STATUSES, Executor, Run, RunStatus, RunTotal
from runs.stream_limits import open_streams_here
from runs.totals import DURATION_BUCKETS_S, bucket_label


class RunsCollector:
    """Counters from the totals written with each run's end (runs/totals.py), which retention
    never lowers; gauges (queued, running, queue age, executors) from the current rows."""

    def collect(self):
        now = timezone.now()
        active = {
            row["status"]: row
            for row in Run.objects.filter(status__in=ACTIVE_STATUSES)
            .values("status")
            .annotate(n=Count("id"), oldest=Min("created_at"))
        }
        queued = active.get(RunStatus.QUEUED, {})
        yield GaugeMetricFamily(
            "agentsvc_queue_depth", "Runs waiting for an executor", value=queued.get("n", 0)
        )
        oldest = queued.get("oldest")
        yield GaugeMetricFamily(
            "agentsvc_queue_oldest_age_seconds",
            "Age of the oldest queued run (0: none queued)",
            value=(now - oldest).total_seconds() if oldest else 0,
        )
        yield GaugeMetricFamily(
            "agentsvc_runs_running",
            "Runs being executed",
            value=active.get(RunStatus.RUNNING, {}).get("n", 0),
        )
        yield GaugeMetricFamily(
            "agentsvc_runs_active",
            "Runs queued or running",
            value=sum(row["n"] for row in active.values()),
        )
        yield GaugeMetricFamily(
            "agentsvc_runs_waiting_for_input",
            "Runs waiting for a person's answer (input_required)",
            value=Run.objects.filter(status=RunStatus.INPUT_REQUIRED).count(),
        )

        cutoff = now - timedelta(seconds=settings.WORKER_LOST_AFTER_S)
        alive = Executor.objects.filter(heartbeat_at__gte=cutoff).aggregate(
            n=Count("pk"), capacity=Sum("capacity"), in_flight=Sum("in_flight")
        )
        yield GaugeMetricFamily(
            "agentsvc_executors_alive", "Executors with a fresh heartbeat", value=alive["n"]
        )
        yield GaugeMetricFamily(
            "agentsvc_executor_capacity",
            "Runs the live executors may hold at once",
            value=alive["capacity"] or 0,
        )
        yield GaugeMetricFamily(
            "agentsvc_executor_runs_in_flight",
            "Runs the live executors hold (at their last heartbeat)",
            value=alive["in_flight"] or 0,
        )

        rows = list(RunTotal.objects.all())
        finished = CounterMetricFamily(
            "agentsvc_runs_finished", "Runs ended, by chain and status", labels=["chain", "status"]
        )
        by_key: dict[tuple[str, str], int] = {}
        for row in rows:
            by_key[row.chain, row.status] = by_key.get((row.chain, row.status), 0) + row.runs
        for (chain, status), n in sorted(by_key.items()):
            finished.add_metric([chain, status], n)
        yield finished

        duration = HistogramMetricFamily(
            "agentsvc_run_duration_seconds",
            "Duration of ended runs, start to end, by chain (runs that never started: none)",
            labels=["chain"],
        )
        for chain in sorted({row.chain for row in rows}):
            started = [r for r in rows if r.chain == chain and r.le]
            buckets = []
            for bound in DURATION_BUCKETS_S:
                n = sum(r.runs for r in started if r.le != "+Inf" and float(r.le) <= bound)
                buckets.append((bucket_label(bound), n))
            buckets.append(("+Inf", sum(r.runs for r in started)))
            duration.add_metric([chain], buckets, sum(r.duration_s for r in started))
        yield duration

        tokens = CounterMetricFamily("agentsvc_tokens", "Model tokens used", labels=["kind"])
        tokens.add_metric(["input"], sum(r.input_tokens for r in rows))
        tokens.add_metric(["output"], sum(r.output_tokens for r in rows))
        yield tokens
        yield CounterMetricFamily(
            "agentsvc_cost_usd", "Model cost in USD", value=float(sum(r.cost for r in rows))
        )


class StreamsCollector:
    def collect(self):
        yield GaugeMetricFamily(
            "agentsvc_open_streams",
            "SSE and WebSocket streams open in this process",
            value=open_streams_here(),
        )
