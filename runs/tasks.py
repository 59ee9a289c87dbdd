from __future__ import annotations

from runs import engine


def run_execute(run_id: str) -> None:
    engine.run_execute(run_id=run_id)
