"""The tool the tool benchmarks' chains call (a plain sync function, as a chain owner writes)."""

from __future__ import annotations


def lookup(topic: str, limit: int = 3) -> dict:
    """Look a topic up.

    Args:
        topic: what to look up
        limit: how many facts
    """
    return {"topic": topic, "facts": [f"{topic} {i}" for i in range(limit)]}
