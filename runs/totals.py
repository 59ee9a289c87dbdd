"""Totals of finished runs that only go up: what /metrics turns into counters and histograms.

Counting the runs table at scrape time gave totals that fell whenever retention deleted old
runs, which Prometheus reads as counter resets. Instead, the transaction that writes runs'
terminal events adds them to `RunTotal` (a terminal hook, runs/apps.py), in one statement for
all the runs of a flush: their chain, status, duration bucket, tokens and cost, summed per row.
"""

from __future__ import annotations

from collections.abc import Sequence

from django.db import connection

from runs.events import Written
from runs.models import Chain, Run, RunTotal

DURATION_BUCKETS_S: Sequence[float] = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)


def bucket_label(bound: float) -> str:
    return f"{bound:g}"


def _duration_sql() -> str:
    if connection.vendor == "postgresql":
        return "EXTRACT(EPOCH FROM (r.finished_at - r.started_at))"
    return "(julianday(r.finished_at) - julianday(r.started_at)) * 86400.0"


def _sql(count: int) -> str:
    q = connection.ops.quote_name
    le = " ".join(f"WHEN d <= {b!r} THEN '{bucket_label(b)}'" for b in DURATION_BUCKETS_S)
    totals = q(RunTotal._meta.db_table)
    return (
        f"INSERT INTO {totals} (chain, status, le, runs, duration_s, input_tokens, "
        f"output_tokens, cost) "
        f"SELECT chain, status, CASE WHEN d IS NULL THEN '' {le} ELSE '+Inf' END, "
        f"COUNT(*), COALESCE(SUM(d), 0), SUM(input_tokens), SUM(output_tokens), SUM(cost) "
        f"FROM (SELECT c.name AS chain, r.status AS status, r.input_tokens AS input_tokens, "
        f"r.output_tokens AS output_tokens, r.cost AS cost, {_duration_sql()} AS d "
        f"FROM {q(Run._meta.db_table)} r JOIN {q(Chain._meta.db_table)} c ON c.id = r.chain_id "
        f"WHERE r.id IN ({', '.join(['%s'] * count)})) AS f "
        f"GROUP BY 1, 2, 3 "
        f"ON CONFLICT (chain, status, le) DO UPDATE SET "
        f"runs = {totals}.runs + EXCLUDED.runs, "
        f"duration_s = {totals}.duration_s + EXCLUDED.duration_s, "
        f"input_tokens = {totals}.input_tokens + EXCLUDED.input_tokens, "
        f"output_tokens = {totals}.output_tokens + EXCLUDED.output_tokens, "
        f"cost = {totals}.cost + EXCLUDED.cost"
    )


def run_totals_add(*, events: Written) -> None:
    """The terminal hook: add the runs that just ended (their rows already carry the final
    status, times, tokens and cost) to the totals, in one INSERT … SELECT … ON CONFLICT."""
    if not events:
        return
    pk = Run._meta.pk
    params = [pk.get_db_prep_value(run_id, connection) for run_id, _, _, _ in events]
    with connection.cursor() as cursor:
        cursor.execute(_sql(len(params)), params)
