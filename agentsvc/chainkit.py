"""What chain code imports from the service: models that go to the configured providers.

A LangGraph graph or an OpenAI Agents SDK agent behind agentsvc calls its models through the
providers of `PROVIDERS` (the `local` model, `openai`, any OpenAI-compatible server), so the
service's settings, not the chain's module, say where they are and with which key:

    from agentsvc.chainkit import chat_model
    llm = chat_model("gpt-4o-mini", provider="openai")   # a langchain-openai ChatOpenAI
"""

from __future__ import annotations

import os
from typing import Any

from django.conf import settings


def provider_conf(provider: str, base_url: str = "") -> tuple[str, str]:
    """(base URL, API key) of a configured provider; KeyError names the configured ones."""
    try:
        conf = settings.PROVIDERS[provider]
    except KeyError:
        raise KeyError(
            f"no provider {provider!r} (configured: {sorted(settings.PROVIDERS)})"
        ) from None
    key = os.environ.get(conf["api_key_env"], "") if conf["api_key_env"] else ""
    return base_url or conf["base_url"], key or "unused"


def chat_model(model: str, *, provider: str = "local", base_url: str = "", **kwargs: Any) -> Any:
    """A langchain-openai `ChatOpenAI` for `model` on a configured provider, reporting usage
    when it streams (the run's usage and cost count it)."""
    from langchain_openai import ChatOpenAI

    url, key = provider_conf(provider, base_url)
    kwargs.setdefault("stream_usage", True)
    return ChatOpenAI(model=model, base_url=url, api_key=key, **kwargs)
