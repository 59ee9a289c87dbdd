"""Prometheus metrics.

Run and webhook figures are read from the database at scrape time, so every web process reports
the same values whichever executor did the work: counters from totals tables that only go up
(written with each run's end and each attempt), gauges from the current rows. What only a web
process sees (HTTP latency, rejections, open streams) is counted in that process: scrape every
web process as an instance of its own and sum those across instances (README, Operations)."""

from __future__ import annotations

from datetime import timedelta

from django.db.models import Q
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

REGISTRY = CollectorRegistry()
REJECTIONS = Counter(
    "agentsvc_rejections", "Requests refused by a limit, by reason", ["reason"], registry=REGISTRY
)
HTTP_DURATION = Histogram(
    "agentsvc_http_request_duration_seconds",
    "HTTP requests served by this process, by method, URL pattern and status",
    ["method", "route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
ATTEMPT_OUTCOMES = ("succeeded", "http_error", "error", "blocked")


def rejection(reason: str) -> None:
    REJECTIONS.labels(reason=reason).inc()


def http_request(*, method: str, route: str, status: int, seconds: float) -> None:
    HTTP_DURATION.labels(method=method, route=route, status=str(status)).observe(seconds)


class RunsCollector:
    """Counters from the totals written with each run's end (runs/totals.py), which retention
    never lowers; gauges (queued, running, queue age, executors) from the current rows."""

    def collect(self):
        from django.conf import settings
        from django.db.models import Count, Min, Sum
        from django.utils import timezone

        from runs.models import ACTIVE_STATUSES, Executor, Run, RunStatus, RunTotal
        from runs.totals import DURATION_BUCKETS_S, bucket_label

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


class WebhooksCollector:
    """Attempts by outcome from the totals written with each attempt (webhooks/recording.py);
    the backlog from the pending deliveries."""

    def collect(self):
        from django.db.models import Count, Min
        from django.utils import timezone

        from webhooks.models import AttemptTotal, DeliveryStatus, WebhookDelivery

        counts = dict(AttemptTotal.objects.values_list("outcome", "attempts"))
        family = CounterMetricFamily(
            "agentsvc_webhook_attempts", "Webhook delivery attempts by outcome", labels=["outcome"]
        )
        for name in ATTEMPT_OUTCOMES:
            family.add_metric([name], counts.get(name, 0))
        yield family
        now = timezone.now()
        pending = WebhookDelivery.objects.filter(status=DeliveryStatus.PENDING).aggregate(
            n=Count("id"),
            due=Count("id", filter=Q(next_attempt_at__lte=now)),
            oldest=Min("next_attempt_at", filter=Q(next_attempt_at__lte=now)),
        )
        yield GaugeMetricFamily(
            "agentsvc_webhook_deliveries_pending",
            "Deliveries not yet succeeded or failed (waiting for a retry or under way)",
            value=pending["n"],
        )
        yield GaugeMetricFamily(
            "agentsvc_webhook_deliveries_due",
            "Pending deliveries whose attempt is due now (the backlog)",
            value=pending["due"],
        )
        yield GaugeMetricFamily(
            "agentsvc_webhook_oldest_due_age_seconds",
            "How long the oldest due delivery has waited (0: none due)",
            value=(now - pending["oldest"]).total_seconds() if pending["oldest"] else 0,
        )


class StreamsCollector:
    def collect(self):
        from runs.stream_limits import open_streams_here

        yield GaugeMetricFamily(
            "agentsvc_open_streams",
            "SSE and WebSocket streams open in this process",
            value=open_streams_here(),
        )


REGISTRY.register(RunsCollector())
REGISTRY.register(WebhooksCollector())
REGISTRY.register(StreamsCollector())


def metrics_text() -> bytes:
    return generate_latest(REGISTRY)


def attempt_outcome(*, status_code: int | None, error: str) -> str:
    """The outcome label of an attempt."""
    if status_code is not None and 200 <= status_code < 300:
        return "succeeded"
    if error == "blocked_address":
        return "blocked"
    if status_code is None:
        return "error"
    return "http_error"
