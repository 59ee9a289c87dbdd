"""Code chains: a chain file's `entrypoint` (an async function, a LangGraph graph, an OpenAI
Agents SDK Agent), run inside an execution with the same events, usage, limits and resume as a
file chain's agents.

An async function gets a `RunContext`. Its `agent()` runs an agent as a file chain does (model
calls streamed as `agent.output`, the tool loop, usage and cost) and `step()` runs any function
once: both are steps, so a resumed run replays the function and each finished call answers at
once from the record. A function resumed this way must call them in the same order with the
same arguments (it is deterministic), as with any durable-execution engine.

`ask()` and `approve()` are steps a person answers: the run stops there to wait (holding
nothing), and the function, replayed once the answer is in, gets it back from `ask()`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from uuid import UUID

from django.conf import settings

from runs.chains import ChainDefinitionError, answer_schema_check
from runs.events import RUN_PROGRESS
from runs.execution.providers import DeadlineExceeded, ProviderError
from runs.execution.run import ChainError, RunFailure, storable
from runs.execution.tools import object_load, tool_describe
from runs.models import Agent, ChainKind

if TYPE_CHECKING:
    from runs.execution.run import Execution

logger = logging.getLogger(__name__)


class RunContext:
    """What a code chain's function is given: `await ctx.agent(...)`, `await ctx.step(...)`,
    `await ctx.ask(...)`, `await ctx.approve(...)`, `ctx.progress(...)`, and the run's `input`,
    `run_id` and `attempt`."""

    def __init__(self, execution: Execution) -> None:
        self._execution = execution
        self._calls = 0  # agent() and step() calls so far: a step's place in the run
        self._agents = 0  # agent() calls so far: the `index` of its events
        self.input: Any = execution.claim.input
        self.run_id: UUID = execution.run_id
        self.attempt: int = execution.claim.attempt

    def _next(self, name: str) -> str:
        key = f"c{self._calls}:{name}"
        self._calls += 1
        return key

    @property
    def replaying(self) -> bool:
        """Whether the function is still going over steps an earlier execution finished."""
        return any(
            key.startswith("c") and int(key[1:].split(":", 1)[0]) >= self._calls
            for key in self._execution.steps
        )

    async def agent(
        self,
        name: str,
        prompt: str,
        *,
        system_prompt: str = "",
        provider: str | None = None,
        model: str | None = None,
        base_url: str = "",
        tools: list[str | Callable] | tuple = (),
        max_tokens: int = 512,
        temperature: float = 0.7,
        max_tool_rounds: int = 8,
        tool_timeout_s: float = 30,
    ) -> str:
        """Run an agent: one model call with `prompt` (and the tool loop if `tools` are given:
        callables or `module:function` names). Its answer, as text."""
        claim = self._execution.claim
        agent = Agent(
            name=name,
            provider=provider or claim.provider,
            model=model or claim.model,
            base_url=base_url,
            max_tokens=max_tokens,
            temperature=temperature,
            tools=[_tool(t) for t in tools],
            max_tool_rounds=max_tool_rounds,
            tool_timeout_s=tool_timeout_s,
        )
        if agent.provider not in settings.PROVIDERS:
            raise ValueError(f"unknown provider {agent.provider!r}")
        if not agent.model:
            raise ValueError(f"agent {name!r}: give a model (or the chain's `model`)")
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": prompt})
        index = self._agents
        self._agents += 1
        return await self._execution.agent(
            key=self._next(name),
            index=index,
            agent=agent,
            messages=messages,
            agents_completed=index + 1,
        )

    async def step(self, name: str, fn: Callable, /, *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` (sync or async) once per run: its result (JSON) is recorded,
        and a resumed run gets it back without calling `fn` again."""
        key = self._next(name)
        execution = self._execution
        done = execution.steps.get(key)
        if done is not None:
            return done["value"]
        execution.resumed(self._agents)
        value = fn(*args, **kwargs)
        if inspect.isawaitable(value):
            value = await value
        try:
            value = storable(value)
        except ValueError as e:
            raise TypeError(f"step {name!r} returned a value that is {e}") from None
        execution.step_record(
            key, {"value": value}, RUN_PROGRESS, {"message": f"{name} finished", "step": name}
        )
        return value

    async def ask(self, prompt: str, *, schema: dict | None = None, name: str = "ask") -> dict:
        """Ask a person for an input (a JSON object valid against `schema`): the run waits
        until it is answered (POST /runs/{id}/input, or an operator), then this returns it."""
        try:
            schema = answer_schema_check(f"ask {name!r}", schema)
        except ChainDefinitionError as e:
            raise ValueError(str(e)) from None
        answer = await self._execution.wait_for_input(
            self._next(name), kind="input", prompt=str(prompt), schema=schema, index=self._agents
        )
        return answer["input"]

    async def approve(self, prompt: str, *, name: str = "approval") -> bool:
        """Ask a person to approve (True) or refuse (False): the run waits for the answer.
        What a refusal means is the function's to decide."""
        answer = await self._execution.wait_for_input(
            self._next(name), kind="approval", prompt=str(prompt), index=self._agents
        )
        return answer["approve"]

    def progress(self, message: str, **data: Any) -> None:
        """A `run.progress` event {message, data} (not repeated while a resumed run replays)."""
        if not self.replaying:
            try:
                event = storable({"message": str(message), "data": data})
            except ValueError as e:
                raise TypeError(f"progress is {e}") from None
            self._execution.emit(RUN_PROGRESS, event)


@lru_cache(maxsize=256)
def _described(path: str) -> dict[str, Any]:
    return tool_describe(path)


def _tool(tool: str | Callable) -> dict[str, Any]:
    if isinstance(tool, str):
        return _described(tool)
    path = f"{getattr(tool, '__module__', '')}:{getattr(tool, '__qualname__', '')}"
    if "<" in path:
        raise ValueError(f"tool {tool!r}: a tool is a module-level function")
    return _described(path)


@lru_cache(maxsize=256)
def entrypoint_load(path: str) -> Any:
    return object_load(path)


async def code_chain_run(execution: Execution) -> Any:
    """Run the chain's entrypoint to its output (any JSON value)."""
    claim = execution.claim
    target = entrypoint_load(claim.entrypoint)
    if claim.kind == ChainKind.FUNCTION:
        try:
            return await target(RunContext(execution), claim.input)
        except (ProviderError, DeadlineExceeded, RunFailure, ChainError):
            raise
        except Exception as e:
            logger.info("run %s: the chain raised", execution.run_id, exc_info=True)
            raise ChainError(f"{type(e).__name__}: {e}"[:1000]) from e
    if claim.kind == ChainKind.LANGGRAPH:
        from runs.execution.langgraph import graph_run

        return await graph_run(execution, target)
    if claim.kind == ChainKind.OPENAI_AGENTS:
        from runs.execution.openai_agents import sdk_agent_run

        return await sdk_agent_run(execution, target)
    raise ValueError(f"unknown chain kind {claim.kind!r}")
