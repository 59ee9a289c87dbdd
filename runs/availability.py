"""Is a model served right now? Probed through its provider, cached briefly per process."""

from __future__ import annotations

import time
from typing import Any

from django.conf import settings

from runs.execution.providers import provider_for
from runs.models import Chain
from runs.selectors import chain_latest_list

_cache: dict[tuple[str, str, str], tuple[float, bool, str, float]] = {}


def model_status(*, provider: str, model: str, base_url: str = "") -> tuple[bool, str, float]:
    """(ok, detail, latency_ms), at most one probe per model every MODEL_PROBE_CACHE_S."""
    key = (provider, base_url, model)
    now = time.monotonic()
    cached = _cache.get(key)
    if cached and now - cached[0] < settings.MODEL_PROBE_CACHE_S:
        return cached[1], cached[2], cached[3]
    started = time.monotonic()
    ok, detail = provider_for(provider, base_url).probe(
        model, timeout=settings.MODEL_PROBE_TIMEOUT_S
    )
    latency_ms = round((time.monotonic() - started) * 1000, 1)
    _cache[key] = (now, ok, detail, latency_ms)
    return ok, detail, latency_ms


def chain_available(chain: Chain) -> bool:
    return all(
        model_status(provider=a.provider, model=a.model, base_url=a.base_url)[0]
        for a in chain.agents.all()
    )


def models_readiness() -> dict[str, dict[str, Any]]:
    """Readiness of every model a published chain needs (agentsvc/health.py asks)."""
    needed = {
        (a.provider, a.model, a.base_url) for c in chain_latest_list() for a in c.agents.all()
    }
    result = {}
    for provider, model, base_url in sorted(needed):
        ok, detail, latency_ms = model_status(provider=provider, model=model, base_url=base_url)
        result[f"{provider}/{model}"] = {"ok": ok, "latency_ms": latency_ms, "detail": detail}
    return result
