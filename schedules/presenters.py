"""A schedule as the API shows it: a hand-built dict. The webhook's secret is never shown."""

from __future__ import annotations

from typing import Any

from runs.timefmt import iso
from schedules.models import Schedule


def schedule_dict(schedule: Schedule) -> dict[str, Any]:
    return {
        "schedule_id": str(schedule.id),
        "chain": schedule.chain,
        "version": schedule.version,
        "cron": schedule.cron or None,
        "timezone": schedule.timezone or None,
        "interval_s": schedule.interval_s,
        "input": schedule.input,
        "metadata": schedule.metadata,
        "webhook": (
            {"url": schedule.webhook_url, "events": schedule.webhook_events}
            if schedule.webhook_url
            else None
        ),
        "paused": schedule.paused,
        "next_run_at": iso(schedule.next_run_at),
        "last_run_at": iso(schedule.last_run_at),
        "last_run_id": str(schedule.last_run_id) if schedule.last_run_id else None,
        "last_error": (
            {
                "code": schedule.last_error_code,
                "message": schedule.last_error,
                "at": iso(schedule.last_error_at),
            }
            if schedule.last_error_code
            else None
        ),
        "runs_url": f"/api/v1/runs?schedule={schedule.id}",
        "created_at": iso(schedule.created_at),
    }
