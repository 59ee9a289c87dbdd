"""Prometheus metrics.

Run and webhook figures are read from the database at scrape time, so every web process reports
the same values whichever executor did the work: counters from totals tables that only go up
(written with each run's end and each attempt), gauges from the current rows. What only a web
process sees (HTTP latency, rejections, open streams) is counted in that process: scrape every
web process as an instance of its own and sum those across instances (docs/operations.md).
The apps register the collectors of their own figures on REGISTRY at start-up."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

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
LANE_CALLS = Counter(
    "agentsvc_lane_calls",
    "Calls on a fast-lane route: answered on the lane, or declined and answered by Django",
    ["route", "outcome"],
    registry=REGISTRY,
)
LANE_STARTS = Counter(
    "agentsvc_lane_run_starts",
    "Run starts the fast lane wrote: alone, or grouped with others of the same key in one "
    "statement",
    ["statement"],
    registry=REGISTRY,
)
ATTEMPT_OUTCOMES = ("succeeded", "http_error", "error", "blocked")


def rejection(reason: str) -> None:
    REJECTIONS.labels(reason=reason).inc()


def http_request(*, method: str, route: str, status: int, seconds: float) -> None:
    HTTP_DURATION.labels(method=method, route=route, status=str(status)).observe(seconds)


def lane_call(*, route: str, answered: bool) -> None:
    LANE_CALLS.labels(route=route, outcome="answered" if answered else "declined").inc()


def lane_starts(*, count: int) -> None:
    LANE_STARTS.labels(statement="grouped" if count > 1 else "alone").inc(count)


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
