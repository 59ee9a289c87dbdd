"""OpenAI Agents SDK agents for the tests' chains, written as a chain owner writes them. They
name no model: the chain's `model` (a fake-model name) is theirs."""

from __future__ import annotations

import os

from agents import Agent, GuardrailFunctionOutput, function_tool, handoff, input_guardrail
from pydantic import BaseModel


@function_tool
def lookup(topic: str) -> str:
    """Look a topic up in the almanac.

    Args:
        topic: what to look up
    """
    log = os.environ.get("SDK_TOOL_LOG")
    if log:  # the tests count the calls an executor process makes
        with open(log, "a") as f:
            f.write(f"{topic}\n")
    return f"{topic}: high water at noon"


@function_tool
def explode(topic: str) -> str:
    """A tool that always fails."""
    raise RuntimeError(f"no almanac entry for {topic}")


researcher = Agent(name="Researcher", instructions="You look things up.", tools=[lookup])
writer = Agent(name="Writer", instructions="You write short answers.")
triage = Agent(
    name="Triage Agent",
    instructions="Hand the question to the agent that can answer it.",
    handoffs=[researcher, writer],
)
# A handoff object (the SDK's `handoff()`): its target is known when it is invoked.
dispatcher = Agent(
    name="Dispatcher",
    instructions="Hand the question on.",
    handoffs=[handoff(researcher, tool_name_override="ask_the_researcher")],
)
failing = Agent(name="Failing", instructions="You use your tool.", tools=[explode])


class Summary(BaseModel):
    summary: str
    words: int


summarizer = Agent(name="Summarizer", instructions="Summarise.", output_type=Summary)


@input_guardrail
async def no_secrets(ctx, agent, input) -> GuardrailFunctionOutput:
    """Trips on any input that mentions a secret."""
    return GuardrailFunctionOutput(output_info=None, tripwire_triggered="secret" in str(input))


guarded = Agent(name="Guarded", instructions="You answer.", input_guardrails=[no_secrets])
