"""Tools in chain files: the model's tool loop through the real executor, against the fake
model server (which streams tool calls as OpenAI does)."""

from __future__ import annotations

import json

import pytest

from runs.chains import ChainDefinitionError, chain_publish
from runs.models import Run, RunEvent, RunStatus, RunStep
from runs.services import run_create
from tests.conftest import fake
from tests.test_engine import execute


def tool_chain(fake_model, model: str, tools: list, name: str = "tooled", **agent) -> object:
    chain, _ = chain_publish(
        definition={
            "name": name,
            "timeout_s": 60,
            "input_schema": {"type": "object", "required": ["topic"]},
            "agents": [
                {
                    "name": "researcher",
                    "provider": "local",
                    "model": model,
                    "base_url": fake_model.base_url,
                    "prompt": "{{ input.topic }}",
                    "tools": tools,
                    **agent,
                }
            ],
        }
    )
    return chain


def start(alice, chain, topic: str = "tides") -> Run:
    return run_create(api_key=alice.key, chain=chain, run_input={"topic": topic}, metadata={})


def typed(run: Run, kind: str) -> list[dict]:
    return [e.data for e in RunEvent.objects.filter(run=run, type=kind).order_by("seq")]


def test_schema_comes_from_hints_and_docstring(alice, fake_model):
    chain = tool_chain(fake_model, fake(tools=1), ["tests.chaincode.tools:lookup"])
    (tool,) = chain.agents.get().tools
    assert tool["name"] == "lookup"
    assert tool["description"] == "Look a topic up in the almanac."
    assert tool["parameters"]["required"] == ["topic"]
    assert tool["parameters"]["properties"]["topic"] == {
        "type": "string",
        "description": "what to look up",
    }
    assert tool["parameters"]["properties"]["limit"]["default"] == 3
    assert len(tool["source_hash"]) == 64


def test_one_tool_round(alice, fake_model):
    model = fake(tools=1)
    chain = tool_chain(fake_model, model, ["tests.chaincode.tools:lookup"])
    run = execute(start(alice, chain, "tides"))
    assert run.status == RunStatus.COMPLETED, run.error_message
    (call,) = typed(run, "agent.tool_call")
    assert call["tool"] == "lookup" and call["agent"] == "researcher" and call["index"] == 0
    assert call["arguments"] == {"topic": "tides", "limit": 2}
    (result,) = typed(run, "agent.tool_result")
    assert result["call_id"] == call["call_id"]
    assert json.loads(result["output"]) == {
        "topic": "tides",
        "facts": ["tides fact 0", "tides fact 1"],
    }
    # The model read the tool's output: the fake echoes the last tool message.
    assert "tides fact 1" in run.output
    # What the model was sent the second time: the assistant's call and the tool's answer.
    sent = fake_model.bodies[model]
    assert sent["tools"][0]["function"]["name"] == "lookup"
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "tool"]
    assert sent["messages"][2]["tool_call_id"] == call["call_id"]
    # Both model calls count in the run's usage, the agent's, and the settled budget.
    completed = typed(run, "agent.completed")[0]["usage"]
    assert completed["input_tokens"] == run.input_tokens and run.output_tokens > 0
    steps = dict(RunStep.objects.filter(run=run).values_list("key", "output_tokens"))
    assert set(steps) == {"a0", "a0/m0", "a0/m0/t0"}
    assert sum(steps.values()) == run.output_tokens
    types = list(RunEvent.objects.filter(run=run).order_by("seq").values_list("type", flat=True))
    assert types.index("agent.tool_call") < types.index("agent.tool_result")
    assert types.index("agent.tool_result") < types.index("agent.completed")


def test_parallel_calls_async_and_sync(alice, fake_model):
    model = fake(tools=2, parallel=2)
    tools = ["tests.chaincode.tools:lookup", "tests.chaincode.tools:weather"]
    run = execute(start(alice, tool_chain(fake_model, model, tools), "Paris"))
    assert run.status == RunStatus.COMPLETED, run.error_message
    calls = typed(run, "agent.tool_call")
    results = typed(run, "agent.tool_result")
    assert [c["tool"] for c in calls] == ["lookup", "weather", "lookup", "weather"]
    assert {r["call_id"] for r in results} == {c["call_id"] for c in calls}
    assert {r["output"] for r in results if r["tool"] == "weather"} == {"sunny in Paris"}


def test_a_tool_that_raises_is_an_error_result(alice, fake_model):
    model = fake(tools=1)
    run = execute(start(alice, tool_chain(fake_model, model, ["tests.chaincode.tools:explode"])))
    assert run.status == RunStatus.COMPLETED  # the model got the error and answered
    (result,) = typed(run, "agent.tool_result")
    assert result["error"] == {
        "code": "tool_error",
        "message": "RuntimeError: no almanac entry for tides",
    }
    assert "output" not in result
    assert json.loads(fake_model.bodies[model]["messages"][-1]["content"])["error"]["code"] == (
        "tool_error"
    )


def test_a_tool_that_blocks_times_out(alice, fake_model):
    model = fake(tools=1)
    chain = tool_chain(fake_model, model, ["tests.chaincode.tools:block"], tool_timeout_s=0.5)
    run = execute(start(alice, chain))
    assert run.status == RunStatus.COMPLETED
    (result,) = typed(run, "agent.tool_result")
    assert result["error"]["code"] == "tool_timeout"
    assert "0.5 s" in result["error"]["message"]


def test_bad_arguments_and_long_output(alice, fake_model, settings):
    settings.TOOL_OUTPUT_MAX_CHARS = 1000
    model = fake(tools=1)
    run = execute(start(alice, tool_chain(fake_model, model, ["tests.chaincode.tools:huge"])))
    (result,) = typed(run, "agent.tool_result")
    assert len(result["output"]) < 1100 and "[cut: " in result["output"]
    # A tool whose schema the file gives: the model's arguments miss what the function needs.
    chain = tool_chain(
        fake_model,
        fake(tools=1),
        [
            {
                "function": "tests.chaincode.tools:lookup",
                "parameters": {"type": "object", "properties": {"limit": {"type": "integer"}}},
            }
        ],
        name="tooled-bad-args",
    )
    run = execute(start(alice, chain))
    (result,) = typed(run, "agent.tool_result")
    assert result["error"]["code"] == "tool_arguments_invalid"
    assert "topic" in result["error"]["message"]


def test_tool_rounds_exceeded(alice, fake_model):
    chain = tool_chain(
        fake_model, fake(tools=99), ["tests.chaincode.tools:lookup"], max_tool_rounds=2
    )
    run = execute(start(alice, chain))
    assert run.status == RunStatus.FAILED
    assert run.error_code == "tool_rounds_exceeded"
    assert len(typed(run, "agent.tool_result")) == 2
    assert typed(run, "run.failed")[0]["error"]["code"] == "tool_rounds_exceeded"


@pytest.mark.parametrize(
    ("tools", "message"),
    [
        (["tests.chaincode.nothere:lookup"], "cannot import tests.chaincode.nothere"),
        (["tests.chaincode.tools:nothere"], "has no attribute nothere"),
        (["not a path"], "not of the form module:attribute"),
        (["tests.chaincode.tools:lookup", "tests.chaincode.tools:lookup"], "must be unique"),
        ([{"function": "tests.chaincode.tools:lookup", "name": "bad name"}], "must match"),
        ([], "non-empty list"),
    ],
)
def test_publish_refuses_bad_tools(db, fake_model, tools, message):
    with pytest.raises(ChainDefinitionError, match=message):
        tool_chain(fake_model, fake(), tools)
