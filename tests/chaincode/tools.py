"""Tools for the tests' chains."""

from __future__ import annotations

import asyncio
import time


def lookup(topic: str, limit: int = 3) -> dict:
    """Look a topic up in the almanac.

    Args:
        topic: what to look up
        limit: how many facts to give
    """
    return {"topic": topic, "facts": [f"{topic} fact {i}" for i in range(limit)]}


async def weather(city: str) -> str:
    """The weather in a city, today."""
    await asyncio.sleep(0)
    return f"sunny in {city}"


def explode(topic: str) -> str:
    """A tool that always fails."""
    raise RuntimeError(f"no almanac entry for {topic}")


def block(topic: str) -> str:
    """A tool that blocks its thread for 5 seconds (a slow sync client)."""
    time.sleep(5)
    return f"slowly found {topic}"


def huge(topic: str) -> str:
    """A tool whose output is far too long."""
    return topic * 100_000


def untyped(topic):
    """A tool without type hints: any JSON value is taken."""
    return f"untyped {topic}"


SENT: list[str] = []


def send_email(to: str, subject: str = "hello") -> str:
    """Send an email (a tool that acts: the tests' chains ask a person first).

    Args:
        to: the address
        subject: the subject line
    """
    SENT.append(to)
    return f"sent to {to}"
