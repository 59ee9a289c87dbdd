"""Run events in one place: their names, which ones end a run and with what status, which ones
the status feed shows, and the hooks other apps register to act on a run's end (or on its
request for a person's answer).

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
RUN_INPUT_REQUIRED = "run.input_required"
RUN_INPUT_RECEIVED = "run.input_received"
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
    RUN_INPUT_REQUIRED,
    RUN_INPUT_RECEIVED,
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
# The events a webhook may subscribe to, in the order filters list them: the ends, and a run's
# request for a person's answer (its subscribers are who answers).
SUBSCRIBABLE_EVENTS = (*TERMINAL_EVENTS, RUN_INPUT_REQUIRED)
# Events that change what the status feed shows (status or progress).
FEED_EVENTS = frozenset(
    {RUN_QUEUED, RUN_STARTED, AGENT_STARTED, AGENT_COMPLETED, RUN_INPUT_REQUIRED, *TERMINAL_EVENTS}
)


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


# Called inside the transaction that writes events of the names it registered for, once for all
# of them: fn(events=[(run_id, event, seq, at), ...]).
Written = list[tuple[UUID, str, int, datetime]]
WrittenHook = Callable[..., None]
_written_hooks: list[tuple[WrittenHook, frozenset[str]]] = []
HOOKED_EVENTS: frozenset[str] = frozenset()  # the names any hook registered for
# Asked whether an owner will hear of a run's end without anybody polling: fn(owner_ids) ->
# the owners of those that will (the keeper does not cancel their unwatched runs).
WatchedHook = Callable[[set[int]], set[int]]
_watched_hooks: list[WatchedHook] = []


def on_written(hook: WrittenHook, *, events: tuple[str, ...] = TERMINAL_EVENTS) -> None:
    """Register `hook` for events of these names (the terminal ones by default)."""
    global HOOKED_EVENTS
    if all(hook is not registered for registered, _ in _written_hooks):
        _written_hooks.append((hook, frozenset(events)))
        HOOKED_EVENTS = HOOKED_EVENTS | frozenset(events)


def on_owners_watched(hook: WatchedHook) -> None:
    if hook not in _watched_hooks:
        _watched_hooks.append(hook)


def written_hooks_call(*, events: Written) -> None:
    for hook, names in _written_hooks:
        wanted = [row for row in events if row[1] in names]
        if wanted:
            hook(events=wanted)


def owners_watched(owner_ids: set[int]) -> set[int]:
    watched: set[int] = set()
    for hook in _watched_hooks:
        watched |= hook(owner_ids)
    return watched
