"""Run events in one place: their names, which ones end a run and with what status, which ones
the status feed shows, and the hooks other apps register to act on a run's end.

Webhooks subscribe here (webhooks/apps.py) instead of runs importing them: `runs` knows nothing
of who listens.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from uuid import UUID

RUN_QUEUED = "run.queued"
RUN_STARTED = "run.started"
AGENT_STARTED = "agent.started"
AGENT_OUTPUT = "agent.output"
AGENT_TOOL_CALL = "agent.tool_call"
AGENT_TOOL_RESULT = "agent.tool_result"
AGENT_COMPLETED = "agent.completed"
RUN_PROGRESS = "run.progress"
RUN_RESUMED = "run.resumed"
RUN_COMPLETED = "run.completed"
RUN_FAILED = "run.failed"
RUN_CANCELLED = "run.cancelled"
RUN_TIMED_OUT = "run.timed_out"

# Every event a run's log may hold, in the order a run goes through them.
EVENT_NAMES = (
    RUN_QUEUED,
    RUN_STARTED,
    AGENT_STARTED,
    AGENT_OUTPUT,
    AGENT_TOOL_CALL,
    AGENT_TOOL_RESULT,
    AGENT_COMPLETED,
    RUN_PROGRESS,
    RUN_RESUMED,
    RUN_COMPLETED,
    RUN_FAILED,
    RUN_CANCELLED,
    RUN_TIMED_OUT,
)

# The events that end a run, in the order webhook filters list them, and the status each sets.
TERMINAL_EVENTS = (RUN_COMPLETED, RUN_FAILED, RUN_CANCELLED, RUN_TIMED_OUT)
STATUS_OF = {
    RUN_COMPLETED: "completed",
    RUN_FAILED: "failed",
    RUN_CANCELLED: "cancelled",
    RUN_TIMED_OUT: "timed_out",
}
# Events that change what the status feed shows (status or progress).
FEED_EVENTS = frozenset({RUN_QUEUED, RUN_STARTED, AGENT_STARTED, AGENT_COMPLETED, *TERMINAL_EVENTS})


def event_filter_parse(raw: str | None) -> frozenset[str] | None:
    """`?events=agent.output,run.completed`: the names a reader wants, or None for every event.
    Raises ValueError with the message a caller sees on a name that is not an event."""
    if raw is None:
        return None
    names = [name.strip() for name in raw.split(",")]
    if not any(names):
        raise ValueError("Give one or more comma-separated event names.")
    for name in names:
        if name not in EVENT_NAMES:
            shown = name if len(name) <= 64 else name[:64] + "…"
            raise ValueError(f"{shown!r} is not an event; events are {', '.join(EVENT_NAMES)}.")
    return frozenset(names)


# Called inside the transaction that writes terminal events, once for all of them:
# fn(ended=[(run_id, event, seq, at), ...]).
Ended = list[tuple[UUID, str, int, datetime]]
TerminalHook = Callable[..., None]
_terminal_hooks: list[TerminalHook] = []
# Asked whether an owner will hear of a run's end without anybody polling: fn(owner_ids) ->
# the owners of those that will (the keeper does not cancel their unwatched runs).
WatchedHook = Callable[[set[int]], set[int]]
_watched_hooks: list[WatchedHook] = []


def on_terminal(hook: TerminalHook) -> None:
    if hook not in _terminal_hooks:
        _terminal_hooks.append(hook)


def on_owners_watched(hook: WatchedHook) -> None:
    if hook not in _watched_hooks:
        _watched_hooks.append(hook)


def terminal_hooks_call(*, ended: Ended) -> None:
    for hook in _terminal_hooks:
        hook(ended=ended)


def owners_watched(owner_ids: set[int]) -> set[int]:
    watched: set[int] = set()
    for hook in _watched_hooks:
        watched |= hook(owner_ids)
    return watched
