"""Model providers: an OpenAI-compatible chat completions client that streams text deltas.

Any server speaking `/v1/chat/completions` works: OpenAI, vLLM, Ollama, llama.cpp server.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import httpx
from django.conf import settings

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class ToolCalls:
    """The tool calls a model answered with (OpenAI `tool_calls`, streamed in pieces): each
    {"id", "name", "arguments"} with the arguments as the model wrote them (JSON text)."""

    calls: tuple[dict[str, str], ...]


class ProviderError(Exception):
    """A provider call failed; `code` becomes the run's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class DeadlineExceeded(Exception):
    """The run's deadline passed while waiting on the provider."""


_client: httpx.Client | None = None


def _http() -> httpx.Client:
    # One pooled client per process for the availability probes (web processes).
    global _client
    if _client is None:
        _client = httpx.Client(follow_redirects=False, limits=httpx.Limits(max_connections=50))
    return _client


def async_client(connections: int) -> httpx.AsyncClient:
    """The executor's client: one per event loop, keep-alive, a connection per run in flight."""
    return httpx.AsyncClient(
        follow_redirects=False,
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
    )


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class OpenAICompatibleProvider:
    name: str
    base_url: str
    api_key: str

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    async def stream(
        self,
        *,
        client: httpx.AsyncClient,
        model: str,
        messages: list[dict],
        max_tokens: int,
        temperature: float,
        deadline: float,
        response_format: dict | None = None,
        tools: list[dict] | None = None,
    ) -> AsyncIterator[str | ToolCalls | Usage]:
        """Yield text deltas, then the ToolCalls if the model made any, then one Usage.
        `deadline` is a time.monotonic() value; the caller also bounds the whole stream by it,
        so a silent model cannot outlast the run. `response_format` (structured output) and
        `tools` (chat completions function tools) go into the request as given."""
        body = {
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if response_format is not None:
            body["response_format"] = response_format
        if tools:
            body["tools"] = tools
        url = self.base_url.rstrip("/") + "/chat/completions"
        attempt = 0
        yielded = False  # once text went out, a retry would repeat it: fail instead
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded()
            timeout = httpx.Timeout(
                connect=min(settings.PROVIDER_CONNECT_TIMEOUT_S, remaining),
                read=min(settings.PROVIDER_READ_TIMEOUT_S, remaining),
                write=min(settings.PROVIDER_CONNECT_TIMEOUT_S, remaining),
                pool=min(settings.PROVIDER_CONNECT_TIMEOUT_S, remaining),
            )
            wait: float | None = None
            error: ProviderError
            try:
                async with client.stream(
                    "POST", url, json=body, headers=self._headers(), timeout=timeout
                ) as response:
                    if response.status_code == 200:
                        async for item in self._read(response, messages, deadline):
                            yielded = True
                            yield item
                        return
                    await response.aread()
                    error = self._status_error(response)
                    if response.status_code not in RETRYABLE_STATUS:
                        raise error
                    wait = retry_after_seconds(response.headers.get("Retry-After"))
            except httpx.TimeoutException as e:
                if time.monotonic() >= deadline:
                    raise DeadlineExceeded() from e
                if isinstance(e, httpx.ReadTimeout):
                    raise ProviderError(
                        "provider_timeout",
                        f"{self.name}: no data from the model for "
                        f"{settings.PROVIDER_READ_TIMEOUT_S:g} s",
                    ) from e
                error = ProviderError("provider_unavailable", f"{self.name}: {type(e).__name__}")
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as e:
                error = ProviderError(
                    "provider_unavailable", f"{self.name}: cannot reach {self.base_url} ({e})"
                )
            attempt += 1
            if yielded or attempt > settings.PROVIDER_MAX_RETRIES:
                raise error
            backoff = min(2 ** (attempt - 1) * 0.5, settings.PROVIDER_RETRY_MAX_WAIT_S)
            delay = min(
                wait if wait is not None else backoff * (0.8 + 0.4 * random.random()),
                settings.PROVIDER_RETRY_MAX_WAIT_S,
            )
            if time.monotonic() + delay >= deadline:
                raise error
            await asyncio.sleep(delay)

    def _status_error(self, response: httpx.Response) -> ProviderError:
        status = response.status_code
        try:
            message = response.json().get("error", {}).get("message", "")
        except (ValueError, AttributeError):
            message = ""
        message = (message or response.text)[:300]
        if status in (401, 403):
            return ProviderError(
                "provider_auth_failed",
                f"{self.name}: the model server refused the credentials ({status})",
            )
        if status == 429:
            return ProviderError("provider_rate_limited", f"{self.name}: rate limited: {message}")
        if status in (502, 503, 504):
            return ProviderError("provider_unavailable", f"{self.name}: HTTP {status}: {message}")
        return ProviderError("provider_error", f"{self.name}: HTTP {status}: {message}")

    async def _read(
        self, response: httpx.Response, messages: list[dict], deadline: float
    ) -> AsyncIterator[str | ToolCalls | Usage]:
        usage: Usage | None = None
        chars_out = 0
        done = False
        calls: dict[int, dict[str, str]] = {}  # by the index the stream gives each call
        async for line in response.aiter_lines():
            if time.monotonic() >= deadline:
                raise DeadlineExceeded()
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if done:
                continue  # read to the body's end: a connection left mid-body is not reused
            if payload == "[DONE]":
                done = True
                continue
            try:
                chunk = json.loads(payload)
                if chunk.get("usage"):
                    usage = Usage(
                        int(chunk["usage"]["prompt_tokens"]),
                        int(chunk["usage"]["completion_tokens"]),
                    )
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    for piece in delta.get("tool_calls") or []:
                        call = calls.setdefault(
                            int(piece.get("index", len(calls))),
                            {"id": "", "name": "", "arguments": ""},
                        )
                        function = piece.get("function") or {}
                        call["id"] = piece.get("id") or call["id"]
                        call["name"] += function.get("name") or ""
                        call["arguments"] += function.get("arguments") or ""
                    text = delta.get("content")
                    if text:
                        chars_out += len(text)
                        yield text
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ProviderError(
                    "invalid_provider_response",
                    f"{self.name}: malformed stream chunk: {payload[:200]!r}",
                ) from e
        if not done:
            raise ProviderError(
                "invalid_provider_response", f"{self.name}: the stream ended before [DONE]"
            )
        if calls:
            for i, call in sorted(calls.items()):
                call["id"] = call["id"] or f"call_{i}"
                chars_out += len(call["name"]) + len(call["arguments"])
            yield ToolCalls(tuple(call for _, call in sorted(calls.items())))
        if usage is None:
            # The server did not report usage: estimate at about 4 characters per token.
            chars_in = sum(len(m.get("content") or "") for m in messages)
            usage = Usage(-(-chars_in // 4), -(-chars_out // 4))
        yield usage

    def probe(self, model: str, *, timeout: float = 2.0) -> tuple[bool, str]:
        """Is `model` served right now? (ok, detail)"""
        try:
            response = _http().get(
                self.base_url.rstrip("/") + "/models", headers=self._headers(), timeout=timeout
            )
        except httpx.HTTPError as e:
            return False, f"cannot reach {self.base_url}: {type(e).__name__}"
        if response.status_code != 200:
            return False, f"GET /models answered {response.status_code}"
        try:
            served = {m["id"] for m in response.json().get("data", [])}
        except (ValueError, KeyError, TypeError, AttributeError):
            return False, "GET /models answered malformed JSON"
        if served and model not in served:
            return False, f"model {model!r} is not served"
        return True, "ok"


def provider_for(name: str, base_url: str = "") -> OpenAICompatibleProvider:
    try:
        conf = settings.PROVIDERS[name]
    except KeyError:
        raise ProviderError("provider_not_configured", f"no provider named {name!r}") from None
    api_key = os.environ.get(conf["api_key_env"], "") if conf["api_key_env"] else ""
    return OpenAICompatibleProvider(
        name=name, base_url=base_url or conf["base_url"], api_key=api_key
    )
