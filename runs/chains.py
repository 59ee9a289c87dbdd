"""Chain definitions: validation, loading (new versions on change), input checks, prompts."""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from functools import lru_cache
from typing import Any

from django.conf import settings
from django.db import transaction
from django.template import Context, Engine, Template, TemplateSyntaxError
from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import SchemaError

from agentsvc.errors import ECHO_CHARS, ApplicationError
from agentsvc.parsers import BodyError, strict_loads
from runs.execution.tools import module_source_hash, object_load, tool_describe
from runs.models import Agent, Chain, ChainKind

_templates = Engine(autoescape=False, debug=False)
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,99}$")
AGENT_FIELDS = {
    "name",
    "provider",
    "model",
    "system_prompt",
    "prompt",
    "max_tokens",
    "temperature",
    "base_url",
    "tools",
    "max_tool_rounds",
    "tool_timeout_s",
    "approval",
    "ask",
}
CHAIN_FIELDS = {
    "name",
    "description",
    "input_schema",
    "output_schema",
    "timeout_s",
    "input_timeout_s",
    "estimated_duration_s",
    "agents",
    "entrypoint",
    "provider",
    "model",
    "max_tokens",
}
CODE_CHAIN_FIELDS = {"entrypoint", "provider", "model", "max_tokens"}


class ChainDefinitionError(ValueError):
    pass


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def chain_definition_normalize(raw: dict) -> dict:
    """Check a chain definition (from YAML/JSON) and fill defaults; raise ChainDefinitionError."""
    if not isinstance(raw, dict):
        raise ChainDefinitionError("a chain must be a mapping")
    unknown = set(raw) - CHAIN_FIELDS
    if unknown:
        raise ChainDefinitionError(f"unknown chain fields: {sorted(unknown)}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ChainDefinitionError(f"chain name {name!r} must match {_NAME_RE.pattern}")
    schema = raw.get("input_schema", {"type": "object"})
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        raise ChainDefinitionError(
            f"{name}: input_schema is not valid JSON Schema: {e.message}"
        ) from None
    output_schema = raw.get("output_schema")
    if output_schema is not None:
        if not isinstance(output_schema, dict) or output_schema.get("type") != "object":
            raise ChainDefinitionError(
                f"{name}: output_schema must be a JSON Schema of an object (type: object)"
            )
        try:
            Draft202012Validator.check_schema(output_schema)
        except SchemaError as e:
            raise ChainDefinitionError(
                f"{name}: output_schema is not valid JSON Schema: {e.message}"
            ) from None
    timeout_s = raw.get("timeout_s", 120)
    if not isinstance(timeout_s, int) or not 1 <= timeout_s <= settings.RUN_TIMEOUT_MAX_S:
        raise ChainDefinitionError(
            f"{name}: timeout_s must be an integer from 1 to {settings.RUN_TIMEOUT_MAX_S}"
        )
    input_timeout_s = raw.get("input_timeout_s")
    if input_timeout_s is not None and (
        not isinstance(input_timeout_s, int)
        or isinstance(input_timeout_s, bool)
        or not 1 <= input_timeout_s <= settings.INPUT_TIMEOUT_MAX_S
    ):
        raise ChainDefinitionError(
            f"{name}: input_timeout_s must be an integer from 1 to {settings.INPUT_TIMEOUT_MAX_S}"
        )
    estimated = raw.get("estimated_duration_s", min(30, timeout_s))
    if not isinstance(estimated, int) or estimated < 0:
        raise ChainDefinitionError(f"{name}: estimated_duration_s must be a non-negative integer")
    normalized = {
        "name": name,
        "description": str(raw.get("description", "")),
        "input_schema": schema,
        "timeout_s": timeout_s,
        "estimated_duration_s": estimated,
    }
    if "entrypoint" in raw:
        if "agents" in raw:
            raise ChainDefinitionError(f"{name}: give either agents or entrypoint, not both")
        normalized.update(_code_chain(name, raw))
    else:
        extra = sorted(CODE_CHAIN_FIELDS & set(raw))
        if extra:
            raise ChainDefinitionError(f"{name}: {extra} apply to entrypoint chains only")
        normalized["agents"] = _agents_normalize(name, raw.get("agents"))
    if output_schema is not None:  # only then: the hash of every other chain stays as it was
        normalized["output_schema"] = output_schema
    if input_timeout_s is not None:  # likewise
        normalized["input_timeout_s"] = input_timeout_s
    return normalized


def entrypoint_kind(obj: Any) -> str:
    """What an entrypoint is: an async function, a compiled LangGraph graph or an OpenAI Agents
    SDK Agent (the frameworks only if installed); ValueError with what was found otherwise."""
    if inspect.iscoroutinefunction(obj):
        params = [
            p
            for p in inspect.signature(obj).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if len(params) != 2:
            raise ValueError("an async function entrypoint takes two arguments: (ctx, input)")
        return ChainKind.FUNCTION
    try:
        from langgraph.graph import StateGraph
        from langgraph.pregel import Pregel
    except ImportError:
        pass
    else:
        if isinstance(obj, Pregel):
            return ChainKind.LANGGRAPH
        if isinstance(obj, StateGraph):
            raise ValueError("a StateGraph must be compiled: name the result of .compile()")
    try:
        from agents import Agent as SdkAgent
    except ImportError:
        pass
    else:
        if isinstance(obj, SdkAgent):
            return ChainKind.OPENAI_AGENTS
    if inspect.isfunction(obj):
        raise ValueError("a function entrypoint must be async: async def chain(ctx, input)")
    raise ValueError(
        f"found a {type(obj).__name__}: an entrypoint is an async function (ctx, input), a "
        "compiled LangGraph graph (pip install langgraph) or an OpenAI Agents SDK Agent "
        "(pip install openai-agents)"
    )


def _code_chain(name: str, raw: dict) -> dict:
    """The fields of an entrypoint chain: importing it here is what tells its kind, so a module
    that does not import, a missing attribute or an object of no known kind fails publishing."""
    path = raw["entrypoint"]
    try:
        kind = entrypoint_kind(object_load(path))
        source_hash = module_source_hash(path)
    except (ImportError, AttributeError, ValueError) as e:
        raise ChainDefinitionError(f"{name}: entrypoint {path!r}: {e}") from None
    provider = raw.get("provider", "local")
    if provider not in settings.PROVIDERS:
        raise ChainDefinitionError(
            f"{name}: unknown provider {provider!r} (configured: {sorted(settings.PROVIDERS)})"
        )
    model = raw.get("model", "")
    if not isinstance(model, str):
        raise ChainDefinitionError(f"{name}: model must be a string")
    max_tokens = raw.get("max_tokens", 4096)
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= 10_000_000:
        raise ChainDefinitionError(f"{name}: max_tokens must be an integer from 1 to 10000000")
    return {
        "entrypoint": path,
        "kind": str(kind),
        "source_hash": source_hash,
        "provider": provider,
        "model": model,
        "max_tokens": max_tokens,
    }


def _agents_normalize(name: str, agents: Any) -> list[dict]:
    if not isinstance(agents, list) or not agents:
        raise ChainDefinitionError(f"{name}: give agents (a non-empty list) or an entrypoint")
    normalized_agents = []
    for i, agent in enumerate(agents):
        if not isinstance(agent, dict):
            raise ChainDefinitionError(f"{name}: agent {i} must be a mapping")
        unknown = set(agent) - AGENT_FIELDS
        if unknown:
            raise ChainDefinitionError(f"{name}: agent {i}: unknown fields {sorted(unknown)}")
        for field in ("name", "provider", "model", "prompt"):
            if not isinstance(agent.get(field), str) or not agent[field]:
                raise ChainDefinitionError(f"{name}: agent {i}: {field} is required")
        if not _NAME_RE.match(agent["name"]):
            raise ChainDefinitionError(f"{name}: agent name {agent['name']!r} is not a slug")
        if agent["provider"] not in settings.PROVIDERS:
            raise ChainDefinitionError(
                f"{name}: agent {agent['name']}: unknown provider {agent['provider']!r} "
                f"(configured: {sorted(settings.PROVIDERS)})"
            )
        try:
            _templates.from_string(agent["prompt"])
            _templates.from_string(agent.get("system_prompt", ""))
        except TemplateSyntaxError as e:
            raise ChainDefinitionError(
                f"{name}: agent {agent['name']}: bad template: {e}"
            ) from None
        max_tokens = agent.get("max_tokens", 512)
        temperature = agent.get("temperature", 0.7)
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= 1_000_000:
            raise ChainDefinitionError(f"{name}: agent {agent['name']}: bad max_tokens")
        if not isinstance(temperature, int | float) or not 0 <= temperature <= 2:
            raise ChainDefinitionError(f"{name}: agent {agent['name']}: bad temperature")
        normalized_agent = {
            "name": agent["name"],
            "provider": agent["provider"],
            "model": agent["model"],
            "system_prompt": agent.get("system_prompt", ""),
            "prompt": agent["prompt"],
            "max_tokens": max_tokens,
            "temperature": float(temperature),
            "base_url": agent.get("base_url", ""),
        }
        if "tools" in agent:  # only then: the hash of a chain without tools stays as it was
            normalized_agent.update(_tools_normalize(f"{name}: agent {agent['name']}", agent))
        elif {"max_tool_rounds", "tool_timeout_s"} & set(agent):
            raise ChainDefinitionError(
                f"{name}: agent {agent['name']}: max_tool_rounds and tool_timeout_s need tools"
            )
        # Likewise only when given: what a person is asked before the agent runs.
        normalized_agent.update(_wait_normalize(f"{name}: agent {agent['name']}", agent))
        normalized_agents.append(normalized_agent)
    if len({a["name"] for a in normalized_agents}) != len(normalized_agents):
        raise ChainDefinitionError(f"{name}: agent names must be unique")
    return normalized_agents


def _wait_normalize(where: str, agent: dict) -> dict:
    """An agent's `approval: {prompt}` or `ask: {prompt, schema}` (not both): the prompt a
    template over the agent prompt's context, the schema that of the answer (an object)."""
    if "approval" in agent and "ask" in agent:
        raise ChainDefinitionError(f"{where}: give approval or ask, not both")
    for field, allowed in (("approval", {"prompt"}), ("ask", {"prompt", "schema"})):
        if field not in agent:
            continue
        wait = agent[field]
        if (
            not isinstance(wait, dict)
            or not isinstance(wait.get("prompt"), str)
            or not (wait["prompt"].strip())
        ):
            raise ChainDefinitionError(f"{where}: {field} must be a mapping with a prompt")
        unknown = set(wait) - allowed
        if unknown:
            raise ChainDefinitionError(f"{where}: {field}: unknown fields {sorted(unknown)}")
        try:
            _templates.from_string(wait["prompt"])
        except TemplateSyntaxError as e:
            raise ChainDefinitionError(f"{where}: {field}: bad template: {e}") from None
        normalized = {"prompt": wait["prompt"]}
        if field == "ask":
            normalized["schema"] = answer_schema_check(f"{where}: ask", wait.get("schema"))
        return {field: normalized}
    return {}


def answer_schema_check(where: str, schema: Any) -> dict:
    """The JSON Schema of an answer to a question (`ask`, `ctx.ask`): an object's; ValueError
    (ChainDefinitionError) otherwise. None: any object."""
    if schema is None:
        return {"type": "object"}
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise ChainDefinitionError(f"{where}: schema must be a JSON Schema of an object")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        raise ChainDefinitionError(
            f"{where}: schema is not valid JSON Schema: {e.message}"
        ) from None
    return schema


def _tools_normalize(where: str, agent: dict) -> dict:
    tools = agent["tools"]
    if not isinstance(tools, list) or not tools:
        raise ChainDefinitionError(f"{where}: tools must be a non-empty list")
    described = []
    for i, entry in enumerate(tools):
        try:
            tool = tool_describe(entry)
            tool["source_hash"] = module_source_hash(tool["function"])
        except ValueError as e:
            raise ChainDefinitionError(f"{where}: tools[{i}]: {e}") from None
        described.append(tool)
    if len({t["name"] for t in described}) != len(described):
        raise ChainDefinitionError(f"{where}: tool names must be unique")
    rounds = agent.get("max_tool_rounds", 8)
    if not isinstance(rounds, int) or not 1 <= rounds <= 100:
        raise ChainDefinitionError(f"{where}: max_tool_rounds must be an integer from 1 to 100")
    timeout = agent.get("tool_timeout_s", 30)
    if not isinstance(timeout, int | float) or not 0 < timeout <= 3600:
        raise ChainDefinitionError(f"{where}: tool_timeout_s must be a number of seconds to 3600")
    return {"tools": described, "max_tool_rounds": rounds, "tool_timeout_s": float(timeout)}


@transaction.atomic
def chain_publish(*, definition: dict) -> tuple[Chain, bool]:
    """Publish a definition: a new version if it changed, else the current one. (chain, created)"""
    d = chain_definition_normalize(definition)
    digest = hashlib.sha256(canonical_json(d).encode()).hexdigest()
    # Lock the latest version so two publishers cannot both take the next number.
    latest = Chain.objects.select_for_update().filter(name=d["name"]).order_by("-version").first()
    if latest is not None and latest.definition_hash == digest:
        if not latest.published:
            latest.published = True
            latest.save(update_fields=["published"])
        return latest, False
    chain = Chain.objects.create(
        name=d["name"],
        version=(latest.version + 1) if latest else 1,
        description=d["description"],
        input_schema=d["input_schema"],
        output_schema=d.get("output_schema"),
        kind=d.get("kind", ChainKind.AGENTS),
        entrypoint=d.get("entrypoint", ""),
        source_hash=d.get("source_hash", ""),
        provider=d.get("provider", ""),
        model=d.get("model", ""),
        max_tokens=d.get("max_tokens", 0),
        timeout_s=d["timeout_s"],
        input_timeout_s=d.get("input_timeout_s", Chain._meta.get_field("input_timeout_s").default),
        estimated_duration_s=d["estimated_duration_s"],
        definition_hash=digest,
        published=True,
    )
    Agent.objects.bulk_create(
        [
            Agent(
                chain=chain,
                position=i,
                name=a["name"],
                provider=a["provider"],
                model=a["model"],
                system_prompt=a["system_prompt"],
                prompt_template=a["prompt"],
                max_tokens=a["max_tokens"],
                temperature=a["temperature"],
                base_url=a["base_url"],
                tools=a.get("tools", []),
                max_tool_rounds=a.get("max_tool_rounds", 8),
                tool_timeout_s=a.get("tool_timeout_s", 30),
                approval=a.get("approval"),
                ask=a.get("ask"),
            )
            for i, a in enumerate(d.get("agents", []))
        ]
    )
    return chain, True


@lru_cache(maxsize=512)
def _validator(chain_id: int, schema_json: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads(schema_json), format_checker=FormatChecker())


def _error_field(error) -> str:
    path = "input"
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    if error.validator == "required":
        match = re.match(r"'(.+)' is a required property", error.message)
        if match:
            path += f".{match.group(1)}"
    return path


def _error_message(error) -> str:
    """jsonschema's message, with the value it repeats (`'...' is not of type 'integer'`) cut."""
    shown = repr(error.instance)
    if len(shown) <= ECHO_CHARS or shown not in error.message:
        return error.message
    return error.message.replace(shown, shown[:ECHO_CHARS] + "…")


def chain_validate_input(*, chain: Chain, data: Any) -> None:
    """Raise a validation_error listing every field of `data` that the chain's schema rejects."""
    validator = _validator(chain.id, canonical_json(chain.input_schema))
    errors = sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        raise ApplicationError(
            "validation_error",
            f"The input does not match the input schema of {chain.name}.",
            errors=[{"field": _error_field(e), "message": _error_message(e)} for e in errors[:50]],
        )


@lru_cache(maxsize=1024)
def _template(source: str) -> Template:
    """Compiled once per process: every run of a chain renders the same prompts."""
    return _templates.from_string(source)


def agent_context(
    *, run_input: Any, outputs: dict[str, str], previous: str, answers: dict[str, Any]
) -> Context:
    """What an agent's prompts (and its approval's or question's prompt) are rendered with."""
    return Context(
        {"input": run_input, "outputs": outputs, "previous": previous, "answers": answers},
        autoescape=False,
    )


def template_render(source: str, context: Context) -> str:
    return _template(source).render(context)


def agent_messages(
    *,
    agent: Agent,
    run_input: Any,
    outputs: dict[str, str],
    previous: str,
    answers: dict[str, Any] | None = None,
) -> list[dict[str, str]]:
    context = agent_context(
        run_input=run_input, outputs=outputs, previous=previous, answers=answers or {}
    )
    messages = []
    if agent.system_prompt:
        messages.append(
            {
                "role": "system",
                "content": _template(agent.system_prompt).render(context),
            }
        )
    messages.append({"role": "user", "content": _template(agent.prompt_template).render(context)})
    return messages


@lru_cache(maxsize=512)
def _output_validator(schema_json: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads(schema_json), format_checker=FormatChecker())


def answer_validate(*, schema: dict, data: Any) -> None:
    """A validation_error listing every field of an answer (`input`) that `schema` refuses."""
    validator = _output_validator(canonical_json(schema))
    errors = sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        raise ApplicationError(
            "validation_error",
            "The input does not match the schema of the request.",
            errors=[{"field": _error_field(e), "message": _error_message(e)} for e in errors[:50]],
        )


def output_parse(*, schema: dict, text: str) -> Any:
    """The JSON value of a structured output; ValueError with the reason a run fails with
    (`output_invalid`) when the text is not JSON or does not match the schema."""
    try:
        value = strict_loads(text.encode())
    except BodyError as e:  # not JSON, or JSON the database cannot hold (NaN, 1e999, NUL)
        raise ValueError(f"The model's output is not valid JSON: {e.detail}") from None
    error = next(iter(_output_validator(canonical_json(schema)).iter_errors(value)), None)
    if error is not None:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        raise ValueError(
            f"The model's output does not match the output schema at output{where}: "
            f"{_error_message(error)}"
        )
    return value


def output_response_format(*, chain_name: str, schema: dict) -> dict:
    """The OpenAI chat completions `response_format` asking for JSON matching `schema`."""
    return {
        "type": "json_schema",
        "json_schema": {
            "name": re.sub(r"[^A-Za-z0-9_-]", "_", chain_name)[:64],
            "schema": schema,
            "strict": True,
        },
    }
