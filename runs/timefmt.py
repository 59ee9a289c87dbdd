from __future__ import annotations

from datetime import UTC, datetime, timedelta


def iso(dt: datetime | None) -> str | None:
    """RFC 3339, UTC, milliseconds: 2026-01-02T03:04:05.678Z."""
    if dt is None:
        return None
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def floor_ms(dt: datetime) -> datetime:
    """`dt` cut to the millisecond, as `iso` shows it."""
    return dt.replace(microsecond=dt.microsecond - dt.microsecond % 1000)


def after_ms(dt: datetime) -> datetime:
    """The first instant whose shown time (`iso`) is later than the millisecond `dt` names.

    Timestamps are shown to the millisecond but stored to the microsecond: a filter "after T",
    with T copied from an answer, must not return the object T was copied from."""
    return floor_ms(dt) + timedelta(milliseconds=1)
