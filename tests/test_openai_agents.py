"""OpenAI Agents SDK chains: the real `openai-agents` package against the fake model server,
through the real executor (in-process, and real executor processes for cancellation and
resume). The agents are in tests/chaincode/sdk_agents.py, as a chain owner writes them."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from django.core.management import call_command

from runs.chains import chain_publish
from runs.models import Chain, ChainKind, Run, RunEvent, RunStatus, RunStep
from runs.services import run_cancel, run_create
from tests.conftest import fake, wait_until
from tests.test_engine import execute, requests_for


@pytest.fixture
def local(settings, fake_model):
    """The `local` provider is the fake model (the executor's, in this process)."""
    settings.PROVIDERS = {
        **settings.PROVIDERS,
        "local": {"base_url": fake_model.base_url, "api_key_env": ""},
    }
    return fake_model


def sdk_chain(agent: str, model: str, name: str = "sdk", timeout_s: int = 30):
    chain, _ = chain_publish(
        definition={
            "name": name,
            "entrypoint": f"tests.chaincode.sdk_agents:{agent}",
            "provider": "local",
            "model": model,
            "timeout_s": timeout_s,
            "input_schema": {"type": "object"},
        }
    )
    return chain


def start(alice, chain, run_input=None) -> Run:
    return run_create(
        api_key=alice.key, chain=chain, run_input=run_input or {"topic": "tides"}, metadata={}
    )


def events(run: Run) -> list[RunEvent]:
    return list(RunEvent.objects.filter(run=run).order_by("seq"))


def typed(run: Run, kind: str) -> list[dict]:
    """The data of the run's events of a kind, without the fields every event has."""
    return [
        {k: v for k, v in e.data.items() if k not in ("run_id", "seq", "ts")}
        for e in events(run)
        if e.type == kind
    ]


def steps(run: Run) -> dict[str, tuple[int, int]]:
    return {s.key: (s.input_tokens, s.output_tokens) for s in RunStep.objects.filter(run=run)}


def test_events_and_output(alice, local):
    model = fake(tokens=6)
    run = execute(start(alice, sdk_chain("writer", model)))
    assert run.status == RunStatus.COMPLETED, run.error_message
    evs = events(run)
    types = [e.type for e in evs]
    assert types[:3] == ["run.queued", "run.started", "agent.started"]
    assert types[-2:] == ["agent.completed", "run.completed"]
    assert typed(run, "agent.started") == [{"agent": "writer", "index": 0}]
    chunks = [e.data for e in evs if e.type == "agent.output"]
    assert chunks and {(c["agent"], c["index"]) for c in chunks} == {("writer", 0)}
    text = "".join(c["chunk"] for c in chunks)
    assert len(text.split()) == 6
    # The output is the agent's final text (stored as JSON: a code chain's output is any value).
    assert json.loads(run.output) == text == evs[-1].data["output"]
    completed = typed(run, "agent.completed")[0]
    assert completed["usage"]["output_tokens"] == 6 == run.output_tokens
    assert run.agents_completed == 1 and run.current_agent == ""
    # The model got the agent's instructions and the input's one string as the user's text.
    sent = local.bodies[model]
    assert sent["messages"] == [
        {"role": "system", "content": "You write short answers."},
        {"role": "user", "content": "tides"},
    ]
    assert sent["stream_options"] == {"include_usage": True}


def test_an_input_of_several_fields_is_sent_as_json(alice, local):
    model = fake(tokens=2)
    run_input = {"topic": "tides", "audience": ["sailors"]}
    run = execute(start(alice, sdk_chain("writer", model), run_input))
    assert run.status == RunStatus.COMPLETED, run.error_message
    assert json.loads(local.bodies[model]["messages"][-1]["content"]) == run_input


def test_a_function_tool(alice, local):
    model = fake(tools=1)
    run = execute(start(alice, sdk_chain("researcher", model)))
    assert run.status == RunStatus.COMPLETED, run.error_message
    (call,) = typed(run, "agent.tool_call")
    assert call == {
        "agent": "researcher",
        "index": 0,
        "call_id": call["call_id"],
        "tool": "lookup",
        "arguments": {"topic": "tides"},
    }
    (result,) = typed(run, "agent.tool_result")
    assert result == {
        "agent": "researcher",
        "index": 0,
        "call_id": call["call_id"],
        "tool": "lookup",
        "output": "tides: high water at noon",
    }
    # The model read the tool's output (the fake echoes the last tool message).
    assert json.loads(run.output) == "tides: high water at noon"
    types = [e.type for e in events(run)]
    assert types.index("agent.tool_call") < types.index("agent.tool_result")
    assert types.index("agent.tool_result") < types.index("agent.completed")
    # A step per model response that called tools, per tool result, per finished agent.
    keys = set(steps(run))
    (tool_key,) = {k for k in keys if k.startswith("sdk/t/lookup/")}
    assert keys == {"sdk1/m1", tool_key, "sdk1/a0"}
    assert requests_for(local, model) == 2


@pytest.mark.parametrize(
    "agent, name, handoff_tool",
    [
        ("triage", "triage-agent", "transfer_to_researcher"),
        ("dispatcher", "dispatcher", "ask_the_researcher"),  # a handoff() object
    ],
)
def test_a_handoff_is_another_agent(alice, local, agent, name, handoff_tool):
    """The first agent hands off (the fake calls its first tool, the handoff), the researcher
    calls its tool, then answers."""
    model = fake(tools=2)
    run = execute(start(alice, sdk_chain(agent, model)))
    assert run.status == RunStatus.COMPLETED, run.error_message
    started = typed(run, "agent.started")
    assert started == [{"agent": name, "index": 0}, {"agent": "researcher", "index": 1}]
    completed = typed(run, "agent.completed")
    assert [(c["agent"], c["index"]) for c in completed] == [(name, 0), ("researcher", 1)]
    # The handoff is no tool call of the run's; the researcher's tool is.
    assert [(c["agent"], c["tool"]) for c in typed(run, "agent.tool_call")] == [
        ("researcher", "lookup")
    ]
    assert json.loads(run.output) == "tides: high water at noon"
    assert run.agents_completed == 2
    # The researcher got the conversation and its own instructions.
    messages = local.bodies[model]["messages"]
    assert messages[0] == {"role": "system", "content": "You look things up."}
    assert messages[2]["tool_calls"][0]["function"]["name"] == handoff_tool
    # The researcher's tool ran through the run's wrapper (its result is a replayable step).
    assert {k for k in steps(run) if k.startswith("sdk/t/lookup/")}
    # Each agent's usage is its own model calls'; together, the run's.
    assert sum(c["usage"]["input_tokens"] for c in completed) == run.input_tokens
    assert sum(c["usage"]["output_tokens"] for c in completed) == run.output_tokens


def test_a_tool_that_raises_goes_back_to_the_model(alice, local):
    model = fake(tools=1)
    run = execute(start(alice, sdk_chain("failing", model)))
    assert run.status == RunStatus.COMPLETED, run.error_message
    (result,) = typed(run, "agent.tool_result")
    assert result["error"] == {
        "code": "tool_error",
        "message": "RuntimeError: no almanac entry for tides",
    }
    assert "output" not in result
    # The model read what the SDK gives by default (not the exception's text).
    default = "An error occurred while running the tool."
    assert local.bodies[model]["messages"][-1] == {
        "role": "tool",
        "tool_call_id": result["call_id"],
        "content": default,
    }
    assert json.loads(run.output) == default


def test_max_turns(alice, local):
    model = fake(tools=50)
    run = execute(start(alice, sdk_chain("researcher", model)))
    assert run.status == RunStatus.FAILED
    assert run.error_code == "agent_max_turns"
    assert "researcher went past 10 turns" in run.error_message
    # Ten model responses, each asking for the tool; each is a step that counts its usage.
    assert requests_for(local, model) == 10
    assert len(typed(run, "agent.started")) == 1  # one agent, however many turns
    assert len(typed(run, "agent.tool_result")) == 10
    recorded = steps(run)
    assert sum(i for i, _ in recorded.values()) == run.input_tokens > 0
    assert sum(o for _, o in recorded.values()) == run.output_tokens > 0
    assert events(run)[-1].type == "run.failed"


def test_usage_and_cost_land_in_the_run(alice, local, settings):
    model = fake(tools=2)
    settings.MODEL_PRICES = {model: (Decimal("1.5"), Decimal("6"))}
    run = execute(start(alice, sdk_chain("triage", model)))
    assert run.status == RunStatus.COMPLETED, run.error_message
    recorded = steps(run)
    assert sum(i for i, _ in recorded.values()) == run.input_tokens > 0
    assert sum(o for _, o in recorded.values()) == run.output_tokens > 0
    # Each step is priced at the model's price, and the run costs the sum of its steps.
    priced = [
        ((i * Decimal("1.5") + o * 6) / 1_000_000).quantize(Decimal("0.000001"))
        for i, o in recorded.values()
    ]
    assert sorted(RunStep.objects.filter(run=run).values_list("cost", flat=True)) == sorted(priced)
    assert run.cost == sum(priced) > 0
    final = events(run)[-1].data
    assert final["usage"]["input_tokens"] == run.input_tokens
    assert final["cost"] == str(run.cost)


def test_an_output_type_is_the_output_object(alice, local):
    run = execute(start(alice, sdk_chain("summarizer", fake(json=1, tokens=3))))
    assert run.status == RunStatus.COMPLETED, run.error_message
    output = json.loads(run.output)
    assert output["words"] == 3 and len(output["summary"].split()) == 3
    assert events(run)[-1].data["output"] == output


def test_a_guardrail_tripwire_fails_the_run(alice, local):
    run = execute(start(alice, sdk_chain("guarded", fake(tokens=3)), {"topic": "secret plans"}))
    assert run.status == RunStatus.FAILED
    assert run.error_code == "agent_guardrail_tripped"
    assert run.error_message == "guarded: the input guardrail 'no_secrets' tripped."
    assert events(run)[-1].type == "run.failed"


@pytest.mark.parametrize(
    "opts, code",
    [
        ({"fail": 401}, "provider_auth_failed"),
        ({"fail": 429}, "provider_rate_limited"),
        ({"fail": 500}, "provider_error"),
        ({"malformed": 1, "tokens": 3}, "invalid_provider_response"),
    ],
)
def test_provider_failures_are_the_runs_error(alice, local, settings, opts, code):
    settings.PROVIDER_MAX_RETRIES = 0
    run = execute(start(alice, sdk_chain("writer", fake(**opts))))
    assert run.status == RunStatus.FAILED
    assert run.error_code == code, run.error_message
    assert run.error_message.startswith("local: ")


def test_usage_a_server_does_not_report_is_estimated(alice, local):
    run = execute(start(alice, sdk_chain("researcher", fake(tools=1, no_usage=1))))
    assert run.status == RunStatus.COMPLETED, run.error_message
    assert run.input_tokens > 0 and run.output_tokens > 0
    recorded = steps(run)
    assert sum(i for i, _ in recorded.values()) == run.input_tokens
    assert sum(o for _, o in recorded.values()) == run.output_tokens


def test_a_timeout_stops_a_silent_model(alice, local):
    run = execute(start(alice, sdk_chain("writer", fake(hang=1, tokens=5), timeout_s=1)))
    assert run.status == RunStatus.TIMED_OUT
    assert run.error_code == "chain_timed_out"
    assert (run.finished_at - run.started_at).total_seconds() < 3


# --- Real executor processes --------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(90)
def test_cancel_stops_the_agent_in_an_executor(alice, executors, fake_model):
    executors(LOCAL_MODEL_URL=fake_model.base_url)
    model = fake(tokens=400, latency_ms=50)
    run = start(alice, sdk_chain("writer", model, timeout_s=60))
    wait_until(
        lambda: RunEvent.objects.filter(run=run, type="agent.output").exists(),
        30,
        message="the agent's first output",
    )
    run_cancel(run=run, reason="api")
    wait_until(
        lambda: Run.objects.get(pk=run.id).status == RunStatus.CANCELLED, 10, message="cancelled"
    )
    run.refresh_from_db()
    assert (run.finished_at - run.cancel_requested_at).total_seconds() < 2
    evs = events(run)
    assert evs[-1].type == "run.cancelled" and evs[-1].data["reason"] == "api"
    assert [e.seq for e in evs] == list(range(1, len(evs) + 1))
    assert "agent.completed" not in {e.type for e in evs}


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(120)
def test_a_resumed_run_starts_over_and_replays_finished_tool_calls(
    alice, executors, fake_model, tmp_path
):
    """SIGTERM while the researcher's answer streams: the run goes back to the queue, and the
    next executor starts the agent over. Its model calls are made again; its tool call is not:
    the result the first execution recorded answers it."""
    log = tmp_path / "calls.log"
    env = {"LOCAL_MODEL_URL": fake_model.base_url, "SDK_TOOL_LOG": str(log)}
    leaving = executors(WORKER_DRAIN_S="0.2", **env)
    model = fake(tools=1, tokens=30, latency_ms=100)
    run = start(alice, sdk_chain("researcher", model, timeout_s=60))
    wait_until(
        lambda: RunEvent.objects.filter(run=run, type="agent.output").exists(),
        30,
        message="the answer to stream",
    )
    leaving.terminate()
    run.refresh_from_db()
    assert run.status == RunStatus.QUEUED
    executors(**env)
    wait_until(
        lambda: Run.objects.get(pk=run.id).status == RunStatus.COMPLETED, 30, message="completed"
    )
    run.refresh_from_db()
    assert log.read_text() == "tides\n"  # the tool ran once
    assert requests_for(fake_model, model) == 4  # each execution's two model calls
    types = [e.type for e in events(run)]
    resumed = types.index("run.resumed")
    assert types[resumed + 1] == "agent.started"
    assert typed(run, "run.resumed")[0]["index"] == 0
    results = typed(run, "agent.tool_result")
    assert len(results) == 2 and results[0]["output"] == results[1]["output"]
    keys = set(steps(run))
    (tool_key,) = {k for k in keys if k.startswith("sdk/t/")}
    assert keys == {"sdk1/m1", tool_key, "sdk2/m1", "sdk2/a0"}
    # What each execution's steps used, once: the run's totals.
    recorded = steps(run)
    assert sum(i for i, _ in recorded.values()) == run.input_tokens
    assert sum(o for _, o in recorded.values()) == run.output_tokens
    assert json.loads(run.output).startswith("tides: high water at noon")


def test_the_example_chain_loads_and_runs(alice, local):
    """`loadchains chains/code.yaml` from the project root publishes the triage example; on the
    scripted local model (which calls no tool unless asked) the triage agent answers itself."""
    call_command("loadchains", "chains/code.yaml")
    chain = Chain.objects.get(name="agents-sdk-triage")
    assert chain.kind == ChainKind.OPENAI_AGENTS
    assert chain.entrypoint == "chains.examples.agents_sdk_triage:triage"
    run = execute(start(alice, chain, {"question": "How many km is 3 miles?"}))
    assert run.status == RunStatus.COMPLETED, run.error_message
    assert typed(run, "agent.started") == [{"agent": "triage", "index": 0}]
    assert json.loads(run.output) == "How many km is 3 miles?"
    assert local.bodies["smollm2-135m-instruct"]["tools"][0]["function"]["name"] == (
        "transfer_to_units"
    )
