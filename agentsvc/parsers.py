from __future__ import annotations

from typing import Any

from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser
from rest_framework.utils import json

MAX_DEPTH = 64


def _check(value: Any, depth: int = 0) -> None:
    """Refuse what PostgreSQL cannot store (NUL, lone surrogates) and absurd nesting."""
    if depth > MAX_DEPTH:
        raise ParseError(f"JSON nested deeper than {MAX_DEPTH} levels.")
    if isinstance(value, str):
        if "\x00" in value:
            raise ParseError("Strings may not contain NUL (\\u0000).")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ParseError("Strings may not contain unpaired surrogates.") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check(key, depth + 1)
            _check(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check(item, depth + 1)


def strict_loads(raw: bytes) -> Any:
    """A UTF-8 JSON body that the database can hold as it is (no NaN or Infinity either), or
    ParseError."""
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=json.strict_constant)
    except RecursionError:
        raise ParseError(f"JSON nested deeper than {MAX_DEPTH} levels.") from None
    except ValueError as exc:  # UnicodeDecodeError too
        raise ParseError(f"JSON parse error - {exc}") from None
    _check(data)
    return data


class StrictJSONParser(JSONParser):
    """JSON bodies that the database can hold as they are, or a 400."""

    def parse(self, stream, media_type=None, parser_context=None):
        return strict_loads(stream.read() if stream is not None else b"")
