"""Tools: Python callables an agent's model may call, named `module:function` in a chain file.

At publish time a tool is imported and described: its name, its description (the docstring's
first paragraph) and the JSON Schema of its arguments (pydantic, from the type hints; the
docstring's `Args:` section describes each one), unless the file gives them. At run time a call's
arguments are validated against the same hints and the tool is called: an async tool on the
executor's loop, a sync one on a bounded thread pool, both bounded by the agent's
`tool_timeout_s`. What a tool raises becomes an error result the model reads; the run goes on.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import inspect
import json
import re
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache, partial
from typing import Any

import pydantic
from django.conf import settings

TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what OpenAI accepts as a function name
_PATH_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class ToolError(Exception):
    """A tool call that gave no output: `code` and `message` go to the model as its result."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def object_load(path: str) -> Any:
    """`package.module:attr` (attr may be dotted), imported; ImportError/AttributeError/
    ValueError with a message a chain owner can act on."""
    if not isinstance(path, str) or not _PATH_RE.match(path):
        raise ValueError(f"{path!r} is not of the form module:attribute")
    module_name, attr = path.split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"cannot import {module_name}: {e}") from None
    except Exception as e:  # the module itself raised while importing
        raise ImportError(f"importing {module_name} raised {type(e).__name__}: {e}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(f"{module_name} has no attribute {attr}") from None
    return obj


def module_source_hash(path: str) -> str:
    """SHA-256 of the source of the module that `module:attr` names ("" if it has none)."""
    import hashlib

    module = importlib.import_module(path.split(":", 1)[0])
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        return ""
    return hashlib.sha256(source.encode()).hexdigest()


def _docstring(fn: Any) -> tuple[str, dict[str, str]]:
    """The docstring's first paragraph, and the descriptions of its `Args:` section."""
    doc = inspect.getdoc(fn) or ""
    summary = doc.split("\n\n", 1)[0].replace("\n", " ").strip()
    params: dict[str, str] = {}
    match = re.search(r"^(?:Args|Arguments|Parameters):\s*\n((?:[ \t]+.*\n?)+)", doc, re.M)
    if match:
        current = None
        for line in match.group(1).splitlines():
            item = re.match(r"^\s+(\w+)(?:\s*\([^)]*\))?:\s*(.*)$", line)
            if item and (current is None or not line.startswith("        ")):
                current = item.group(1)
                params[current] = item.group(2).strip()
            elif current and line.strip():
                params[current] = f"{params[current]} {line.strip()}".strip()
    return summary, params


def _strip_titles(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _strip_titles(v) for k, v in schema.items() if k != "title"}
    if isinstance(schema, list):
        return [_strip_titles(v) for v in schema]
    return schema


def tool_describe(entry: Any) -> dict[str, Any]:
    """A chain file's tool entry (`module:function`, or a mapping with `function` and optionally
    `name`, `description`, `parameters`, `needs_approval`) as the tool the agent stores;
    ValueError otherwise."""
    if isinstance(entry, str):
        entry = {"function": entry}
    if not isinstance(entry, dict):
        raise ValueError("a tool is `module:function` or a mapping with `function`")
    unknown = set(entry) - {"function", "name", "description", "parameters", "needs_approval"}
    if unknown:
        raise ValueError(f"unknown tool fields {sorted(unknown)}")
    path = entry.get("function")
    try:
        fn = object_load(path)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"tool {path!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"tool {path!r} is not callable")
    summary, described = _docstring(fn)
    name = entry.get("name", getattr(fn, "__name__", ""))
    if not isinstance(name, str) or not TOOL_NAME_RE.match(name):
        raise ValueError(f"tool {path!r}: name {name!r} must match {TOOL_NAME_RE.pattern}")
    parameters = entry.get("parameters")
    if parameters is None:
        try:
            parameters = _strip_titles(pydantic.TypeAdapter(fn).json_schema())
        except pydantic.PydanticUserError as e:
            raise ValueError(f"tool {path!r}: no JSON Schema from its type hints ({e})") from None
        for arg, text in described.items():
            if arg in parameters.get("properties", {}):
                parameters["properties"][arg].setdefault("description", text)
    if not isinstance(parameters, dict) or parameters.get("type") != "object":
        raise ValueError(f"tool {path!r}: parameters must be a JSON Schema of an object")
    needs_approval = entry.get("needs_approval", False)
    if not isinstance(needs_approval, bool):
        raise ValueError(f"tool {path!r}: needs_approval must be true or false")
    tool = {
        "name": name,
        "function": path,
        "description": str(entry.get("description", summary)),
        "parameters": parameters,
    }
    if needs_approval:  # only then: the hash of a chain's other tools stays as it was
        tool["needs_approval"] = True
    return tool


def tools_openai(tools: list[dict]) -> list[dict]:
    """The tools as the chat completions API takes them."""
    return [
        {
            "type": "function",
            "function": {
                "name": t["name"],
                "description": t["description"],
                "parameters": t["parameters"],
            },
        }
        for t in tools
    ]


@lru_cache(maxsize=1024)
def _callable(path: str) -> tuple[Any, bool]:
    """The tool, wrapped to validate its arguments against its hints; and whether it is async."""
    fn = object_load(path)
    is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an instance with an async __call__
    )
    try:
        return pydantic.validate_call(fn), is_async
    except pydantic.PydanticUserError:
        return fn, is_async


_pool: ThreadPoolExecutor | None = None


def _threads() -> ThreadPoolExecutor:
    """The sync tools' threads, one pool per process: a tool that blocks holds one of them,
    never the loop that every other run's events go through."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(settings.TOOL_THREADS, "tool")
    return _pool


def output_text(value: Any) -> str:
    """A tool's return value as the text the model reads, cut at TOOL_OUTPUT_MAX_CHARS."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, pydantic.BaseModel):
        text = value.model_dump_json()
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            text = str(value)
    text = text.replace("\x00", "")  # a database text cannot hold NUL
    limit = settings.TOOL_OUTPUT_MAX_CHARS
    if len(text) > limit:
        text = text[:limit] + f"… [cut: {len(text) - limit} more characters]"
    return text


async def tool_call(*, tool: dict, arguments: str, timeout_s: float) -> str:
    """Call the tool with the model's `arguments` (a JSON object in text); its output as text,
    or ToolError (`tool_arguments_invalid`, `tool_error`, `tool_timeout`)."""
    try:
        args = json.loads(arguments or "{}")
    except ValueError as e:
        raise ToolError("tool_arguments_invalid", f"The arguments are not JSON: {e}") from None
    if not isinstance(args, dict):
        raise ToolError("tool_arguments_invalid", "The arguments must be a JSON object.")
    try:
        fn, is_async = _callable(tool["function"])
    except (ImportError, AttributeError, ValueError) as e:
        raise ToolError("tool_error", f"The tool cannot be loaded: {e}") from None
    try:
        async with asyncio.timeout(timeout_s):
            if is_async:
                value = await fn(**args)
            else:
                loop = asyncio.get_running_loop()
                call = partial(contextvars.copy_context().run, partial(fn, **args))
                value = await loop.run_in_executor(_threads(), call)
    except TimeoutError:
        raise ToolError(
            "tool_timeout", f"{tool['name']} did not answer within {timeout_s:g} s."
        ) from None
    except pydantic.ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'arguments'}: {err['msg']}" for err in e.errors()
        )
        raise ToolError("tool_arguments_invalid", problems[:1000]) from None
    except asyncio.CancelledError:
        raise
    except Exception as e:
        message = f"{type(e).__name__}: {e}".replace("\x00", "")
        raise ToolError("tool_error", message[:1000]) from None
    return output_text(value)
