"""Metrics that add up: counters of runs and attempts that retention never lowers, gauges of
what goes up and down, HTTP latency by URL pattern."""

from __future__ import annotations

from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from runs.models import Run, RunTotal
from runs.services import Append, events_write, run_create
from tests.test_health import metric
from tests.webhook_support import SECRET, deliver_all, finished_run, hook_path
from webhooks.models import WebhookAttempt


def scrape() -> str:
    return Client().get("/metrics").content.decode()


def test_counters_do_not_fall_when_retention_deletes_runs(alice, make_chain, receiver, local_ok):
    completed = 'agentsvc_runs_finished_total{chain="demo",status="completed"}'
    slow = 'agentsvc_run_duration_seconds_bucket{chain="demo",le="600"}'
    count = 'agentsvc_run_duration_seconds_count{chain="demo"}'
    names = (
        completed,
        slow,
        count,
        'agentsvc_tokens_total{kind="output"}',
        'agentsvc_webhook_attempts_total{outcome="succeeded"}',
    )
    before = scrape()
    run = finished_run(
        alice, make_chain, webhook={"url": receiver.base_url + hook_path(), "secret": SECRET}
    )
    deliver_all()
    after = scrape()
    assert metric(after, completed) == metric(before, completed) + 1
    assert metric(after, slow) == metric(before, slow) + 1
    assert metric(after, count) == metric(before, count) + 1
    assert metric(after, names[3]) == metric(before, names[3]) + run.output_tokens
    assert metric(after, names[4]) == metric(before, names[4]) + 1
    # Retention deletes the run, its events, messages and attempts: the counters stay.
    Run.objects.filter(pk=run.pk).delete()
    assert not WebhookAttempt.objects.exists()
    retained = scrape()
    for name in names:
        assert metric(retained, name) == metric(after, name), name


def test_runs_ending_in_one_flush_are_counted_in_one_statement(alice, make_chain):
    chain = make_chain("demo")
    runs = [
        run_create(api_key=alice.key, chain=chain, run_input={"topic": "x"}, metadata={})
        for _ in range(3)
    ]
    cancelled = 'agentsvc_runs_finished_total{chain="demo",status="cancelled"}'
    before = scrape()
    now = timezone.now()
    appends = [
        Append(
            run.id,
            [("run.cancelled", {"reason": "api"}, now)],
            {"status": "cancelled", "finished_at": now},
        )
        for run in runs
    ]
    with CaptureQueriesContext(connection) as queries:
        events_write(appends=appends)
    totals = [q["sql"] for q in queries if RunTotal._meta.db_table in q["sql"]]
    assert len(totals) == 1, totals
    after = scrape()
    assert metric(after, cancelled) == metric(before, cancelled) + 3
    # Never started: no duration to count.
    duration = 'agentsvc_run_duration_seconds_count{chain="demo"}'
    assert metric(after, duration) == metric(before, duration)


def test_gauges_follow_the_queue(alice, make_chain):
    make_chain("demo")
    assert metric(scrape(), "agentsvc_queue_depth") == 0
    assert metric(scrape(), "agentsvc_queue_oldest_age_seconds") == 0
    alice.post("/api/v1/chains/demo/runs", {"input": {"topic": "x"}})
    Run.objects.update(created_at=timezone.now() - timezone.timedelta(seconds=90))
    text = scrape()
    assert metric(text, "agentsvc_queue_depth") == 1
    assert metric(text, "agentsvc_runs_active") == 1
    assert metric(text, "agentsvc_runs_running") == 0
    assert 90 <= metric(text, "agentsvc_queue_oldest_age_seconds") < 120
    assert "agentsvc_executors_alive " in text
    assert "agentsvc_webhook_deliveries_due " in text


def test_http_latency_by_url_pattern(alice, make_chain):
    make_chain("demo")
    run_id = alice.post("/api/v1/chains/demo/runs", {"input": {"topic": "x"}}).json()["run_id"]
    series = (
        'agentsvc_http_request_duration_seconds_count{method="GET",'
        'route="api/v1/runs/<uuid:run_id>",status="200"}'
    )
    missing = (
        'agentsvc_http_request_duration_seconds_count{method="GET",route="unmatched",status="404"}'
    )
    before = scrape()
    alice.get(f"/api/v1/runs/{run_id}")
    alice.get(f"/api/v1/runs/{run_id}")
    Client().get("/no/such/page")
    after = scrape()
    assert metric(after, series) == metric(before, series) + 2
    assert metric(after, missing) == metric(before, missing) + 1
    assert str(run_id) not in after  # the pattern, never the path
