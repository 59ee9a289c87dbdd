from __future__ import annotations

from runs import engine, keeper


def run_execute(run_id: str) -> None:
    engine.run_execute(run_id=run_id)


def keeper_pass() -> dict[str, int]:
    """Scheduled every minute (runs/migrations/0004_keeper_schedule.py)."""
    return keeper.keeper_pass()
