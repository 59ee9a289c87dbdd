"""Prometheus metrics. Run and webhook figures are read from the database at scrape time, so
every web process reports the same totals whichever worker did the work; what only a web process
sees (rejections, open streams) is counted in that process."""

from __future__ import annotations

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
DURATION_BUCKETS_S = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)


def rejection(reason: str) -> None:
    REJECTIONS.labels(reason=reason).inc()


def http_request(*, method: str, route: str, status: int, seconds: float) -> None:
    HTTP_DURATION.labels(method=method, route=route, status=str(status)).observe(seconds)


class RunsCollector:
    def collect(self):
        from django.db.models import Count, DurationField, ExpressionWrapper, F, Q, Sum

        from runs.models import Run, RunStatus

        by_status = {
            row["status"]: row
            for row in Run.objects.values("status").annotate(
                n=Count("id"), tin=Sum("input_tokens"), tout=Sum("output_tokens"), cost=Sum("cost")
            )
        }
        runs = CounterMetricFamily("agentsvc_runs", "Runs by status", labels=["status"])
        for status in RunStatus.values:
            runs.add_metric([status], by_status.get(status, {}).get("n", 0))
        yield runs
        yield GaugeMetricFamily(
            "agentsvc_queue_depth",
            "Runs waiting for a worker",
            value=by_status.get(RunStatus.QUEUED, {}).get("n", 0),
        )
        yield GaugeMetricFamily(
            "agentsvc_runs_active",
            "Runs queued or running",
            value=sum(
                by_status.get(s, {}).get("n", 0) for s in (RunStatus.QUEUED, RunStatus.RUNNING)
            ),
        )
        tokens = CounterMetricFamily("agentsvc_tokens", "Model tokens used", labels=["kind"])
        tokens.add_metric(["input"], sum(r["tin"] or 0 for r in by_status.values()))
        tokens.add_metric(["output"], sum(r["tout"] or 0 for r in by_status.values()))
        yield tokens
        yield CounterMetricFamily(
            "agentsvc_cost_usd",
            "Model cost in USD",
            value=float(sum(r["cost"] or 0 for r in by_status.values())),
        )

        duration = ExpressionWrapper(
            F("finished_at") - F("started_at"), output_field=DurationField()
        )
        from datetime import timedelta

        aggregates = {
            f"le{i}": Count("id", filter=Q(d__lte=timedelta(seconds=b)))
            for i, b in enumerate(DURATION_BUCKETS_S)
        }
        finished = (
            Run.objects.filter(started_at__isnull=False, finished_at__isnull=False)
            .annotate(d=duration)
            .aggregate(n=Count("id"), total=Sum("d"), **aggregates)
        )
        buckets = [(str(b), finished[f"le{i}"]) for i, b in enumerate(DURATION_BUCKETS_S)]
        buckets.append(("+Inf", finished["n"]))
        total = finished["total"]
        yield HistogramMetricFamily(
            "agentsvc_run_duration_seconds",
            "Run duration, start to end",
            buckets=buckets,
            sum_value=total.total_seconds() if isinstance(total, timedelta) else (total or 0) / 1e6,
        )


class WebhooksCollector:
    def collect(self):
        from django.db.models import Case, CharField, Count, Value, When

        from webhooks.models import WebhookAttempt

        outcome = Case(
            When(status_code__gte=200, status_code__lt=300, then=Value("succeeded")),
            When(error="blocked_address", then=Value("blocked")),
            When(status_code__isnull=True, then=Value("error")),
            default=Value("http_error"),
            output_field=CharField(),
        )
        counts = dict(
            WebhookAttempt.objects.annotate(outcome=outcome)
            .values_list("outcome")
            .annotate(n=Count("id"))
            .values_list("outcome", "n")
        )
        family = CounterMetricFamily(
            "agentsvc_webhook_attempts", "Webhook delivery attempts by outcome", labels=["outcome"]
        )
        for name in ("succeeded", "http_error", "error", "blocked"):
            family.add_metric([name], counts.get(name, 0))
        yield family


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
