"""The one JSON body parser of every transport: DRF's views, the fast lane and the SSE views.

A body is taken only as the database can hold it and as every reader would read it the same:
no NUL or lone surrogate in a string, no number beyond a double (`1e999` parses to infinity,
which PostgreSQL's json refuses), no NaN or Infinity, no nesting deeper than MAX_DEPTH, and no
object with the same key twice (parsers disagree on which one wins, and the idempotency
fingerprint would take two different bodies for one).
"""

from __future__ import annotations

import json
import math
from typing import Any

from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser
from rest_framework.utils.json import strict_constant

MAX_DEPTH = 64


class BodyError(ParseError):
    """A body refused by strict_loads; `field` is where in it (`input.n`, `items[0]`), or
    `body` for the whole."""

    def __init__(self, detail: str, field: str = "body") -> None:
        super().__init__(detail)
        self.field = field


class _Refused(Exception):
    """A value refused by _check; the frames it leaves add their key to `path` (innermost
    first), so the walk costs nothing for the path until something is refused."""

    def __init__(self, message: str) -> None:
        self.message = message
        self.path: list[str | int] = []


class _Duplicated(dict):
    """An object that had a key twice (`key`), refused by _check where it knows the path."""

    key: str


def _object(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    duplicated = _Duplicated(obj)
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            duplicated.key = key
            break
        seen.add(key)
    return duplicated


_decoder = json.JSONDecoder(parse_constant=strict_constant, object_pairs_hook=_object)


def _check(value: Any, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise BodyError(f"JSON nested deeper than {MAX_DEPTH} levels.")
    if isinstance(value, str):
        if "\x00" in value:
            raise _Refused("Strings may not contain NUL (\\u0000).")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _Refused("Strings may not contain unpaired surrogates.") from None
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise _Refused("Number out of range (beyond a 64-bit float).")
    elif isinstance(value, dict):
        if type(value) is _Duplicated:
            refused = _Refused("Duplicate key: an object may name a key once.")
            refused.path.append(value.key)
            raise refused
        for key, item in value.items():
            _check(key, depth + 1)  # a refused key: the field is the object holding it
            try:
                _check(item, depth + 1)
            except _Refused as exc:
                exc.path.append(key)
                raise
    elif isinstance(value, list):
        for i, item in enumerate(value):
            try:
                _check(item, depth + 1)
            except _Refused as exc:
                exc.path.append(i)
                raise


def _field(path: list[str | int]) -> str:
    """`input.n`, `items[0].input`, as errors name fields elsewhere (agentsvc/errors.py)."""
    name = ""
    for part in reversed(path):
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else part)
    return name or "body"


def strict_loads(raw: bytes) -> Any:
    """A UTF-8 JSON body that the database can hold as it is, or BodyError."""
    try:
        data = _decoder.decode(raw.decode("utf-8"))
    except RecursionError:
        raise BodyError(f"JSON nested deeper than {MAX_DEPTH} levels.") from None
    except ValueError as exc:  # UnicodeDecodeError too
        raise BodyError(f"JSON parse error - {exc}") from None
    try:
        _check(data)
    except _Refused as exc:
        raise BodyError(exc.message, _field(exc.path)) from None
    return data


class StrictJSONParser(JSONParser):
    """JSON bodies that the database can hold as they are, or a 400."""

    def parse(self, stream, media_type=None, parser_context=None):
        return strict_loads(stream.read() if stream is not None else b"")
