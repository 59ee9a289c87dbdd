"""When a schedule's ticks fall: cron expressions (cronsim) in an IANA time zone (zoneinfo), or
a fixed interval. Each answer is the next tick strictly after a time, so ticks missed while
nothing ran collapse into the one due now."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, available_timezones

from cronsim import CronSim, CronSimError

CRON_FIELDS = "minute hour day-of-month month day-of-week"


class TimingError(ValueError):
    """A cron expression or time zone that cannot be used; the message says why."""


@lru_cache(maxsize=1)
def _zone_names() -> frozenset[str]:
    # "localtime" is this machine's own zone, not a name: a schedule must not move with it.
    return frozenset(available_timezones()) - {"localtime"}


def zone(name: str) -> ZoneInfo:
    """The IANA time zone `name` (Europe/Paris, UTC); anything else is a TimingError."""
    if name not in _zone_names():
        raise TimingError("Not an IANA time zone name (such as Europe/Paris or UTC).")
    return ZoneInfo(name)


def cron_check(expr: str, tz: str) -> str:
    """`expr` with single spaces, when it is five cron fields that match some time."""
    fields = expr.split()
    if len(fields) != 5:
        raise TimingError(f"A cron expression has five fields ({CRON_FIELDS}).")
    normal = " ".join(fields)
    try:
        cron_next(normal, tz, datetime.now(UTC))
    except CronSimError as e:
        raise TimingError(f"Not a valid cron expression: {e}.") from None
    return normal


def cron_next(expr: str, tz: str, after: datetime) -> datetime:
    """The first time after `after` that `expr` matches on the clocks of `tz`, in UTC."""
    try:
        return next(CronSim(expr, after.astimezone(zone(tz)))).astimezone(UTC)
    except StopIteration:
        raise TimingError("The cron expression matches no time in the next 50 years.") from None


def interval_next(interval_s: int, due: datetime, now: datetime) -> datetime:
    """The first tick after `now` of the series `due` + k * interval_s (k >= 1)."""
    step = timedelta(seconds=interval_s)
    periods = max(1, math.floor((now - due) / step) + 1)
    return due + periods * step
