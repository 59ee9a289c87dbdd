from __future__ import annotations

from runs import keeper


def keeper_pass() -> dict[str, int]:
    """Scheduled every minute (runs/migrations/0004_keeper_schedule.py)."""
    return keeper.keeper_pass()
