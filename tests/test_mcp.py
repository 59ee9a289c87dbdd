"""MCP with the official client (`mcp`, streamable HTTP), as a user runs it, against a real daphne
process and the suite's executor: tools, a call with progress and log messages, cancellation,
auth, limits."""

from __future__ import annotations

import asyncio
import json

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS

from agentsvc.services import api_key_create
from runs.models import Run
from tests.conftest import fake, wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

SCHEMA = {
    "type": "object",
    "required": ["summary", "words"],
    "properties": {"summary": {"type": "string"}, "words": {"type": "integer"}},
}


@pytest.fixture(autouse=True)
def _settled():
    yield
    wait_until(
        lambda: not Run.objects.filter(status__in=["queued", "running"]).exists(),
        60,
        message="runs to end",
    )


def tools(base: str, key: str | None, **options) -> Client:
    """An MCP client of the service, the API key on its HTTP client."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    http = httpx2.AsyncClient(headers=headers, timeout=60)
    return Client(streamable_http_client(f"{base}/mcp", http_client=http), **options)


def scenario(fn):
    return asyncio.run(fn())


def test_every_chain_is_a_tool_with_its_schemas(live_server_url, alice, make_chain):
    make_chain("demo", description="Writes about a topic.")
    make_chain("brief", output_schema=SCHEMA)

    async def run():
        async with tools(live_server_url, alice.raw_key) as client:
            return (await client.list_tools()).tools

    listed = {tool.name: tool for tool in scenario(run)}
    assert sorted(listed) == ["brief", "demo"]
    assert listed["demo"].description == "Writes about a topic."
    assert listed["demo"].input_schema["required"] == ["topic"]
    assert listed["demo"].output_schema is None
    assert listed["brief"].output_schema == SCHEMA


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_a_call_answers_the_output_with_progress_per_agent_and_tokens_as_log_messages(
    live_server_url, worker, alice, bob, make_chain, mode
):
    """2026-07-28 (the client's default) and the handshake era alike."""
    make_chain("demo", models=[fake(tokens=5, latency_ms=10), fake(tokens=3)])
    progress, logs = [], []

    async def on_log(params):
        logs.append(params)

    async def on_progress(done, total, message):
        progress.append((done, total, message))

    async def run():
        async with tools(
            live_server_url, alice.raw_key, mode=mode, logging_callback=on_log, log_level="info"
        ) as client:
            return await client.call_tool("demo", {"topic": "tides"}, progress_callback=on_progress)

    result = scenario(run)
    assert not result.is_error
    run_id = result.meta["agentsvc/run_id"]
    stored = Run.objects.get(pk=run_id)
    assert stored.status == "completed" and stored.owner.name == "alice"
    assert result.content[0].text == stored.output
    assert progress == [(0, 2, "started"), (1, 2, "agent0 done"), (2, 2, "agent1 done")]
    chunks = [log.data for log in logs if log.data["event"] == "agent.output"]
    assert len("".join(c["chunk"] for c in chunks if c["index"] == 0).split()) == 5
    assert [c["seq"] for c in chunks] == sorted(c["seq"] for c in chunks)
    assert bob.get(f"/api/v1/runs/{run_id}").status_code == 404


def test_structured_output_for_a_chain_with_an_output_schema(
    live_server_url, worker, alice, make_chain
):
    make_chain("brief", models=[fake(tokens=4, json=1)], output_schema=SCHEMA)

    async def run():
        async with tools(live_server_url, alice.raw_key) as client:
            return await client.call_tool("brief", {"topic": "tides"})

    result = scenario(run)
    assert result.structured_content["words"] == 4
    assert json.loads(result.content[0].text) == result.structured_content


def test_cancelling_the_call_cancels_the_run(live_server_url, worker, alice, make_chain):
    make_chain("demo", models=[fake(tokens=50, latency_ms=50), fake(tokens=2)])
    started = asyncio.Event

    async def run():
        began = started()

        async def on_progress(done, total, message):
            began.set()

        async with tools(live_server_url, alice.raw_key) as client:
            call = asyncio.create_task(
                client.call_tool("demo", {"topic": "tides"}, progress_callback=on_progress)
            )
            await asyncio.wait_for(began.wait(), 30)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call

    scenario(run)
    wait_until(lambda: Run.objects.filter(status="cancelled").exists(), 30)
    (cancelled,) = Run.objects.all()
    assert cancelled.cancel_reason == "disconnect" and cancelled.agents_completed == 0


def test_refused_credentials_are_401_with_the_problem(live_server_url, alice):
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    headers = {"Accept": "application/json, text/event-stream"}
    none = httpx.post(f"{live_server_url}/mcp", json=body, headers=headers)
    assert none.status_code == 401 and none.headers["WWW-Authenticate"] == 'Bearer realm="api"'
    assert none.json()["id"] == 1
    assert none.json()["error"]["data"]["code"] == "authentication_failed"
    both = {**headers, "Authorization": f"Bearer {alice.raw_key}", "X-API-Key": alice.raw_key}
    ambiguous = httpx.post(f"{live_server_url}/mcp", json=body, headers=both)
    assert ambiguous.status_code == 400
    assert ambiguous.json()["error"]["data"]["code"] == "ambiguous_credentials"
    # No stream of the server's own: a GET would be held open with nothing to send.
    held = httpx.get(f"{live_server_url}/mcp", headers={"Authorization": f"Bearer {alice.raw_key}"})
    assert held.status_code == 405 and held.headers["Allow"] == "POST"

    async def run():
        with pytest.raises(ExceptionGroup) as refused:
            async with tools(live_server_url, "ak_" + "x" * 40) as client:
                await client.list_tools()
        return refused.value

    refused = scenario(run)
    (error,) = refused.exceptions[0].exceptions
    assert isinstance(error, MCPError) and error.message == "Unknown or revoked API key."


def test_limits_apply_to_calls(live_server_url, worker, make_chain):
    """A key at its active-run limit gets a tool error (the problem in _meta) and no run."""
    make_chain("demo", models=[fake(tokens=40, latency_ms=50)])
    _, raw = api_key_create(owner_name="carol", name="one-at-a-time", max_active_runs=1)

    async def run():
        began = asyncio.Event()

        async def on_progress(done, total, message):
            began.set()

        async with tools(live_server_url, raw) as client:
            first = asyncio.create_task(
                client.call_tool("demo", {"topic": "tides"}, progress_callback=on_progress)
            )
            await asyncio.wait_for(began.wait(), 30)
            second = await client.call_tool("demo", {"topic": "tides"})
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            return second

    second = scenario(run)
    assert second.is_error
    assert second.content[0].text == "This key already has 1 active runs (at most 1)."
    problem = second.meta["agentsvc/problem"]
    assert problem["code"] == "concurrency_limit" and problem["status"] == 429
    assert Run.objects.count() == 1


def test_arguments_the_schema_refuses_are_a_tool_error_and_unknown_tools_an_mcp_error(
    live_server_url, alice, make_chain
):
    make_chain("demo")

    async def run():
        async with tools(live_server_url, alice.raw_key) as client:
            refused = await client.call_tool("demo", {"topic": 5})
            with pytest.raises(MCPError) as unknown:
                await client.call_tool("nope", {})
            return refused, unknown.value

    refused, unknown = scenario(run)
    assert refused.is_error
    assert refused.content[0].text.splitlines() == [
        "The input does not match the input schema of demo.",
        "- arguments.topic: 5 is not of type 'string'",
    ]
    assert refused.meta["agentsvc/problem"]["code"] == "validation_error"
    assert unknown.code == INVALID_PARAMS and unknown.message == "Unknown tool: nope"
    assert not Run.objects.exists()
