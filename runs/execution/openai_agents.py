"""OpenAI Agents SDK chains: a chain owner's `agents.Agent`, run streamed inside an execution.

The run's input is the agent's input text: the input itself when it is a string, the string of
an object that holds nothing else (`{"question": "..."}`), the input's JSON otherwise. The
agent, and every agent the run hands off to, is an agent of the run (`agent.started` /
`agent.completed` with the SDK agent's name slugified and an index in the order they ran); the
model's text streams as `agent.output`; function tool calls and their outputs are
`agent.tool_call` / `agent.tool_result`. The final output is the run's output (an `output_type`
model as its JSON dump).

Every model call goes to the chain's provider (`PROVIDERS`) through the SDK's own mechanism, a
`ModelProvider` of `OpenAIChatCompletionsModel`s on that provider's `AsyncOpenAI` client: the
SDK reaches OpenAI only when the chain's provider is `openai`. Its trace export is off. The SDK
counts usage in the run's context; each step recorded here (a model response's tool calls, a
tool result, a finished agent) carries what it counted since the step before, priced at the
running agent's model, so the run's totals are the sum of its steps.

Resume: the SDK has no checkpoint a run could resume from between turns, so a resumed run starts
the agent over (`run.resumed` at index 0) and makes its model calls again. Its function tools do
not run again: each result is a step keyed by the tool, its arguments and how many times the run
had made that same call before, and a resumed run whose model asks for a call an earlier
execution finished gets the recorded result instead.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
import openai
from agents import (
    Agent,
    FunctionTool,
    Handoff,
    InputGuardrailTripwireTriggered,
    MaxTurnsExceeded,
    Model,
    ModelBehaviorError,
    ModelProvider,
    ModelRefusalError,
    ModelSettings,
    ModelTimeoutError,
    OpenAIChatCompletionsModel,
    OutputGuardrailTripwireTriggered,
    RunConfig,
    Runner,
    ToolErrorFormatterArgs,
    ToolInputGuardrailTripwireTriggered,
    ToolOutputGuardrailTripwireTriggered,
    set_tracing_disabled,
)
from agents.run import DEFAULT_MAX_TURNS
from agents.stream_events import (
    AgentUpdatedStreamEvent,
    RawResponsesStreamEvent,
    RunItemStreamEvent,
)
from django.conf import settings
from django.utils.text import slugify
from openai.types.responses import ResponseCompletedEvent
from pydantic_core import PydanticSerializationError, to_jsonable_python

from agentsvc.chainkit import provider_conf
from runs.events import (
    AGENT_COMPLETED,
    AGENT_OUTPUT,
    AGENT_STARTED,
    AGENT_TOOL_CALL,
    AGENT_TOOL_RESULT,
)
from runs.execution.providers import ProviderError, Usage
from runs.execution.run import RunFailure, arguments_shown
from runs.execution.tools import output_text

if TYPE_CHECKING:
    from agents.result import RunResultStreaming

    from runs.execution.run import Execution

logger = logging.getLogger(__name__)

_EXECUTION_KEY = re.compile(r"^sdk(\d+)/")

# The SDK's trace export sends every run to OpenAI: off in this process, whatever a chain does.
set_tracing_disabled(True)


async def sdk_agent_run(execution: Execution, agent: Agent) -> Any:
    """Run the SDK agent to its final output (any JSON value)."""
    claim = execution.claim
    base_url, key = provider_conf(claim.provider)
    client = openai.AsyncOpenAI(
        base_url=base_url,
        api_key=key,
        http_client=execution.http,  # the executor's connections (not closed here)
        max_retries=settings.PROVIDER_MAX_RETRIES,
        timeout=httpx.Timeout(
            settings.PROVIDER_READ_TIMEOUT_S, connect=settings.PROVIDER_CONNECT_TIMEOUT_S
        ),
    )
    return await _SdkRun(execution, _Models(client, claim.provider, claim.model)).run(agent)


class _Models(ModelProvider):
    """The chain's provider as the SDK's model provider: an agent's `model` names the model,
    or the chain's `model` when the agent names none."""

    def __init__(self, client: openai.AsyncOpenAI, provider: str, default: str) -> None:
        self.client = client
        self.provider = provider
        self.default = default
        self.estimated = Usage(0, 0)  # of the calls whose server reported no usage

    def get_model(self, model_name: str | None) -> Model:
        return _ChatModel(self, model_name or self.default)


class _ChatModel(OpenAIChatCompletionsModel):
    """The SDK's chat completions model, doing what file agents' provider does besides: a
    stream chunk that is not JSON is the provider's error (not the chain's), and the usage of a
    call whose server reported none is estimated (about 4 characters a token)."""

    def __init__(self, models: _Models, model: str) -> None:
        super().__init__(model=model, openai_client=models.client)
        self.models = models

    async def stream_response(  # type: ignore[override]
        self, system_instructions: str | None, input: Any, *args: Any, **kwargs: Any
    ) -> AsyncIterator[Any]:
        stream = super().stream_response(system_instructions, input, *args, **kwargs)
        try:
            async for event in stream:
                if isinstance(event, ResponseCompletedEvent) and event.response.usage is None:
                    chars_in = len(system_instructions or "") + _chars(input)
                    chars_out = _chars([item.model_dump() for item in event.response.output])
                    estimated = self.models.estimated
                    self.models.estimated = Usage(
                        estimated.input_tokens - (-chars_in // 4),
                        estimated.output_tokens - (-chars_out // 4),
                    )
                yield event
        except ValueError as e:  # a chunk that does not parse (JSON, or the chunk's fields)
            raise ProviderError(
                "invalid_provider_response",
                f"{self.models.provider}: malformed stream chunk ({e})"[:300],
            ) from e
        finally:
            await stream.aclose()


class _SdkRun:
    """One SDK run inside an execution: its stream's events turned into the run's."""

    def __init__(self, execution: Execution, models: _Models) -> None:
        self.execution = execution
        self.models = models
        # This execution's steps: sdk1/..., sdk2/... for the next execution (a hand-back keeps
        # the run's attempt, so the attempt cannot tell two executions apart).
        earlier = (int(m.group(1)) for k in execution.steps if (m := _EXECUTION_KEY.match(k)))
        self.prefix = f"sdk{max(earlier, default=0) + 1}"
        self.coalesce_s = settings.STREAM_COALESCE_MS / 1000
        # Tool results an earlier execution of the run recorded, and this execution's calls.
        self.replayable = {k: v for k, v in execution.steps.items() if k.startswith("sdk/t/")}
        self.seen: Counter[str] = Counter()
        self.call_keys: dict[str, str] = {}  # call_id -> its result's step key
        self.call_tools: dict[str, str] = {}  # call_id -> tool name
        self.errors: dict[str, dict[str, str]] = {}  # call_id -> why the tool gave no output
        self.mirrors: dict[int, Agent] = {}
        self.result: RunResultStreaming | None = None
        self.recorded = Usage(0, 0)  # of the SDK's usage, what steps carry so far
        self.steps = 0
        self.response_done = False  # a model response ended: its first tool call is its step
        # The running agent.
        self.index = -1
        self.name: str | None = None
        self.model = ""
        self.agent_started = 0.0
        self.agent_usage = Usage(0, 0)
        self.text: list[str] = []
        self.last_flush = 0.0

    async def run(self, agent: Agent) -> Any:
        result = Runner.run_streamed(
            self._mirror(agent),
            _input_text(self.execution.claim.input),
            max_turns=DEFAULT_MAX_TURNS,
            run_config=RunConfig(
                model_provider=self.models,
                model_settings=ModelSettings(include_usage=True),
                tracing_disabled=True,
                tool_error_formatter=self._tool_error,
            ),
        )
        self.result = result
        events = result.stream_events()
        try:
            async for event in events:
                self._event(event)
                await self.execution.executor.writer.backpressure()
        except (asyncio.CancelledError, RunFailure, ProviderError):
            raise
        except Exception as e:
            failure = self._failure(e)
            if isinstance(failure, RunFailure) and failure.code == "chain_error":
                logger.info("run %s: the agent raised", self.execution.run_id, exc_info=True)
            self._settle()
            raise failure from e
        finally:
            if not result.is_complete:  # cancelled, timed out or failed here: stop the SDK's run
                result.cancel()
            await events.aclose()
        self._flush()
        if result.interruptions:
            raise RunFailure(
                "agent_approval_required",
                f"{self.name} asked for a tool that needs approval (needs_approval): runs "
                "behind agentsvc cannot be interrupted for one.",
            )
        if self.name is not None:
            self._complete()
        try:
            return to_jsonable_python(result.final_output)
        except PydanticSerializationError as e:
            raise RunFailure("output_invalid", f"The agent's final output is not JSON: {e}") from e

    # --- The agents, with their tools wrapped ---------------------------------------------

    def _mirror(self, agent: Agent) -> Agent:
        """A copy of the agent whose function tools replay recorded results and whose handoffs
        lead to such copies (the chain's module-level agents are shared by runs: not changed)."""
        mirror = self.mirrors.get(id(agent))
        if mirror is not None:
            return mirror
        if isinstance(agent.model, Model):
            raise RunFailure(
                "chain_error",
                f"agent {agent.name!r}: its model is a {type(agent.model).__name__}; give the "
                "model's name (agentsvc calls it on the chain's provider)",
            )
        if not agent.model and not self.models.default:
            raise RunFailure(
                "chain_error",
                f"agent {agent.name!r} names no model, and the chain gives none (its `model`)",
            )
        tools = [self._tool(t) if isinstance(t, FunctionTool) else t for t in agent.tools]
        mirror = self.mirrors[id(agent)] = agent.clone(tools=tools)
        mirror.handoffs = [
            self._mirror(h) if isinstance(h, Agent) else self._handoff(h) for h in agent.handoffs
        ]
        return mirror

    def _handoff(self, handoff: Handoff) -> Handoff:
        invoke = handoff.on_invoke_handoff

        async def on_invoke_handoff(ctx: Any, arguments: str) -> Agent:
            return self._mirror(await invoke(ctx, arguments))

        wrapped = copy.copy(handoff)
        wrapped.on_invoke_handoff = on_invoke_handoff
        return wrapped

    def _tool(self, tool: FunctionTool) -> FunctionTool:
        invoke = tool.on_invoke_tool  # the SDK's: validation, failure_error_function, timeout

        async def on_invoke_tool(ctx: Any, arguments: str) -> Any:
            key = self._tool_key(tool.name, arguments)
            self.call_keys[ctx.tool_call_id] = key
            done = self.replayable.get(key)
            if done is not None:
                return done["output"]
            return await invoke(ctx, arguments)

        wrapped = copy.copy(tool)
        wrapped.on_invoke_tool = on_invoke_tool
        return wrapped

    def _tool_key(self, name: str, arguments: str) -> str:
        """The step of the n-th call of this tool with these arguments in the run."""
        try:
            canonical = json.dumps(json.loads(arguments or "{}"), sort_keys=True)
        except ValueError:
            canonical = arguments
        digest = hashlib.sha256(f"{name}\0{canonical}".encode()).hexdigest()[:16]
        n = self.seen[digest]
        self.seen[digest] += 1
        return f"sdk/t/{name}/{digest}/{n}"

    def _tool_error(self, args: ToolErrorFormatterArgs) -> None:
        """A tool raised: the event says so; the model reads what the SDK gives by default."""
        if args.kind == "tool_exception" and args.error is not None:
            invalid = isinstance(args.error, ModelBehaviorError)  # arguments that do not parse
            self.errors[args.call_id] = {
                "code": "tool_arguments_invalid" if invalid else "tool_error",
                "message": f"{type(args.error).__name__}: {args.error}"[:1000],
            }

    # --- The stream ------------------------------------------------------------------------

    def _event(self, event: Any) -> None:
        if isinstance(event, RawResponsesStreamEvent):
            kind = getattr(event.data, "type", "")
            if kind == "response.output_text.delta":
                self.text.append(event.data.delta)
                now = time.monotonic()
                if now - self.last_flush >= self.coalesce_s:
                    self._flush(now)
            elif kind == "response.completed":
                self._flush()
                self.response_done = True
            return
        self._flush()
        if isinstance(event, AgentUpdatedStreamEvent):
            if self.name is not None:
                self._complete()
            self._start(event.new_agent)
        elif isinstance(event, RunItemStreamEvent):
            if event.name == "tool_called":
                self._tool_called(event.item.raw_item)
            elif event.name == "tool_output":
                self._tool_output(event.item.raw_item)

    def _flush(self, now: float | None = None) -> None:
        if self.text:
            chunk = "".join(self.text)
            self.text.clear()
            self.execution.emit(
                AGENT_OUTPUT, {"agent": self.name, "index": self.index, "chunk": chunk}
            )
        self.last_flush = now or time.monotonic()

    def _start(self, agent: Agent) -> None:
        if self.index < 0:
            self.execution.resumed(0)  # a resumed run starts the agent over
        self.index += 1
        self.name = slugify(agent.name)[:100] or "agent"
        self.model = agent.model if isinstance(agent.model, str) else ""
        self.model = self.model or self.models.default
        self.agent_started = time.monotonic()
        self.agent_usage = self._used()
        self.execution.emit(
            AGENT_STARTED, {"agent": self.name, "index": self.index}, current_agent=self.name
        )

    def _complete(self) -> None:
        used = self._used()
        used_in = used.input_tokens - self.agent_usage.input_tokens
        used_out = used.output_tokens - self.agent_usage.output_tokens
        self._step(
            f"{self.prefix}/a{self.index}",
            {"agent": self.name},
            AGENT_COMPLETED,
            {
                "agent": self.name,
                "index": self.index,
                "duration_ms": int((time.monotonic() - self.agent_started) * 1000),
                "usage": {
                    "input_tokens": used_in,
                    "output_tokens": used_out,
                    "total_tokens": used_in + used_out,
                },
            },
            agents_completed=self.index + 1,
        )
        self.name = None

    def _settle(self) -> None:
        """The run fails after a model call whose usage no step carries yet (a guardrail, an
        answer the SDK cannot use): the agent that made it completes, with it."""
        if self.name is not None and self._used() != self.recorded:
            self._flush()
            self._complete()

    def _tool_called(self, raw: Any) -> None:
        if _get(raw, "type") != "function_call":
            return  # hosted tools run at the provider: not ours to show
        call_id, tool = _get(raw, "call_id"), _get(raw, "name")
        self.call_tools[call_id] = tool
        data = {
            "agent": self.name,
            "index": self.index,
            "call_id": call_id,
            "tool": tool,
            "arguments": arguments_shown(_get(raw, "arguments")),
        }
        if self.response_done:  # the response that asked for the tools is a step
            self.response_done = False
            self.steps += 1
            key = f"{self.prefix}/m{self.steps}"
            self._step(key, {"call_id": call_id, "tool": tool}, AGENT_TOOL_CALL, data)
        else:
            self.execution.emit(AGENT_TOOL_CALL, data)

    def _tool_output(self, raw: Any) -> None:
        if _get(raw, "type") != "function_call_output":
            return
        call_id = _get(raw, "call_id")
        key = self.call_keys.pop(call_id, None)
        done = self.replayable.get(key) if key else None
        if done is None:
            done = {"output": output_text(_get(raw, "output"))}
            error = self.errors.pop(call_id, None)
            if error is not None:
                done["error"] = error
        event = {
            "agent": self.name,
            "index": self.index,
            "call_id": call_id,
            "tool": self.call_tools.pop(call_id, ""),
        }
        event.update({"error": done["error"]} if "error" in done else {"output": done["output"]})
        if key is not None and key in self.replayable:
            self.execution.emit(AGENT_TOOL_RESULT, event)  # an earlier execution's: not again
            return
        if key is None:  # a tool not among the agents' own (an MCP server's)
            self.steps += 1
            key = f"{self.prefix}/t{self.steps}"
        self._step(key, done, AGENT_TOOL_RESULT, event)

    # --- Usage -----------------------------------------------------------------------------

    def _used(self) -> Usage:
        assert self.result is not None
        usage = self.result.context_wrapper.usage
        estimated = self.models.estimated
        return Usage(
            usage.input_tokens + estimated.input_tokens,
            usage.output_tokens + estimated.output_tokens,
        )

    def _step(self, key: str, data: dict, event: str, event_data: dict, **fields: Any) -> None:
        """Record a step with its event and what the SDK counted since the step before."""
        used = self._used()
        usage = Usage(
            used.input_tokens - self.recorded.input_tokens,
            used.output_tokens - self.recorded.output_tokens,
        )
        self.recorded = used
        self.execution.step_record(
            key,
            data,
            event,
            event_data,
            usage=usage if usage != Usage(0, 0) else None,
            model=self.model,
            **fields,
        )

    # --- Errors ----------------------------------------------------------------------------

    def _failure(self, e: Exception) -> Exception:
        """What an exception out of the SDK's run makes of the run."""
        name = self.name or "the agent"
        provider = self.execution.claim.provider
        if isinstance(e, MaxTurnsExceeded):
            return RunFailure(
                "agent_max_turns",
                f"{name} went past {DEFAULT_MAX_TURNS} turns (model calls) without a final output.",
            )
        if isinstance(e, InputGuardrailTripwireTriggered | OutputGuardrailTripwireTriggered):
            guardrail = e.guardrail_result.guardrail
            side = "input" if isinstance(e, InputGuardrailTripwireTriggered) else "output"
            return RunFailure(
                "agent_guardrail_tripped",
                f"{name}: the {side} guardrail {guardrail.get_name()!r} tripped.",
            )
        if isinstance(
            e, ToolInputGuardrailTripwireTriggered | ToolOutputGuardrailTripwireTriggered
        ):
            side = "input" if isinstance(e, ToolInputGuardrailTripwireTriggered) else "output"
            return RunFailure(
                "agent_guardrail_tripped",
                f"{name}: the tool {side} guardrail {e.guardrail.get_name()!r} tripped.",
            )
        if isinstance(e, ModelBehaviorError | ModelRefusalError):
            return RunFailure("agent_model_behavior", f"{name}: {type(e).__name__}: {e}"[:1000])
        if isinstance(e, ModelTimeoutError):
            return ProviderError("provider_timeout", f"{provider}: {e}")
        if isinstance(e, openai.APIError):
            return _provider_error(provider, e)
        return RunFailure("chain_error", f"{type(e).__name__}: {e}"[:1000])


def _provider_error(provider: str, e: openai.APIError) -> ProviderError:
    """An error of the model's client, as the run's error (the codes of file agents')."""
    if isinstance(e, openai.APITimeoutError):
        return ProviderError(
            "provider_timeout",
            f"{provider}: no data from the model for {settings.PROVIDER_READ_TIMEOUT_S:g} s",
        )
    if isinstance(e, openai.APIConnectionError):
        return ProviderError("provider_unavailable", f"{provider}: cannot reach the model ({e})")
    if isinstance(e, openai.APIStatusError):
        status = e.status_code
        message = str(e.message)[:300]
        if status in (401, 403):
            return ProviderError(
                "provider_auth_failed",
                f"{provider}: the model server refused the credentials ({status})",
            )
        if status == 429:
            return ProviderError("provider_rate_limited", f"{provider}: rate limited: {message}")
        if status in (502, 503, 504):
            return ProviderError("provider_unavailable", f"{provider}: HTTP {status}: {message}")
        return ProviderError("provider_error", f"{provider}: HTTP {status}: {message}")
    return ProviderError("invalid_provider_response", f"{provider}: {type(e).__name__}: {e}"[:300])


def _input_text(value: Any) -> str:
    """The run's input as the agent's input text."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and len(value) == 1:
        (only,) = value.values()
        if isinstance(only, str):
            return only
    return json.dumps(value, ensure_ascii=False)


def _chars(value: Any) -> int:
    """The characters of the text in model input or output items (contents, tool arguments and
    outputs, names), for an estimate of their tokens."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_chars(v) for v in value)
    if isinstance(value, dict):
        return sum(
            _chars(v)
            for k, v in value.items()
            if k in ("content", "text", "refusal", "arguments", "output", "name")
        )
    return 0


def _get(raw: Any, name: str) -> Any:
    """A field of an SDK item's raw item (a pydantic model or a dict)."""
    return raw.get(name) if isinstance(raw, dict) else getattr(raw, name, None)
