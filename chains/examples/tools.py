"""Tools the example chains give their agents: plain Python functions, described to the model
by their type hints and docstrings."""

from __future__ import annotations

import datetime
import zoneinfo


def local_time(timezone: str) -> str:
    """The current date and time in a time zone.

    Args:
        timezone: an IANA time zone name, such as Europe/Paris
    """
    try:
        zone = zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return f"unknown time zone {timezone!r}"
    return datetime.datetime.now(zone).strftime("%A %d %B %Y, %H:%M")


def word_count(text: str) -> int:
    """How many words a text has.

    Args:
        text: the text to count
    """
    return len(text.split())
