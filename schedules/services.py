"""Writes on schedules: create, pause, resume, delete, and the tick that starts a run."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any
from uuid import UUID

from django.db import InterfaceError, OperationalError, transaction
from django.http import Http404
from django.utils import timezone

from agentsvc.errors import ApplicationError
from agentsvc.models import ApiKey
from runs import selectors as run_selectors
from runs.api import chain_not_found
from runs.chains import chain_validate_input
from runs.models import Chain
from runs.services import run_create
from schedules.models import Schedule
from schedules.timing import cron_next, interval_next

logger = logging.getLogger(__name__)

DUE_BATCH = 100  # ticks one clock pass fires; the next pass (SCHEDULE_POLL_S later) takes the rest


def chain_for(name: str, version: int | None) -> Chain:
    """The chain version a schedule (or its tick) runs; 404 `not_found` naming it, as on run
    create."""
    try:
        return run_selectors.chain_get(name=name, version=version)
    except Http404:
        raise chain_not_found(name, version) from None


def _first_tick(*, cron: str, tz: str, interval_s: int | None, now: datetime) -> datetime:
    if cron:
        return cron_next(cron, tz, now)
    assert interval_s is not None
    return interval_next(interval_s, now, now)


def _next_tick(schedule: Schedule, *, due: datetime, now: datetime) -> datetime:
    """The tick after the one due at `due`, fired at `now`: the first one later than now, so
    ticks missed while nothing ran are not made up."""
    if schedule.cron:
        return cron_next(schedule.cron, schedule.timezone, now)
    assert schedule.interval_s is not None
    return interval_next(schedule.interval_s, due, now)


def schedule_create(
    *,
    api_key: ApiKey,
    chain_name: str,
    version: int | None,
    cron: str,
    tz: str,
    interval_s: int | None,
    run_input: Any,
    metadata: dict,
    webhook: dict | None,
) -> Schedule:
    """A schedule whose ticks start runs with `api_key`; the input is checked against the
    chain's input schema now (400 naming the field), and again by each tick's run."""
    chain = chain_for(chain_name, version)
    chain_validate_input(chain=chain, data=run_input)
    webhook = webhook or {}
    now = timezone.now()
    return Schedule.objects.create(
        owner_id=api_key.owner_id,
        api_key=api_key,
        chain=chain.name,
        version=version,
        cron=cron,
        timezone=tz if cron else "",
        interval_s=interval_s,
        input=run_input,
        metadata=metadata,
        webhook_url=webhook.get("url", ""),
        webhook_secret=webhook.get("secret", ""),
        webhook_events=webhook.get("events", []),
        next_run_at=_first_tick(cron=cron, tz=tz, interval_s=interval_s, now=now),
    )


def schedule_pause(*, schedule: Schedule) -> Schedule:
    """No tick until resumed (a tick being fired now finishes first: it holds the row)."""
    Schedule.objects.filter(pk=schedule.pk, paused=False).update(
        paused=True, next_run_at=None, updated_at=timezone.now()
    )
    schedule.refresh_from_db()
    return schedule


def schedule_resume(*, schedule: Schedule) -> Schedule:
    """Ticks again from now on: the ones that fell while paused are not made up."""
    now = timezone.now()
    next_at = _first_tick(
        cron=schedule.cron, tz=schedule.timezone, interval_s=schedule.interval_s, now=now
    )
    Schedule.objects.filter(pk=schedule.pk, paused=True).update(
        paused=False, next_run_at=next_at, updated_at=now
    )
    schedule.refresh_from_db()
    return schedule


def schedule_delete(*, schedule: Schedule) -> None:
    """Its runs stay, and still list by its id (GET /runs?schedule=)."""
    Schedule.objects.filter(pk=schedule.pk).delete()


def _tick_run(schedule: Schedule) -> UUID:
    """The tick's run, through the API's run_create: the same checks and limits. A refusal is
    the ApplicationError the API would have answered."""
    key = schedule.api_key
    if key is None or not key.is_active:
        raise ApplicationError(
            "authentication_failed", "The API key that created the schedule is revoked or deleted."
        )
    webhook = None
    if schedule.webhook_url:
        webhook = {
            "url": schedule.webhook_url,
            "secret": schedule.webhook_secret,
            "events": schedule.webhook_events,
        }
    run = run_create(
        api_key=key,
        chain=chain_for(schedule.chain, schedule.version),
        run_input=schedule.input,
        metadata=schedule.metadata,
        webhook=webhook,
        schedule_id=schedule.pk,
    )
    return run.id


def schedule_tick(*, schedule_id: UUID, due: datetime, now: datetime | None = None) -> str:
    """Fire the tick due at `due`, if it is still due and nobody else fired it: "started" (a run
    was created), "refused" (the run was not; recorded on the schedule) or "taken".

    The claim, moving next_run_at on from `due`, and the run are one transaction: a peer that
    claims at the same instant waits for the row, finds next_run_at moved and does nothing; a
    process that dies mid-tick leaves the tick due. A refused tick is recorded and not tried
    again: the next one is."""
    now = now or timezone.now()
    schedule = (
        Schedule.objects.select_related("api_key")
        .filter(pk=schedule_id, paused=False, next_run_at=due)
        .first()
    )
    if schedule is None:
        return "taken"
    next_at = _next_tick(schedule, due=due, now=now)
    with transaction.atomic():
        claimed = Schedule.objects.filter(pk=schedule_id, paused=False, next_run_at=due).update(
            next_run_at=next_at, updated_at=now
        )
        if not claimed:
            return "taken"
        try:
            with transaction.atomic():
                run_id = _tick_run(schedule)
        except ApplicationError as e:
            Schedule.objects.filter(pk=schedule_id).update(
                last_error_code=e.code, last_error=(e.detail or e.code)[:500], last_error_at=now
            )
            logger.info("schedule %s: tick refused (%s): %s", schedule_id, e.code, e.detail)
            return "refused"
        except (OperationalError, InterfaceError):
            raise  # the database: nothing is written, the tick stays due
        except Exception:
            logger.exception("schedule %s: tick failed", schedule_id)
            Schedule.objects.filter(pk=schedule_id).update(
                last_error_code="server_error",
                last_error="The run could not be started; the error was logged.",
                last_error_at=now,
            )
            return "refused"
        Schedule.objects.filter(pk=schedule_id).update(
            last_run_at=now,
            last_run_id=run_id,
            last_error_code="",
            last_error="",
            last_error_at=None,
        )
    return "started"


def schedules_fire_due(*, now: datetime | None = None) -> dict[str, int]:
    """One pass of the clock: fire every tick due by `now`, soonest first (schedule_due_idx)."""
    now = now or timezone.now()
    due = Schedule.objects.filter(paused=False, next_run_at__lte=now).order_by("next_run_at")
    done = {"started": 0, "refused": 0, "taken": 0}
    for schedule_id, due_at in due.values_list("id", "next_run_at")[:DUE_BATCH]:
        done[schedule_tick(schedule_id=schedule_id, due=due_at, now=now)] += 1
    return done
