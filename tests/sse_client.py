"""A small SSE reader over httpx for tests and the benchmark (the wire format of docs/api.md 5)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class Frame:
    id: int | None = None
    event: str | None = None
    data: dict | None = None
    comments: list[str] = field(default_factory=list)
    retry: int | None = None


def parse_lines(lines: Iterator[str]) -> Iterator[Frame]:
    """Frames as the server sent them: events, and comment-only or retry-only blocks."""
    frame = Frame()
    data_lines: list[str] = []
    dirty = False
    for line in lines:
        if line == "":
            if dirty:
                if data_lines:
                    frame.data = json.loads("\n".join(data_lines))
                yield frame
            frame, data_lines, dirty = Frame(), [], False
            continue
        dirty = True
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "":
            frame.comments.append(value)
        elif name == "id":
            frame.id = int(value)
        elif name == "event":
            frame.event = value
        elif name == "data":
            data_lines.append(value)
        elif name == "retry":
            frame.retry = int(value)


def events(lines: Iterator[str]) -> Iterator[Frame]:
    return (f for f in parse_lines(lines) if f.event is not None)
