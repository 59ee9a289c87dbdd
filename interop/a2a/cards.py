"""Agent cards: one per published chain (its own endpoint), and the service's, every chain a
skill. Public documents; the methods they describe take the API key as a bearer token."""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version

from a2a.types.a2a_pb2 import (
    AgentCapabilities,
    AgentCard,
    AgentExtension,
    AgentInterface,
    AgentSkill,
    HTTPAuthSecurityScheme,
    SecurityRequirement,
    SecurityScheme,
    StringList,
)
from a2a.utils.constants import PROTOCOL_VERSION_CURRENT, TransportProtocol
from google.protobuf.struct_pb2 import Struct

from runs.models import Chain

JSON, TEXT = "application/json", "text/plain"
# The resume extension: `tasks/{id}:subscribe` with Last-Event-ID replays every event after
# that seq exactly once, then follows live; each streamed update's metadata holds its seq.
RESUME_EXTENSION = "urn:agentsvc:a2a:resume:v1"
SECURITY_SCHEME = "apiKey"


def service_version() -> str:
    try:
        return version("agentsvc")
    except PackageNotFoundError:
        return "0"


def text_field(chain: Chain) -> str | None:
    """The one required string property of a chain's input, if that is all it requires: a
    message of one text part is then its input."""
    schema = chain.input_schema or {}
    required = schema.get("required") or []
    if schema.get("type") != "object" or len(required) != 1:
        return None
    prop = (schema.get("properties") or {}).get(required[0]) or {}
    return required[0] if isinstance(prop, dict) and prop.get("type") == "string" else None


def input_modes(chain: Chain) -> list[str]:
    return [JSON, TEXT] if text_field(chain) else [JSON]


def output_modes(chain: Chain) -> list[str]:
    """JSON for a chain with an output_schema and for code chains (any JSON value), else text."""
    return [JSON] if chain.output_schema is not None or chain.entrypoint else [TEXT]


def _examples(chain: Chain) -> list[str]:
    """The input schema's own `examples`, as JSON."""
    examples = (chain.input_schema or {}).get("examples")
    if not isinstance(examples, list):
        return []
    return [json.dumps(e, ensure_ascii=False) for e in examples[:5]]


def chain_skill(chain: Chain) -> AgentSkill:
    return AgentSkill(
        id=chain.name,
        name=chain.name,
        description=chain.description or f"The chain {chain.name}, version {chain.version}.",
        tags=["chain", chain.kind],
        examples=_examples(chain),
        input_modes=input_modes(chain),
        output_modes=output_modes(chain),
    )


def _interfaces(url: str) -> list[AgentInterface]:
    return [
        AgentInterface(
            url=url,
            protocol_binding=TransportProtocol.HTTP_JSON.value,
            protocol_version=PROTOCOL_VERSION_CURRENT,
        ),
        AgentInterface(
            url=f"{url}/jsonrpc",
            protocol_binding=TransportProtocol.JSONRPC.value,
            protocol_version=PROTOCOL_VERSION_CURRENT,
        ),
    ]


def _capabilities() -> AgentCapabilities:
    params = Struct()
    params.update({"header": "Last-Event-ID", "metadata_key": "seq"})
    return AgentCapabilities(
        streaming=True,
        push_notifications=True,
        extended_agent_card=False,
        extensions=[
            AgentExtension(
                uri=RESUME_EXTENSION,
                description="Resume a dropped stream: tasks/{id}:subscribe with the header "
                "Last-Event-ID: <seq> replays every event after that seq exactly once, then "
                "follows live, also for an ended task. Each streamed update carries its seq "
                "(a string) in metadata.seq.",
                required=False,
                params=params,
            )
        ],
    )


def _card(
    *, name: str, description: str, card_version: str, url: str, skills: list[AgentSkill]
) -> AgentCard:
    return AgentCard(
        name=name,
        description=description,
        supported_interfaces=_interfaces(url),
        version=card_version,
        capabilities=_capabilities(),
        security_schemes={
            SECURITY_SCHEME: SecurityScheme(
                http_auth_security_scheme=HTTPAuthSecurityScheme(
                    scheme="Bearer",
                    bearer_format="agentsvc API key",
                    description="An agentsvc API key: Authorization: Bearer <key> "
                    "(X-API-Key: <key> works too).",
                )
            )
        },
        security_requirements=[SecurityRequirement(schemes={SECURITY_SCHEME: StringList()})],
        default_input_modes=sorted({m for s in skills for m in s.input_modes}) or [JSON],
        default_output_modes=sorted({m for s in skills for m in s.output_modes}) or [TEXT],
        skills=skills,
    )


def chain_card(chain: Chain, base_url: str) -> AgentCard:
    """A chain's card: its interface is the chain's own endpoint."""
    skill = chain_skill(chain)
    return _card(
        name=chain.name,
        description=skill.description,
        card_version=str(chain.version),
        url=f"{base_url}/a2a/v1/chains/{chain.name}",
        skills=[skill],
    )


def service_card(chains: list[Chain], base_url: str) -> AgentCard:
    """The service's card: every published chain a skill, on the service's endpoint, where a
    message names its chain in the request's metadata.skill."""
    return _card(
        name="agentsvc",
        description="Agent chains behind an API. Each skill is a chain: name it in the "
        "request's metadata.skill here, or talk to the chain's own agent, whose card is at "
        "/a2a/v1/chains/{skill}/.well-known/agent-card.json.",
        card_version=service_version(),
        url=f"{base_url}/a2a/v1",
        skills=[chain_skill(chain) for chain in chains],
    )
