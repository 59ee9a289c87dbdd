"""Chain definitions: validation, loading (new versions on change), input checks, prompts."""

from __future__ import annotations

import hashlib
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
from runs.models import Agent, Chain

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
}
CHAIN_FIELDS = {
    "name",
    "description",
    "input_schema",
    "output_schema",
    "timeout_s",
    "estimated_duration_s",
    "agents",
}


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
    agents = raw.get("agents")
    if not isinstance(agents, list) or not agents:
        raise ChainDefinitionError(f"{name}: agents must be a non-empty list")
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
        normalized_agents.append(
            {
                "name": agent["name"],
                "provider": agent["provider"],
                "model": agent["model"],
                "system_prompt": agent.get("system_prompt", ""),
                "prompt": agent["prompt"],
                "max_tokens": max_tokens,
                "temperature": float(temperature),
                "base_url": agent.get("base_url", ""),
            }
        )
    if len({a["name"] for a in normalized_agents}) != len(normalized_agents):
        raise ChainDefinitionError(f"{name}: agent names must be unique")
    estimated = raw.get("estimated_duration_s", min(30, timeout_s))
    if not isinstance(estimated, int) or estimated < 0:
        raise ChainDefinitionError(f"{name}: estimated_duration_s must be a non-negative integer")
    normalized = {
        "name": name,
        "description": str(raw.get("description", "")),
        "input_schema": schema,
        "timeout_s": timeout_s,
        "estimated_duration_s": estimated,
        "agents": normalized_agents,
    }
    if output_schema is not None:  # only then: the hash of every other chain stays as it was
        normalized["output_schema"] = output_schema
    return normalized


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
        timeout_s=d["timeout_s"],
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
            )
            for i, a in enumerate(d["agents"])
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


def agent_messages(
    *, agent: Agent, run_input: Any, outputs: dict[str, str], previous: str
) -> list[dict[str, str]]:
    context = Context(
        {"input": run_input, "outputs": outputs, "previous": previous}, autoescape=False
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


def output_parse(*, schema: dict, text: str) -> Any:
    """The JSON value of a structured output; ValueError with the reason a run fails with
    (`output_invalid`) when the text is not JSON or does not match the schema."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"The model's output is not valid JSON: {e}") from None
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
